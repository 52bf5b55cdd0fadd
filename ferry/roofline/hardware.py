"""This machine's roofline: DRAM read bandwidth, peak GEMM throughput per dtype and the cost of one op dispatch,
measured once at the engine's thread count and cached in the ferry cache dir (FERRY_CACHE_DIR, else
~/.cache/ferry) under a key of CPU model, instruction-set level and flags, threads and torch version.

A `HardwareProfile` is plain data: the analysis takes one as an argument, so tests pass a small fake one instead
of measuring."""
from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ferry.ops import cpu
from ferry.ops.build import build_dir
from ferry.ops.gemv import linear
from ferry.roofline.kernels import (attention_us, interpolate, linear_gflops, linear_stream, time_per_call,
                                    vector_gbs)

PROFILE_VERSION = 7  # bump when what is measured, or how, changes: old cache entries are then ignored


@dataclass(frozen=True)
class HardwareProfile:
    cpu: str  # CPU model name
    isa: str  # ferry's instruction-set level in force (FERRY_ISA lowers it)
    threads: int
    torch: str
    read_gbs: float  # DRAM read bandwidth, GB/s (1e9), median of several runs over a buffer far above the LLC
    peak_gflops: dict[str, float]  # dtype -> peak GEMM GFLOP/s (1e9): float32, bfloat16, and int8 where torch has one
    bf16_native: bool  # the CPU computes bfloat16 dot products itself (AVX512_BF16 / AMX); else emulated
    dispatch_us: float = 0.0  # one small kernel call on the thread pool from Python (a linear's floor), microseconds
    call_us: float = 0.0  # one small single-threaded op from Python (a decode row's norm's floor); 0: dispatch_us
    notes: tuple[str, ...] = field(default_factory=tuple)
    # dtype -> {rows: GFLOP/s} of the engine's own linear (ferry.ops.gemv.linear: the decode kernel up to its
    # MAX_M rows, torch's GEMM above) on a weight that stays in cache: what a linear of that many rows can reach
    linear_gflops: dict[str, dict[int, float]] = field(default_factory=dict)
    # dtype -> {rows: (us per call, ns per weight byte)} of the engine's linear streaming its weights from DRAM, fitted
    # over two weight sizes (kernels.py): what a decode step's linears really cost, overlap of reads and compute and
    # each call's ramp-up included
    linear_stream: dict[str, dict[int, tuple[float, float]]] = field(default_factory=dict)
    # dtype -> GB/s the engine's elementwise kernels (add + RMSNorm, SiLU-and-multiply) move on prefill-sized rows
    vector_gbs: dict[str, float] = field(default_factory=dict)
    # dtype -> {"decode": us per request and layer, "prefill": us per prompt and layer} of the engine's attention
    attention_us: dict[str, dict[str, float]] = field(default_factory=dict)

    def peak(self, dtype: str, rows: int = 0) -> float:
        """FLOP/s of a GEMM in `dtype` (falls back to float32 where that dtype was not measured); with rows, of the
        engine's linear over that many rows of x (interpolated between the measured counts, log-linearly)."""
        table = self.linear_gflops.get(dtype)
        if rows and table:
            return interpolate({int(k): v for k, v in table.items()}, rows) * 1e9
        return self.peak_gflops.get(dtype, self.peak_gflops["float32"]) * 1e9

    def streamed(self, dtype: str, rows: int) -> tuple[float, float] | None:
        """(seconds per call, seconds per weight byte) of the engine's linear over `rows` rows with its weight in
        DRAM; None past the measured rows (compute-bound there: peak(dtype, rows) applies) or where not measured."""
        table = {int(k): v for k, v in self.linear_stream.get(dtype, {}).items()}
        if not table or not rows or rows > max(table):
            return None
        call = interpolate({k: v[0] for k, v in table.items()}, rows)
        per_byte = interpolate({k: v[1] for k, v in table.items()}, rows)
        return call * 1e-6, per_byte * 1e-9

    @property
    def bandwidth(self) -> float:
        """Bytes/s."""
        return self.read_gbs * 1e9

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "HardwareProfile":
        d = dict(d)
        d["notes"] = tuple(d.get("notes", ()))
        return cls(**d)


def cache_key(cpu_name: str, isa: str, flags: frozenset[str] | set[str], threads: int, torch_version: str) -> str:
    """What a measurement depends on; a change in any of them measures again."""
    text = "\n".join([f"v{PROFILE_VERSION}", cpu_name, isa, " ".join(sorted(flags)), str(threads), torch_version])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(key: str) -> Path:
    return build_dir().parent / "roofline" / f"hardware-{key}.json"


def load_or_measure(threads: int | None = None, remeasure: bool = False,
                    progress: Callable[[str], None] = lambda msg: None) -> HardwareProfile:
    """The cached profile for this machine at `threads` (default: torch's), measured first if missing or asked."""
    threads = threads or torch.get_num_threads()
    key = cache_key(cpu.model_name(), cpu.isa().label, cpu.cpu_flags(), threads, torch.__version__)
    path = cache_path(key)
    if path.is_file() and not remeasure:
        try:
            return HardwareProfile.from_json(json.loads(path.read_text()))
        except (ValueError, TypeError, KeyError):
            progress(f"ignoring an unreadable cached profile {path}")
    profile = measure(threads, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile.to_json(), indent=2))
    tmp.replace(path)
    progress(f"saved {path}")
    return profile


def measure(threads: int, progress: Callable[[str], None] = lambda msg: None, runs: int = 5) -> HardwareProfile:
    """Measure now (a few seconds): bandwidth, GEMM peaks, dispatch cost, at `threads` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        progress(f"read bandwidth ({threads} threads)...")
        gbs = read_bandwidth_gbs(runs=runs)
        peaks, notes = {}, []
        for dtype in ("float32", "bfloat16"):
            progress(f"peak {dtype} GEMM...")
            peaks[dtype] = gemm_gflops(getattr(torch, dtype), runs=max(3, runs // 2))
        progress("peak int8 GEMM...")
        int8 = int8_gemm_gflops(runs=max(3, runs // 2))
        if int8 is None:
            notes.append("no int8 GEMM in this torch (torch._int_mm): int8/int4 weights are costed at bfloat16's peak")
        else:
            peaks["int8"] = int8
        progress("small kernel call cost...")
        disp, call = dispatch_us(), call_us()
        progress("the engine's linear by rows, on cached and on streamed weights...")
        by_rows = {dtype: linear_gflops(getattr(torch, dtype), disp) for dtype in ("float32", "bfloat16")}
        stream = {dtype: linear_stream(getattr(torch, dtype)) for dtype in ("float32", "bfloat16")}
        vector = {dtype: vector_gbs(getattr(torch, dtype)) for dtype in ("float32", "bfloat16")}
        attention = {dtype: attention_us(getattr(torch, dtype)) for dtype in ("float32", "bfloat16")}
    finally:
        torch.set_num_threads(before)
    native = cpu.isa() >= cpu.Isa.AVX512_BF16 or "amx_bf16" in cpu.cpu_flags()
    if not native:
        notes.append("bfloat16 is emulated on this CPU (no AVX512_BF16/AMX)")
    return HardwareProfile(cpu=cpu.model_name(), isa=cpu.isa().label, threads=threads, torch=torch.__version__,
                           read_gbs=gbs, peak_gflops=peaks, bf16_native=native, dispatch_us=disp, call_us=call,
                           notes=tuple(notes), linear_gflops=by_rows, linear_stream=stream, vector_gbs=vector,
                           attention_us=attention)


def _llc_bytes() -> int:
    """The largest cache the OS reports (bytes); 64 MiB when it reports none."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            best = max(best, int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0))
        except (OSError, ValueError):
            continue
    return best or 64 << 20


def read_bandwidth_gbs(runs: int = 7, size: int | None = None) -> float:
    """GB/s of streaming a float32 buffer ~4x the LLC (at least 1 GiB, at most 2 GiB) once at torch's thread count,
    by the fastest of three readers: sum(), a matrix-vector product, and ferry's decode linear (the GEMV kernel where
    it runs here): the best a decode step could stream. Median of `runs` per reader after a first-touch pass."""
    size = size or min(max(4 * _llc_bytes(), 1 << 30), 2 << 30)
    cols = 4096
    buf = torch.ones(size // 4 // cols, cols, dtype=torch.float32)
    x = torch.ones(1, cols, dtype=torch.float32)
    readers = {"sum": buf.sum, "mv": lambda: torch.mv(buf, x[0]), "linear": lambda: linear(x, buf)}
    best = 0.0
    for read in readers.values():
        read()
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            read()
            times.append(time.perf_counter() - t)
        best = max(best, buf.numel() * 4 / statistics.median(times) / 1e9)
    del buf
    return best


def gemm_gflops(dtype: torch.dtype, n: int = 1024, runs: int = 4) -> float:
    """GFLOP/s of a square n x n x n GEMM in dtype (compute-bound: the matrices fit in the LLC)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n ** 3 / time_per_call(lambda: torch.mm(a, b), runs) / 1e9


def int8_gemm_gflops(n: int = 1024, runs: int = 4) -> float | None:
    """int8 x int8 -> int32 GEMM GOP/s through torch._int_mm, or None where this torch has none on CPU."""
    mm = getattr(torch, "_int_mm", None)
    if mm is None:
        return None
    a = torch.randint(-8, 8, (n, n), dtype=torch.int8)
    b = torch.randint(-8, 8, (n, n), dtype=torch.int8)
    try:
        mm(a, b)
    except (RuntimeError, NotImplementedError):
        return None
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def dispatch_us(calls: int = 400) -> float:
    """Microseconds of one small kernel call from Python: ferry's decode linear on a 512 x 512 float32 weight that
    sits in cache (its arithmetic is ~0.1 us), so what is left is the call, the thread pool's wake-up and barrier:
    the floor of any operator. On a loaded machine the barrier waits for descheduled threads and this grows."""
    w, x = torch.randn(512, 512), torch.randn(1, 512)
    for _ in range(50):
        linear(x, w)
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            linear(x, w)
        samples.append((time.perf_counter() - t) / calls)
    return statistics.median(samples) * 1e6


def call_us(calls: int = 2000) -> float:
    """Microseconds of one tiny single-threaded op called from Python (no thread pool: below its grain size)."""
    x = torch.ones(64)
    for _ in range(100):
        x.add(1.0)
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            x.add(1.0)
        samples.append((time.perf_counter() - t) / calls)
    return statistics.median(samples) * 1e6
