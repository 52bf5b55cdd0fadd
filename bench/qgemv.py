"""Weight-only int8/int4 linear benchmark: ferry.ops.quant (qgemv kernel / dequantize + matmul) at each
instruction-set level vs torch F.linear at float32 and bfloat16, and vs ReferenceLinear (dequantize then matmul).

Each weight is replicated into enough copies to exceed --rotate-mb, every call uses the next copy, so weights
stream from DRAM as in decode. All variants of a case run interleaved (A, B, C, A, B, C, ...) for --runs rounds;
the median time per call is reported with its weight bandwidth (bytes of that variant's weight format / time:
4 B/weight f32, 2 bf16, 1 + scales int8, 0.5 + scales int4). Levels are switched in-process with FERRY_ISA (the
kernel of each level is built once). "kernel" forces the small-M kernel at the CPU's own level at every M up to
--kernel-max-m, "qmatmul" the large-M path (W dequantized per tile, float32 matmul) at every M from 16 (the two
place the crossover, qgemv.MAX_M[bits]); "ferry" is what prepare() runs (kernel up to MAX_M[bits], qmatmul above).

    python bench/qgemv.py --threads 2
    python bench/qgemv.py --m 1 16 512 --levels avx512_bf16 avx2 portable --shapes 4864x896

Writes bench/results/qgemv.json and qgemv.png (override with --out).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ferry.ops import cpu, gemv, qgemv  # noqa: E402
from ferry.ops.quant import ReferenceLinear, prepare, quantize_weight  # noqa: E402

# N x K: Qwen2.5-0.5B (qkv fused, o, gate_up fused, down) and Llama-3.2-1B (qkv, gate_up, down).
DEFAULT_SHAPES = ["1152x896", "896x896", "9728x896", "896x4864", "3072x2048", "16384x2048", "2048x8192"]
GROUPS = {8: None, 4: 32}  # None: per channel (K)


def cpu_name() -> str:
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def set_level(label: str | None) -> None:
    if label is None:
        os.environ.pop(cpu.ENV, None)
    else:
        os.environ[cpu.ENV] = label
    cpu.isa.cache_clear()


def copies_for(nbytes: int, rotate_mb: int) -> int:
    return max(2, math.ceil(rotate_mb * (1 << 20) / nbytes))


def variants(n: int, k: int, m: int, dtype: torch.dtype, args) -> dict:
    """name -> (level or None, fn(i) running copy i, weight bytes, number of copies)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, k, generator=gen) * 0.05
    x = torch.randn(m, k, generator=gen).to(dtype)
    out = {}
    for wd, name in ((torch.float32, "F.linear f32"), (torch.bfloat16, "F.linear bf16")):
        if wd != dtype and not args.cross:
            continue
        ws = [base.to(wd) for _ in range(copies_for(base.numel() * wd.itemsize, args.rotate_mb))]
        xw = x.to(wd)
        out[name] = (None, lambda i, ws=ws, xw=xw: F.linear(xw, ws[i % len(ws)]), ws[0].nbytes, len(ws))
    for bits in args.bits:
        qw0 = quantize_weight(base, bits, GROUPS[bits] or k)
        qws = [qw0] + [quantize_weight(base, bits, GROUPS[bits] or k)
                       for _ in range(copies_for(qw0.nbytes, args.rotate_mb) - 1)]
        lins = [prepare(q) for q in qws]
        for level in args.levels:
            out[f"ferry int{bits} {level}"] = (level, lambda i, lins=lins: lins[i % len(lins)](x), qw0.nbytes,
                                               len(lins))
        if m > 1 and m <= args.kernel_max_m:
            out[f"kernel int{bits}"] = (None, lambda i, qws=qws, bits=bits: qgemv.KERNEL.ext().qlinear(
                x, qws[i % len(qws)].codes, qws[i % len(qws)].scales, bits, qws[i % len(qws)].group), qw0.nbytes,
                len(qws))
        if m >= 16:
            out[f"qmatmul int{bits}"] = (None, lambda i, qws=qws, bits=bits: qgemv.KERNEL.ext().qmatmul(
                x, qws[i % len(qws)].codes, qws[i % len(qws)].scales, bits, qws[i % len(qws)].group), qw0.nbytes,
                len(qws))
        if args.reference:
            ref = ReferenceLinear(qw0)
            out[f"reference int{bits}"] = (None, lambda i, ref=ref: ref(x), qw0.nbytes, 2)
    return out


def bench_case(n: int, k: int, m: int, dtype: torch.dtype, args) -> dict:
    vs = variants(n, k, m, dtype, args)
    times: dict[str, list[float]] = {name: [] for name in vs}
    for r in range(args.runs + 1):  # round 0: warm-up (first touch, builds, thread pool)
        for name, (level, fn, _, count) in vs.items():
            set_level(level)
            t0 = time.perf_counter()
            for i in range(count):
                fn(i)
            if r:
                times[name].append((time.perf_counter() - t0) / count)
    set_level(None)
    res = {"N": n, "K": k, "M": m, "dtype": str(dtype).removeprefix("torch."), "variants": {}}
    for name, (level, _, nbytes, _) in vs.items():
        med = statistics.median(times[name])
        res["variants"][name] = {"ms": med * 1e3, "gbps": nbytes / med / 1e9, "weight_bytes": nbytes,
                                 "min_ms": min(times[name]) * 1e3, "max_ms": max(times[name]) * 1e3}
    return res


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({(r["N"], r["K"]) for r in record["results"]})
    dtypes = sorted({r["dtype"] for r in record["results"]})
    fig, axes = plt.subplots(len(dtypes), len(shapes), figsize=(max(7.0, 3.6 * len(shapes)), 3.4 * len(dtypes)),
                             squeeze=False)
    for di, dt in enumerate(dtypes):
        for si, (n, k) in enumerate(shapes):
            ax = axes[di][si]
            rows = sorted((r for r in record["results"] if (r["N"], r["K"], r["dtype"]) == (n, k, dt)),
                          key=lambda r: r["M"])
            names = sorted({v for r in rows for v in r["variants"]})
            for name in names:
                pts = [(r["M"], r["variants"][name]["ms"]) for r in rows if name in r["variants"]]
                style = "--" if "int8" in name else ":" if "reference" in name else "-"
                ax.plot(*zip(*pts), style, marker="o", markersize=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{n}x{k} x {dt}", fontsize=8)
            ax.set_xlabel("M", fontsize=7)
            ax.set_ylabel("ms per call", fontsize=7)
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1))
    meta = record["meta"]
    fig.suptitle(f"qgemv: {meta['cpu']}, {meta['threads']} threads, isa {meta['isa']} (median of {meta['runs']})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxK weight shapes")
    ap.add_argument("--m", nargs="+", type=int, default=[1, 2, 4, 8, 16, 64, 512], help="rows of x")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], help="x dtypes")
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    ap.add_argument("--levels", nargs="+", default=[i.label for i in cpu.Isa if i <= cpu.detected()],
                    help="FERRY_ISA levels to run ferry at (default: every level this CPU has)")
    ap.add_argument("--cross", action="store_true", help="also F.linear in the other float dtype")
    ap.add_argument("--reference", action="store_true", help="also ReferenceLinear (slow)")
    ap.add_argument("--kernel-max-m", type=int, default=512, help="largest M for the forced-kernel variant")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rotate-mb", type=int, default=160)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "qgemv.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    flags = sorted(f for f in cpu.cpu_flags() if f.startswith(("avx", "fma", "f16c", "amx")))
    meta = {"cpu": cpu_name(), "flags": flags, "isa": cpu.describe(), "levels": args.levels,
            "kernel_path": qgemv.path(), "threads": args.threads, "torch": torch.__version__, "runs": args.runs,
            "rotate_mb": args.rotate_mb, "max_m": qgemv.MAX_M, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if gemv.available():  # what DRAM gives right now: a streaming read of a buffer far above the L3
        buf = torch.ones(args.rotate_mb * (1 << 20) // 4)
        gemv.KERNEL.ext().stream_read(buf)
        t0 = time.perf_counter()
        gemv.KERNEL.ext().stream_read(buf)
        meta["read_gbps"] = buf.nbytes / (time.perf_counter() - t0) / 1e9
    print(json.dumps(meta))
    results = []
    for dname in args.dtypes:
        dtype = getattr(torch, dname)
        for shape in args.shapes:
            n, k = (int(v) for v in shape.lower().split("x"))
            for m in args.m:
                r = bench_case(n, k, m, dtype, args)
                results.append(r)
                cells = "  ".join(f"{name}: {v['ms']:.3f} ms {v['gbps']:.1f} GB/s" for name, v in r["variants"].items())
                print(f"{dname:8} {shape:>10} M={m:<4} {cells}", flush=True)
    record = {"meta": meta, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
