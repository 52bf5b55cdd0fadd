"""Small-M linear benchmark: torch F.linear vs ferry.ops.linear.

Decode-time linears (M = 1..16 rows) are bound by streaming the weight from
DRAM. To measure that, each weight shape is replicated into enough copies to
exceed --rotate-mb (default 320 MB, well above the 32 MB L3) and every call
uses the next copy, so weights never come from cache. F.linear,
ferry.ops.linear and a plain streaming read of the same weights (the DRAM
bandwidth available at that moment) are interleaved (A, B, R, A, B, R, ...)
for --runs runs over all copies; the median time per call is reported with
the achieved weight-streaming bandwidth (weight bytes / time), and the
speedup is the median of per-run torch/ferry time ratios.

    python bench/gemv.py --threads 2
    python bench/gemv.py --dtypes bf16 --m 1 --shapes 4864x896

Writes bench/results/gemv.json (override with --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ferry.ops import cpu, gemv  # noqa: E402

# Qwen2.5-0.5B linears, as N x K (out_features x in_features).
DEFAULT_SHAPES = ["896x896", "128x896", "4864x896", "896x4864", "32000x896"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_shape(s: str) -> tuple[int, int]:
    n, k = s.lower().split("x")
    return int(n), int(k)


def time_pass(fn, xs, ws, bs) -> float:
    """Seconds per call, one pass over all weight copies."""
    n = len(ws)
    t0 = time.perf_counter()
    for i in range(n):
        fn(xs, ws[i], bs[i] if bs is not None else None)
    return (time.perf_counter() - t0) / n


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}
    for line in info:
        if ":" in line:
            key, val = (p.strip() for p in line.split(":", 1))
            fields.setdefault(key, val)
        elif fields:
            break
    return f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def bench_case(n: int, k: int, m: int, dtype: torch.dtype, args) -> dict:
    elt = torch.tensor([], dtype=dtype).element_size()
    wbytes = n * k * elt
    copies = max(2, math.ceil(args.rotate_mb * (1 << 20) / wbytes))
    gen = torch.Generator().manual_seed(0)
    ws = [(torch.randn(n, k, generator=gen) * 0.05).to(dtype) for _ in range(copies)]
    bs = [torch.randn(n, generator=gen).to(dtype) for _ in range(copies)] if args.bias else None
    x = torch.randn(m, k, generator=gen).to(dtype)

    ref = F.linear(x.double(), ws[0].double(), bs[0].double() if bs else None)
    out = gemv.linear(x, ws[0], bs[0] if bs else None)
    err = ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()

    fns = {"torch": F.linear, "ferry": gemv.linear}
    if gemv.available():
        # Pure streaming read of the same weights: what DRAM gives right now.
        fns["read"] = lambda _x, w, _b: gemv.KERNEL.ext().stream_read(w)
    for f in fns.values():  # warm-up (first touch, thread pool)
        time_pass(f, x, ws, bs)
    ts: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.runs):  # interleaved: torch, ferry, read, torch, ...
        for name, f in fns.items():
            ts[name].append(time_pass(f, x, ws, bs))
    del ws, bs
    med = {name: statistics.median(v) for name, v in ts.items()}
    # Bandwidth drifts on shared machines; the per-run ratio of adjacent
    # measurements is steadier than the ratio of medians.
    speedup = statistics.median(a / b for a, b in zip(ts["torch"], ts["ferry"]))
    r = {
        "N": n,
        "K": k,
        "M": m,
        "dtype": str(dtype).replace("torch.", ""),
        "weight_bytes": wbytes,
        "copies": copies,
        "torch_us": med["torch"] * 1e6,
        "ferry_us": med["ferry"] * 1e6,
        "torch_gbps": wbytes / med["torch"] / 1e9,
        "ferry_gbps": wbytes / med["ferry"] / 1e9,
        "speedup": speedup,
        "kernel_used": gemv.supported_dtypes()[dtype] and m <= gemv.MAX_M[dtype],
        "max_rel_err": err,
    }
    if "read" in med:
        r["read_gbps"] = wbytes / med["read"] / 1e9
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxK weight shapes")
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="rows of x")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES))
    ap.add_argument("--runs", type=int, default=7, help="interleaved runs per case (median)")
    ap.add_argument("--rotate-mb", type=int, default=320, help="total size of rotated weight copies")
    ap.add_argument("--bias", action="store_true", help="include a bias vector")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gemv.json")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    if not gemv.available():
        print("warning: ferry kernel not available; both columns measure F.linear", file=sys.stderr)

    print(f"threads={args.threads}  isa={cpu.describe()}  kernel={gemv.available()}  dtypes={gemv.supported_dtypes()}")
    print("GB/s = weight bytes / median time per call; 'read' = a plain streaming read of the same")
    print("weights (DRAM bandwidth available at that moment); ratio = median per-run torch/ferry time\n")
    hdr = (
        f"{'dtype':5} {'N x K':>11} {'M':>3} | {'torch us':>9} {'GB/s':>6} | {'ferry us':>9} {'GB/s':>6}"
        f" | {'read':>5} | {'ratio':>5}"
    )
    print(hdr)
    print("-" * len(hdr))
    results = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for shape in args.shapes:
            n, k = parse_shape(shape)
            for m in args.m:
                r = bench_case(n, k, m, dtype, args)
                results.append(r)
                print(
                    f"{dname:5} {f'{n}x{k}':>11} {m:>3} | {r['torch_us']:9.1f} {r['torch_gbps']:6.1f} |"
                    f" {r['ferry_us']:9.1f} {r['ferry_gbps']:6.1f} | {r.get('read_gbps', float('nan')):5.1f}"
                    f" | {r['speedup']:5.2f}",
                    flush=True,
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "kernel_available": gemv.available(),
        "cpu_flags": sorted(f for f in cpu.cpu_flags() if f.startswith(("sse", "avx", "fma", "f16c", "amx", "asimd"))),
        "isa": cpu.describe(),
        "kernel_level": gemv.KERNEL.ext().isa_level() if gemv.available() else None,
        "max_m": {str(k).replace("torch.", ""): v for k, v in gemv.MAX_M.items()},
        "rotate_mb": args.rotate_mb,
        "runs": args.runs,
        "bias": args.bias,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
