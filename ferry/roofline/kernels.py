"""The engine's own kernels measured on this machine, for the roofline: its linear at each number of rows of x,
on a weight that stays in cache (linear_gflops: the compute rate) and streaming weights from DRAM (linear_stream:
per call and per weight byte, fitted over two weight sizes, so small and large weights are both priced); the rate
its elementwise kernels move prefill-sized activations at (vector_gbs); and its attention per request or prompt
at small sizes (attention_us). A decode step's linears stream from DRAM at a few rows, and its attention and
elementwise work is a string of small calls: there reads, compute and call costs overlap in ways a bandwidth and
a peak alone do not predict."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from ferry.ops.gemv import linear

LINEAR_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048)  # rows of x at which the cached-weight rate is measured
STREAM_ROWS = (1, 2, 4, 8, 16, 32)  # rows at which streamed weights are timed (past them: compute-bound)
STREAM_SIZES = (2 << 20, 16 << 20)  # weight bytes of the two shapes the per-call / per-byte fit uses
STREAM_TOTAL = 1 << 30  # bytes of weights cycled through per size: far above the LLC, so each read is from DRAM
K = 1024  # inputs of every timed weight


def interpolate(table: dict[int, float], rows: int) -> float:
    """table's value at rows, linear in log(rows) between the two measured counts around it (clamped at the ends)."""
    keys = sorted(table)
    if rows <= keys[0]:
        return table[keys[0]]
    if rows >= keys[-1]:
        return table[keys[-1]]
    hi = next(k for k in keys if k >= rows)
    lo = keys[keys.index(hi) - 1]
    if hi == rows:
        return table[hi]
    f = (math.log(rows) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return table[lo] + f * (table[hi] - table[lo])


def linear_gflops(dtype: torch.dtype, call_us: float, n: int = 8192, k: int = 1024,
                  runs: int = 3) -> dict[int, float]:
    """GFLOP/s of the engine's linear (ferry.ops.gemv.linear) at each of LINEAR_ROWS rows of x, on an n x k weight
    that stays in cache, the cost of the call itself (call_us, which the roofline adds per call) taken out: its
    compute, not DRAM (the roofline adds the bytes itself)."""
    w = torch.randn(n, k).to(dtype)
    out = {}
    for rows in LINEAR_ROWS:
        x = torch.randn(rows, k).to(dtype)
        seconds = time_per_call(lambda: linear(x, w), runs, 0.02)
        out[rows] = 2 * rows * n * k / max(seconds - call_us * 1e-6, 1e-7) / 1e9
    return out


def linear_stream(dtype: torch.dtype, runs: int = 3) -> dict[int, tuple[float, float]]:
    """{rows: (us per call, ns per weight byte)} of the engine's linear cycling through STREAM_TOTAL bytes of
    weights of each STREAM_SIZES size (each call reads its weight from DRAM), fitted t = a + b x bytes per rows."""
    times: dict[int, list[float]] = {rows: [] for rows in STREAM_ROWS}
    item = torch.empty(0, dtype=dtype).element_size()
    for size in STREAM_SIZES:
        ws = [torch.full((size // (K * item), K), 0.01, dtype=dtype) for _ in range(STREAM_TOTAL // size)]
        for rows in STREAM_ROWS:
            x = torch.full((rows, K), 0.5, dtype=dtype)
            per_call = []
            for _ in range(runs + 1):  # the first pass warms up
                t = time.perf_counter()
                for w in ws:
                    linear(x, w)
                per_call.append((time.perf_counter() - t) / len(ws))
            times[rows].append(statistics.median(per_call[1:]))
        del ws
    (s1, s2), out = STREAM_SIZES, {}
    for rows, (t1, t2) in times.items():
        per_byte = max((t2 - t1) / (s2 - s1), 1e-15)
        out[rows] = (max(t1 - per_byte * s1, 0.0) * 1e6, per_byte * 1e9)
    return out


def repetitions(fn: Callable[[], object], target_s: float = 0.05) -> int:
    """Calls of fn that take about target_s."""
    t = time.perf_counter()
    fn()
    return max(1, int(target_s / max(time.perf_counter() - t, 1e-6)))


def time_per_call(fn: Callable[[], object], runs: int, target_s: float = 0.05) -> float:
    """Median seconds of one call of fn over `runs` timed batches of about target_s each, after a warm-up call."""
    fn()
    reps = repetitions(fn, target_s)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps)
    return statistics.median(times)


def vector_gbs(dtype: torch.dtype, rows: int = 512, width: int = 4864, runs: int = 5) -> float:
    """GB/s the engine's elementwise kernels move over a prefill-sized activation (rows x width): SiLU-and-multiply
    of [rows, 2 width] and residual add + RMSNorm of [rows, width], bytes read and written over their time."""
    from ferry.ops.fused import add_rms_norm, silu_mul
    gate_up = torch.randn(rows, 2 * width).to(dtype)
    x, res, w = torch.randn(rows, width).to(dtype), torch.randn(rows, width).to(dtype), torch.ones(width).to(dtype)
    item = gate_up.element_size()
    moved = rows * width * item * (3 + 4)  # silu_mul: read 2, write 1; add + norm: read 2, write 2

    def both() -> None:
        silu_mul(gate_up)
        add_rms_norm(x, res, w, 1e-6)
    return moved / time_per_call(both, runs) / 1e9


def attention_us(dtype: torch.dtype, batch: int = 16, ctx: int = 128, prompt: int = 32, heads: int = 14,
                 kv_heads: int = 2, head_dim: int = 64, bs: int = 16, runs: int = 5) -> dict[str, float]:
    """Microseconds of the engine's attention per request and layer at small sizes, where its calls and per-request
    work, not bytes or FLOPs, set the time: "decode" the paged decode kernel over `batch` requests of `ctx` cached
    tokens (per request), "prefill" one prompt of `prompt` tokens through the model's prefill path (ferry/models/
    layers/attention.py: to float32, SDPA, back)."""
    from ferry.models.layers.attention import prefill_attention
    from ferry.ops.paged_attention import paged_decode_attention
    nb = -(-ctx // bs)
    k_cache = torch.randn(batch * nb, bs, kv_heads, head_dim).to(dtype)
    v_cache = torch.randn(batch * nb, bs, kv_heads, head_dim).to(dtype)
    tables = torch.arange(batch * nb, dtype=torch.int64).view(batch, nb)
    lens = torch.full((batch,), ctx, dtype=torch.int64)
    q = torch.randn(batch, heads, head_dim).to(dtype)
    qp, kp, vp = (torch.randn(prompt, h, head_dim).to(dtype) for h in (heads, kv_heads, kv_heads))

    def decode() -> None:
        paged_decode_attention(q, k_cache, v_cache, tables, lens, None, 0.125).to(dtype)

    def prefill() -> None:
        prefill_attention(qp, kp, vp, None, 0.125).to(dtype)
    return {"decode": time_per_call(decode, runs, 0.02) / batch * 1e6,
            "prefill": time_per_call(prefill, runs, 0.02) * 1e6}
