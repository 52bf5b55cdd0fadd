"""What `ferry roofline` shows: per operator (and the whole step) FLOPs, bytes, arithmetic intensity, bound,
predicted and measured time and the percent of the roofline reached (predicted / measured); a rich table, a JSON
record, and the roofline chart (log-log: the bandwidth slope, the compute ceilings, each operator a point at its
intensity and achieved FLOP/s)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

from ferry.roofline.analysis import Prediction
from ferry.roofline.hardware import HardwareProfile
from ferry.roofline.measure import REST, Measured


def rows(preds: list[Prediction], measured: Measured | None = None) -> list[dict]:
    """One dict per operator then a `step` total; measured fields are None without a measurement."""
    out = []
    for p in preds:
        m = measured.ops_s.get(p.op.name) if measured else None
        out.append(_row(p.op.name, p.op.flops, p.op.bytes, p.op.weight_bytes, p.bound, p.time_s, m))
    flops, nbytes = sum(p.op.flops for p in preds), sum(p.op.bytes for p in preds)
    weights = sum(p.op.weight_bytes for p in preds)
    bounds = {p.bound for p in preds if p.time_s >= 0.5 * max(q.time_s for q in preds)}
    out.append(_row("step", flops, nbytes, weights, "/".join(sorted(bounds)), sum(p.time_s for p in preds),
                    measured.step_s if measured else None))
    return out


def _row(name: str, flops: float, nbytes: float, weights: float, bound: str, pred: float, meas: float | None) -> dict:
    return {"op": name, "flops": flops, "bytes": nbytes, "weight_bytes": weights,
            "intensity": flops / nbytes if nbytes else math.inf, "bound": bound, "predicted_s": pred,
            "measured_s": meas, "percent_of_roofline": 100 * pred / meas if meas else None}


def _si(x: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:.3f}"


def print_table(result: dict, console=None) -> None:
    """result: run.roofline()'s dict (hardware, workload, rows)."""
    from rich.console import Console
    from rich.table import Table
    console = console or Console(width=None if sys.stdout.isatty() else 120)  # piped: wide enough for every column
    hw, w = result["hardware"], result["workload"]
    title = (f"{result['model']}: {w['phase']}, batch {w['batch_size']}, "
             + (f"prompt {w['prompt_len']}" if w["phase"] == "prefill" else f"KV {w['kv_len']}")
             + f", {w['dtype']}, quantization {w['quantization']}, KV policy {result['kv_policy']}")
    table = Table(title=title, caption=_caption(hw) + f"; {REST}+rest: sampling and the step outside the model")
    for col in ("op", "FLOPs", "bytes", "FLOP/B", "bound", "pred ms", "meas ms", "% roof"):
        table.add_column(col, justify="left" if col in ("op", "bound") else "right", no_wrap=True)
    for r in result["rows"]:
        pct = r["percent_of_roofline"]
        table.add_row(r["op"] if r["op"] != REST else f"{REST}+rest", _si(r["flops"]), _si(r["bytes"], "B"),
                      f"{r['intensity']:.3g}", r["bound"], _ms(r["predicted_s"]), _ms(r["measured_s"]),
                      "—" if pct is None else f"{pct:.0f}%", style="bold" if r["op"] == "step" else None,
                      end_section=r["op"] == REST)
    console.print(table)
    step = result["rows"][-1]
    if step["measured_s"]:
        gbs = step["weight_bytes"] / step["measured_s"] / 1e9
        console.print(f"weights streamed: {gbs:.2f} GB/s of {hw['read_gbs']:.2f} GB/s measured read bandwidth")


def _caption(hw: dict) -> str:
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in hw["peak_gflops"].items())
    return (f"{hw['cpu']} ({hw['isa']}{', bf16 native' if hw['bf16_native'] else ', bf16 emulated'}), "
            f"{hw['threads']} threads: read {hw['read_gbs']:.1f} GB/s, GEMM GFLOP/s {peaks}, "
            f"call {hw['dispatch_us']:.1f} us on the thread pool, {hw.get('call_us', 0.0):.1f} us on one thread")


def plot(results: list[dict], hw: HardwareProfile, path: str | Path) -> None:
    """The roofline chart: the read bandwidth slope up to each dtype's GEMM ceiling; each operator (and the step) a
    point at (FLOPs/byte, FLOPs/measured time), or at its predicted time where nothing was measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    xs = [r["intensity"] for res in results for r in res["rows"] if 0 < r["intensity"] < math.inf]
    lo, hi = min(xs + [0.1]) / 2, max(xs + [hw.peak("bfloat16") / hw.bandwidth]) * 4
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    for dtype, gflops in hw.peak_gflops.items():
        ax.plot(grid, [min(x * hw.bandwidth, gflops * 1e9) for x in grid], lw=1.2, label=f"{dtype} roof")
    markers = "o^sDvP"
    for i, res in enumerate(results):
        w = res["workload"]
        tag = f"{w['phase']} B={w['batch_size']} {w['dtype']}"
        for r in res["rows"]:
            t = r["measured_s"] or r["predicted_s"]
            if r["flops"] <= 0 or not t or not 0 < r["intensity"] < math.inf:
                continue
            big = r["op"] == "step"
            ax.scatter(r["intensity"], r["flops"] / t, marker=markers[i % len(markers)], s=60 if big else 22,
                       edgecolors="black" if big else "none", label=tag if big else None, alpha=0.85)
            ax.annotate(r["op"], (r["intensity"], r["flops"] / t), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOPs / byte)")
    ax.set_ylabel("FLOP/s (measured where run)")
    ax.set_title(f"{Path(results[0]['model']).name}: roofline, {hw.cpu}, {hw.threads} threads", fontsize=9)
    ax.grid(which="both", alpha=0.25)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
