"""Expert-wise bitwidth: int8 / int4 with group-wise scales, chosen per expert by measured sensitivity; records in
the CPU-independent stored form (ferry.ops.quant), refused in the older CPU-specific one. Lossy by design, so these
tests bound the error instead of asking for exact tokens."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.errors import InvalidRequest, ModelLoadError
from ferry.experts.convert import convert_expert_store
from ferry.experts.layout import StoreIndex
from ferry.experts.policies import LRUPolicy
from ferry.experts.quant import QuantLayout, quantizable
from ferry.experts.store import ExpertStore
from ferry.models.loader import load_model
from ferry.ops.quant import QuantLinear, ReferenceLinear
from tests.checkpoints import make_checkpoint, random_prompts
from tests.expert_stores import auto_plan, check_store_clean, make_store
from tests.unit.test_ops_isa import forced_isa
from tests.unit.test_ops_quant import LEVELS


@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.2)])
def test_expert_record_quantization_error_is_bounded(bits, bound):
    gen = torch.Generator().manual_seed(0)
    gate_up, down = torch.randn(128, 96, generator=gen), torch.randn(96, 64, generator=gen)
    q = QuantLayout(bits, 32, 96, 64)
    slot = torch.frombuffer(bytearray(q.encode(gate_up, down)), dtype=torch.uint8)
    g, d = q.stored(slot)
    assert g.codes.shape == (128, 96 * bits // 8) and g.scales.dtype == torch.float16
    assert g.scales.shape == ((128, 1) if bits == 8 else (128, 3))  # int8: per row; int4: per 32 inputs
    for w, back in zip((gate_up, down), q.unpack(slot, torch.empty(128, 96), torch.empty(96, 64))):
        assert float((back - w).norm() / w.norm()) < bound


def test_int4_codes_round_trip_exactly():
    q = torch.randint(-7, 8, (64, 64), generator=torch.Generator().manual_seed(1)).float()
    q[:, ::32] = 7  # every group's max |w| maps to 7: scale 0.5 exactly
    layout = QuantLayout(4, 32, 64, 32)
    slot = torch.frombuffer(bytearray(layout.encode(q * 0.5, torch.zeros(64, 32))), dtype=torch.uint8)
    assert torch.equal(layout.unpack(slot, torch.empty(64, 64), torch.empty(64, 32))[0], q * 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 4])
def test_slot_linears_compute_the_dequantized_weight(bits, dtype):
    """The linears over a slot (the kernels, reading the stored bytes in place) and dequantize-then-matmul are
    the same weight: outputs agree to the kernel's activation rounding."""
    gen = torch.Generator().manual_seed(3)
    gate_up, down = torch.randn(128, 64, generator=gen), torch.randn(64, 64, generator=gen)
    q = QuantLayout(bits, 32, 64, 64)
    slot = torch.frombuffer(bytearray(q.encode(gate_up, down)), dtype=torch.uint8)
    g, _ = q.weights(slot)
    assert isinstance(g, QuantLinear)
    x = torch.randn(5, 64, generator=gen).to(dtype)
    want = ReferenceLinear(q.stored(slot)[0])(x.float())
    assert float((g(x).float() - want).norm()) < 0.02 * float(want.norm())
    assert q.record_nbytes < (128 * 64 + 64 * 64) * 2  # fewer bytes than the bf16 expert


def test_int4_takes_any_multiple_of_32():
    assert quantizable(4, 64, 32) is None and quantizable(4, 96, 32) is None
    assert "multiples of 32" in quantizable(4, 96, 48)
    assert quantizable(8, 96, 48) is None


@pytest.fixture(scope="module")
def stores(tmp_ckpt_dir):
    ckpt = make_checkpoint("qwen3_moe", tmp_ckpt_dir)
    out = {}
    for bits in ("8", "4", "auto"):
        out[bits] = tmp_ckpt_dir / f"qwen3_moe-int{bits}.experts"
        convert_expert_store(ckpt, out[bits], "float32", bits, auto_plan(ckpt, "float32") if bits == "auto" else None)
    return ckpt, out


def test_convert_stores_the_chosen_bits_and_fewer_bytes(tmp_ckpt_dir, stores):
    ckpt, folders = stores
    _, dense = make_store("qwen3_moe", tmp_ckpt_dir)
    sizes = {b: StoreIndex.load(f).total_nbytes for b, f in folders.items()}
    assert sizes["4"] < sizes["8"] < StoreIndex.load(dense).total_nbytes
    bits = [r.bits for recs in StoreIndex.load(folders["auto"]).experts.values() for r in recs]
    assert bits.count(4) > 0 and bits.count(8) > 0 and sizes["4"] < sizes["auto"] < sizes["8"]
    with pytest.raises(InvalidRequest, match="expert bits"):
        convert_expert_store(ckpt, tmp_ckpt_dir / "x", "float32", "3")


@pytest.mark.parametrize("bits", ["8", "4", "auto"])
def test_store_serves_the_dequantized_experts(stores, bits):
    ckpt, folders = stores
    cfg = ModelConfig.from_hf(ckpt)
    resident = load_model(cfg, torch.float32, torch.device("cpu"), 64)
    shape = ([0, 1], 8, 2)
    index = StoreIndex.load(folders[bits])
    store = ExpertStore(folders[bits], cfg, torch.float32, 2 * index.slot_nbytes + 100_000, LRUPolicy(*shape))
    try:
        for layer in (0, 1):
            for i, g, d in store.weights(layer, list(range(8))):
                w_g, w_d = resident.layers[layer].mlp.experts.gate_up[i], resident.layers[layer].mlp.experts.down[i]
                q = index.layout.format_of(index.experts[layer][i])
                want_g, want_d = q.unpack(torch.frombuffer(bytearray(q.encode(w_g, w_d)), dtype=torch.uint8),
                                          torch.empty_like(w_g), torch.empty_like(w_d))
                assert torch.equal(g.dequantize(torch.empty_like(w_g)), want_g)
                assert torch.equal(d.dequantize(torch.empty_like(w_d)), want_d)
        check_store_clean(store, 2 * index.slot_nbytes + 100_000)
    finally:
        store.close()


def test_int8_store_generates_close_to_the_resident_model(stores):
    ckpt, folders = stores
    prompts = random_prompts(4, [3, 9, 17, 30], ModelConfig.from_hf(ckpt).vocab_size, seed=3)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run(**options):
        with LLM(str(ckpt), dtype="float32", kv_cache_memory="4M", **options) as llm:
            return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                  use_tqdm=False)]
    want = run()
    got = run(expert_store=str(folders["8"]), expert_cache_memory=3 * StoreIndex.load(folders["8"]).slot_nbytes
              + 64 * 1024)
    first_tokens_equal = sum(g[0] == w[0] for g, w in zip(got, want))
    assert first_tokens_equal >= 3, (got, want)


def test_a_store_of_the_old_packing_asks_for_a_new_convert(tmp_path, stores):
    """Format-2 stores held int4 in torch's AVX-512 packing: read on another CPU they computed garbage. Refused."""
    old = tmp_path / "old.experts"
    shutil.copytree(stores[1]["4"], old)
    index = json.loads((old / "index.json").read_text())
    (old / "index.json").write_text(json.dumps({**index, "version": 2}))
    with pytest.raises(ModelLoadError, match="re-run `ferry convert"):
        StoreIndex.load(old)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_record_converted_on_one_path_runs_on_every_other(bits):
    """The same record bytes whatever the level that wrote it, and the same results whatever the level reading it
    (to float32 rounding): a store copied to a machine of another CPU computes what it computed here."""
    gen = torch.Generator().manual_seed(11)
    gate_up, down, x = torch.randn(128, 64, generator=gen), torch.randn(64, 64, generator=gen), torch.randn(3, 64)
    q = QuantLayout(bits, 32, 64, 64)
    records, outs = {}, {}
    for level in LEVELS:
        with forced_isa(level):
            records[level] = q.encode(gate_up, down)
    assert len(set(records.values())) == 1
    slot = torch.frombuffer(bytearray(records["portable"]), dtype=torch.uint8)
    for level in LEVELS:
        with forced_isa(level):
            g, d = q.weights(slot)
            outs[level] = d(g(x)[:, :64])
    for level in LEVELS:
        torch.testing.assert_close(outs[level], outs["portable"], atol=1e-5 * float(outs["portable"].abs().max()),
                                   rtol=1e-5)
