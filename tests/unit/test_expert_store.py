"""The expert store on disk: layout written by `ferry convert`, honest reads, and clear errors for
truncated, corrupt or mismatched stores."""
from __future__ import annotations

import gc
import json
import os
import shutil

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.cli import main
from ferry.config import ModelConfig
from ferry.errors import InvalidRequest, ModelLoadError
from ferry.experts.convert import convert_expert_store
from ferry.experts.layout import StoreIndex
from ferry.experts.policies import LRUPolicy
from ferry.experts.reads import ExpertReadError
from ferry.experts.store import ExpertStore
from ferry.models.loader import load_model
from ferry.tiers.disk import ALIGN, DirectFile
from ferry.tiers.read_pool import ThreadReadPool
from tests.checkpoints import make_checkpoint
from tests.expert_stores import check_store_clean, make_store


@pytest.fixture
def mixtral(tmp_ckpt_dir):
    return make_store("mixtral", tmp_ckpt_dir)


def _open(ckpt, store, budget=None, allow_direct=True) -> ExpertStore:
    cfg = ModelConfig.from_hf(ckpt)
    shape = ([0, 1], cfg.moe.num_experts, cfg.moe.top_k)
    return ExpertStore(store, cfg, torch.float32, budget, LRUPolicy(*shape), allow_direct)


def _get(store: ExpertStore, layer: int, experts: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    got = {i: (g.clone(), d.clone()) for i, g, d in store.weights(layer, experts)}
    assert sorted(got) == list(range(len(experts)))  # every position once
    return [got[i] for i in range(len(experts))]


def test_store_holds_the_checkpoints_experts_aligned(mixtral):
    ckpt, folder = mixtral
    index = StoreIndex.load(folder)
    assert index.layout.record_nbytes % ALIGN == 0
    for layer, records in index.experts.items():
        assert all(r.offset % ALIGN == 0 for r in records)
        assert os.path.getsize(folder / index.layer_files[layer]) == len(records) * index.layout.record_nbytes
    cfg = ModelConfig.from_hf(ckpt)
    resident = load_model(cfg, torch.float32, torch.device("cpu"), 64)
    store = _open(ckpt, folder)
    try:
        for layer in (0, 1):
            got = _get(store, layer, list(range(8)))
            for e, (g, d) in enumerate(got):
                assert torch.equal(g, resident.layers[layer].mlp.experts.gate_up[e])
                assert torch.equal(d, resident.layers[layer].mlp.experts.down[e])
        check_store_clean(store, store.stats().budget_nbytes)
    finally:
        store.close()


def test_python_reader_threads_stand_in_for_the_native_pool(mixtral, monkeypatch):
    """Where the C++ pool cannot be built, the store reads through Python threads: the same bytes."""
    ckpt, folder = mixtral
    native = _open(ckpt, folder)
    try:
        want = _get(native, 1, [0, 3, 6])
    finally:
        native.close()
    monkeypatch.setattr("ferry.experts.reads.read_pool", ThreadReadPool)
    store = _open(ckpt, folder, budget=2 * StoreIndex.load(folder).slot_nbytes)  # 2 slots for 3 experts
    try:
        assert isinstance(store.reads.pool, ThreadReadPool)
        got = _get(store, 1, [0, 3, 6])
        assert all(g.equal(w) and d.equal(v) for (g, d), (w, v) in zip(got, want))
        check_store_clean(store, store.stats().budget_nbytes)
    finally:
        store.close()


def test_a_store_dropped_while_reading_stops_its_readers(mixtral):
    """No read lands in a freed cache slab: dropping a store without close() first ends its reads."""
    ckpt, folder = mixtral
    store = _open(ckpt, folder)
    store._start_reads([(layer, e) for layer in (0, 1) for e in range(8)], 16)
    pool, files = store.reads.pool, list(store.reads.files.values())
    del store
    gc.collect()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(0, 0, 0, 0, True, False)
    assert all(f.fd < 0 for f in files)  # and its files are closed


@pytest.mark.parametrize("allow_direct", [True, False])
def test_every_read_comes_from_disk_and_is_counted(mixtral, allow_direct):
    ckpt, folder = mixtral
    store = _open(ckpt, folder, allow_direct=allow_direct)
    try:
        record = store.layout.record_nbytes
        assert store.stats().io_mode in (("direct", "fadvise") if allow_direct else ("fadvise",))
        first = _get(store, 0, [2, 5])
        assert _get(store, 0, [2, 5])[0][0].equal(first[0][0])  # cached: no new read
        assert (store.stats().num_reads, store.stats().bytes_read) == (2, 2 * record)
        store.empty()  # dropped from RAM: the next use reads the disk again
        _get(store, 0, [2])
        s = store.stats()
        assert (s.num_reads, s.bytes_read, s.lookups, s.hits) == (3, 3 * record, 5, 2)
    finally:
        store.close()


class HeldPool:
    """A read pool whose reads start only once someone waits for one: a disk that has not answered yet."""

    def __init__(self, pool) -> None:
        self.pool, self.held, self.real, self.next = pool, [], {}, 1 << 40

    def submit(self, *args) -> int:
        self.next += 1
        self.held.append((self.next, args))
        return self.next

    def _back(self, finished) -> list:
        return [(self.real.pop(t), *rest) for t, *rest in finished]

    def reap(self) -> list:
        return self._back(self.pool.reap())

    def wait(self, ticket: int = -1) -> list:
        for t, args in self.held:
            self.real[self.pool.submit(*args)] = t
        self.held.clear()
        real = next((r for r, t in self.real.items() if t == ticket), -1)
        return self._back(self.pool.wait(real))

    def prioritize(self, ticket: int) -> bool:
        return False

    def pending(self) -> int:
        return len(self.held) + self.pool.pending()

    def close(self) -> None:
        self.pool.close()


def test_experts_in_ram_are_handed_out_first(mixtral):
    ckpt, folder = mixtral
    store = _open(ckpt, folder)
    try:
        _get(store, 0, [5, 7])
        store.reads.pool = HeldPool(store.reads.pool)  # expert 1's read will not have finished when the forward asks
        order = store.weights(0, [1, 5, 7])
        assert [i for i, _, _ in order] == [1, 2, 0]  # experts 5 and 7 compute while 1 is read
    finally:
        store.close()


def test_fadvise_mode_drops_the_page_cache(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(4 * ALIGN))
    f = DirectFile(path, allow_direct=False)
    buf = bytearray(2 * ALIGN)
    f.read_into(memoryview(buf), ALIGN)
    assert bytes(buf) == path.read_bytes()[ALIGN:3 * ALIGN] and f.mode == "fadvise"
    assert (f.stats.num_reads, f.stats.bytes_read) == (1, 2 * ALIGN)
    f.close()


def _copy(folder, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(folder, dst)
    return dst


def test_truncated_file_at_start_names_the_file(mixtral, tmp_path):
    ckpt, folder = mixtral
    store = _copy(folder, tmp_path)
    os.truncate(store / "layer001.experts", 3 * StoreIndex.load(store).layout.record_nbytes)
    with pytest.raises(ModelLoadError, match=r"layer001\.experts \(layer 1\) is truncated"):
        _open(ckpt, store)


def test_truncated_file_while_running_names_expert_and_file(mixtral, tmp_path):
    ckpt, folder = mixtral
    folder = _copy(folder, tmp_path)
    store = _open(ckpt, folder)
    try:
        os.truncate(folder / "layer001.experts", 3 * store.layout.record_nbytes)
        _get(store, 1, [1])  # before the cut: fine
        with pytest.raises(ExpertReadError, match=r"expert 5 of layer 1 from .*layer001\.experts.*truncated"):
            _get(store, 1, [5])
        check_store_clean(store, store.stats().budget_nbytes)
    finally:
        store.close()


def test_corrupt_expert_fails_its_checksum(mixtral, tmp_path):
    ckpt, folder = mixtral
    folder = _copy(folder, tmp_path)
    index = StoreIndex.load(folder)
    with open(folder / "layer000.experts", "r+b") as f:
        f.seek(index.experts[0][6].offset + 100)
        f.write(b"\x7f\x7f")
    store = _open(ckpt, folder)
    try:
        with pytest.raises(ExpertReadError, match=r"expert 6 of layer 0 in .*layer000\.experts.*checksum"):
            _get(store, 0, [6])
    finally:
        store.close()


def test_read_error_fails_the_request_not_the_answer(mixtral, tmp_path):
    ckpt, folder = mixtral
    folder = _copy(folder, tmp_path)
    with LLM(str(ckpt), dtype="float32", kv_cache_memory="4M", expert_store=str(folder),
             expert_cache_memory=StoreIndex.load(folder).layout.record_nbytes) as llm:
        os.truncate(folder / "layer000.experts", 0)
        out = llm.generate([[1, 5, 9, 13]], SamplingParams(max_tokens=4), use_tqdm=False)[0]
        assert out.outputs[0].finish_reason == "error"
        assert "ExpertReadError" in out.error and "layer000.experts" in out.error
        check_store_clean(llm.engine.parts.experts, llm.engine.parts.experts.stats().budget_nbytes)


def test_store_of_another_model_or_dtype_is_refused(tmp_ckpt_dir, mixtral):
    _, mixtral_store = mixtral
    olmoe_ckpt, _ = make_store("olmoe", tmp_ckpt_dir)
    with pytest.raises(ModelLoadError, match="built for another model"):
        _open(olmoe_ckpt, mixtral_store)
    cfg = ModelConfig.from_hf(mixtral[0])
    shape = ([0, 1], 8, 2)
    with pytest.raises(InvalidRequest, match="holds float32 experts but the engine runs bfloat16"):
        ExpertStore(mixtral_store, cfg, torch.bfloat16, None, LRUPolicy(*shape))


def test_bad_options_and_inputs_are_clear_errors(tmp_ckpt_dir, mixtral, tmp_path):
    ckpt, folder = mixtral
    with pytest.raises(InvalidRequest, match="holds no expert"):
        _open(ckpt, folder, budget=1000)
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [f for f in open_files if str(folder) in f], "a failed start left expert files open"
    with pytest.raises(InvalidRequest, match="need expert_store"):
        LLM(str(ckpt), expert_cache_memory="1M")
    with pytest.raises(ModelLoadError, match="index.json is missing"):
        LLM(str(ckpt), kv_cache_memory="4M", expert_store=str(tmp_path))
    with pytest.raises(InvalidRequest, match="has no experts"):
        convert_expert_store(make_checkpoint("llama", tmp_ckpt_dir), tmp_path / "x")
    (tmp_path / "index.json").write_text(json.dumps({"format": "ferry-expert-store", "version": 1}))
    with pytest.raises(ModelLoadError, match="malformed"):
        StoreIndex.load(tmp_path)


def test_cli_convert_writes_a_store(mixtral, tmp_path, capsys):
    ckpt, _ = mixtral
    assert main(["convert", str(ckpt), "--expert-store", str(tmp_path / "s"), "--dtype", "bfloat16"]) == 0
    index = StoreIndex.load(tmp_path / "s")
    assert index.layout.dtype == "bfloat16" and sorted(index.experts) == [0, 1]
    assert "wrote 16 experts (16 bfloat16;" in capsys.readouterr().err


def test_cli_generate_from_a_store_saves_learned_statistics(mixtral, tmp_path, capsys):
    ckpt, folder = mixtral
    stats = tmp_path / "corr.json"
    argv = ["generate", str(ckpt), "--prompt", "Once upon a time", "--max-tokens", "4", "--dtype", "float32",
            "--kv-cache-memory", "4M", "--expert-store", str(folder), "--expert-cache-memory", "100K",
            "--expert-prefetch", "correlation", "--expert-correlation-file", str(stats), "--explain"]
    assert main(argv) == 0
    assert "expert plan" in capsys.readouterr().err
    assert json.loads(stats.read_text())["num_experts"] == 8
