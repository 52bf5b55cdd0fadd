"""bench moe-offload: the models it times, their expert stores and the prompts (see bench/moe_offload.py)."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent
WORK = ROOT / ".cache" / "moe_offload"
TRAINED = ROOT.parent / "ferry" / "assets" / "ferry-tiny-moe"
CALIBRATION_TOKENS = 2048  # held-out tokens the --expert-bits auto store's plan records the experts' inputs on
RANDOM_NAME = "olmoe-32e-1g"
RANDOM_SHAPE = dict(architectures=["OlmoeForCausalLM"], model_type="olmoe", hidden_size=1024, intermediate_size=512,
                    num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, num_experts=32,
                    num_experts_per_tok=4, norm_topk_prob=False, clip_qkv=None, max_position_embeddings=4096,
                    rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, vocab_size=32000)


def random_model(smoke: bool) -> Path:
    from bench import models
    if smoke:
        return models.build("tiny-olmoe")
    return bf16_copy(models.build(RANDOM_NAME, shape=RANDOM_SHAPE))


def bf16_copy(src: Path) -> Path:
    """The checkpoint with bfloat16 tensors (bench/models.py writes float32): the engines run bf16, and every
    worker start would otherwise read and convert twice the bytes. Built once, beside the source."""
    import torch
    from safetensors.torch import load_file, save_file
    dst = src.with_name(src.name + "-bf16")
    if (dst / "config.json").is_file():  # written last
        return dst
    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(dst / f.name))
        elif f.name != "config.json":
            shutil.copy(f, dst / f.name)
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16", "torch_dtype": "bfloat16"}, indent=2))
    return dst


def weight_bytes(model: Path, dtype_bytes: int = 2) -> tuple[int, int]:
    """(non-expert, expert) weight bytes of the checkpoint at dtype_bytes per parameter."""
    from safetensors import safe_open
    rest = experts = 0
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                n = math.prod(st.get_slice(name).get_shape()) * dtype_bytes
                if ".experts." in name or "block_sparse_moe.experts" in name:
                    experts += n
                else:
                    rest += n
    return rest, experts


def expert_store(model: Path, dtype: str, bits: str = "none", size: int | None = None) -> Path:
    """The model's expert store (bits "none": lossless, in dtype; "4": int4, lossy; "auto": each expert's format
    chosen from its recorded inputs to fit `size` bytes, lossy), converted once (again when the model's files are
    newer)."""
    from ferry.errors import ModelLoadError
    from ferry.experts.convert import convert_expert_store
    from ferry.experts.layout import StoreIndex
    name = {"none": f"{model.name}-{dtype}", "auto": f"{model.name}-{dtype}-auto{size}"}.get(bits, f"{model.name}-int{bits}")
    store = WORK / f"{name}.experts"
    newest = max(p.stat().st_mtime for p in model.glob("*") if p.is_file())
    if (store / "index.json").exists() and (store / "index.json").stat().st_mtime < newest:
        shutil.rmtree(store)
    if (store / "index.json").exists():
        try:
            StoreIndex.load(store)
            return store
        except ModelLoadError:  # an older format (e.g. version-1 int4 records): convert again
            shutil.rmtree(store)
    convert_expert_store(model, store, dtype, bits, auto_plan(model, dtype, size) if bits == "auto" else None)
    return store


def auto_plan(model: Path, dtype: str, size: int):
    """`ferry convert --expert-bits auto --expert-store-size size`'s plan: the experts' inputs recorded on the
    eval's held-out text (CALIBRATION_TOKENS of it), every expert measured at every format, formats chosen."""
    from ferry.eval.activations import record_expert_inputs
    from ferry.eval.suite import HELDOUT
    from ferry.experts.convert import plan_expert_bits
    calibration = record_expert_inputs(str(model), HELDOUT, CALIBRATION_TOKENS, 128, "float32")
    return plan_expert_bits(model, calibration, size, dtype,
                            progress=lambda line: print(f"[moe-offload] {line}", flush=True))


def prompts_random(vocab: int, batch: int, seed: int, length: int = 16) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


def prompts_text(model: Path, batch: int, seed: int, length: int = 16) -> list[list[int]]:
    """batch spans of `length` tokens of held-out text (realistic routing for a trained model)."""
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(model / "tokenizer.json")).encode(
        (ROOT.parent / "ferry" / "assets" / "heldout.txt").read_text()[:200_000]).ids
    step = max((len(ids) - length) // (4 * batch + 1), 1)
    return [ids[(seed * batch + i) * step:(seed * batch + i) * step + length] for i in range(batch)]


def disk_bandwidth(store: Path, threads: tuple[int, ...] = (1, 2, 4), passes: int = 2) -> dict:
    """The best rate at which this machine reads the store's expert records from the device: O_DIRECT reads of
    one record each (what ferry's store issues), every record of the store in random order, by 1, 2 and 4
    threads at once. The lossless bound (moe_report.add_bound) divides bytes by it."""
    import random
    import threading
    import time

    import torch

    from ferry.experts.layout import StoreIndex
    from ferry.tiers.disk import ALIGN, DirectFile
    index = StoreIndex.load(store)
    files = {layer: DirectFile(store / name) for layer, name in index.layer_files.items()}
    try:
        jobs = [(files[layer], rec.offset, index.layout.format_of(rec).record_nbytes)
                for layer, recs in index.experts.items() for rec in recs]
        best: dict[int, float] = {}
        for n in threads:
            raw = torch.empty(n * index.slot_nbytes + ALIGN, dtype=torch.uint8)
            start = (-raw.data_ptr()) % ALIGN
            bufs = [memoryview(raw[start + i * index.slot_nbytes:start + (i + 1) * index.slot_nbytes].numpy())
                    for i in range(n)]
            for p in range(passes):
                order = random.Random(p).sample(jobs, len(jobs))
                lock = threading.Lock()

                def work(buf: memoryview) -> None:
                    while True:
                        with lock:
                            if not order:
                                return
                            f, offset, nbytes = order.pop()
                        f.read_into(buf[:nbytes], offset)

                t0 = time.perf_counter()
                workers = [threading.Thread(target=work, args=(b,)) for b in bufs]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
                rate = sum(j[2] for j in jobs) / (time.perf_counter() - t0)
                best[n] = max(best.get(n, 0.0), rate)
        return {"bytes_per_s": max(best.values()), "by_threads": best, "record_bytes": index.slot_nbytes,
                "io_mode": ",".join(sorted({f.mode for f in files.values()}))}
    finally:
        for f in files.values():
            f.close()


def read_forever(store: Path, threads: int = 2) -> None:
    """O_DIRECT reads of the store's records in random order by `threads` threads, until the process is killed:
    the disk at full speed, as an offloading engine keeps it (background_reads)."""
    import random
    import threading

    import torch

    from ferry.experts.layout import StoreIndex
    from ferry.tiers.disk import ALIGN, DirectFile
    index = StoreIndex.load(store)
    files = {layer: DirectFile(Path(store) / name) for layer, name in index.layer_files.items()}
    jobs = [(files[layer], rec.offset, index.layout.format_of(rec).record_nbytes)
            for layer, recs in index.experts.items() for rec in recs]

    def work(seed: int) -> None:
        raw = torch.empty(index.slot_nbytes + ALIGN, dtype=torch.uint8)
        start = (-raw.data_ptr()) % ALIGN
        buf = memoryview(raw[start:start + index.slot_nbytes].numpy())
        rng = random.Random(seed)
        while True:
            f, offset, nbytes = rng.choice(jobs)
            f.read_into(buf[:nbytes], offset)

    workers = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    print("reading", flush=True)
    for w in workers:
        w.join()


@contextmanager
def background_reads(store: Path):
    """A separate process reading the store from the device at full speed while the block runs (read_forever)."""
    proc = subprocess.Popen([sys.executable, "-c", f"from bench.moe_setup import read_forever; "
                             f"read_forever({str(store)!r})"], cwd=ROOT.parent, stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout.readline().strip() != "reading":  # its imports (seconds of CPU) are over, reads running
            raise RuntimeError(f"the background reader of {store} exited with {proc.wait()}")
        time.sleep(0.2)
        yield
    finally:
        proc.kill()
        proc.wait()
