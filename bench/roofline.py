"""Roofline: does ferry's per-operator roofline model (ferry/roofline/) predict the step time it measures?

Question: for decode and prefill at batch 1 and 16, is the predicted step time (sum over operators of
max(bytes / measured read bandwidth, FLOPs / measured GEMM peak) + calls x the measured cost of one)
within 25% of the measured step time? Each case records predicted and measured step time, their ratio, and
every operator's row (where a miss comes from). The hardware profile is measured once per run (not the cache:
`--cached-hardware` reuses it). Prefill is B prompts of --prompt-len tokens in one step; decode is B requests
with --kv-len tokens of KV each.

    python -m bench roofline                       # qwen2.5-0.5b and llama-1b, float32 + bfloat16, B = 1, 16
    python -m bench roofline --models qwen2.5-0.5b --dtypes bfloat16
    python -m bench roofline --smoke               # tiny model, 1 thread (< 1 min), bench/.cache/smoke/
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from bench.common import SMOKE, RESULTS, new_record, save
from bench.models import resolve


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="ferry bench roofline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-0.5b,llama-1b", help="bench/models.py shapes or folders")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=32, help="prefill tokens per request")
    ap.add_argument("--kv-len", type=int, default=128, help="decode: KV tokens per request")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed (and as many profiled) steps per case")
    ap.add_argument("--cached-hardware", action="store_true", help="reuse the cached hardware profile")
    ap.add_argument("--note", default=None, help="a sentence printed with the table (e.g. what else ran on the machine)")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 1 thread, few steps")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.dtypes, args.batch_sizes, args.prompt_len, args.kv_len = "tiny-llama", "float32", "1,2", 16, 16
        args.threads, args.steps = 1, 2
    return args


def main(argv: list[str] | None = None) -> None:
    import torch

    from ferry.roofline.analysis import Workload
    from ferry.roofline.hardware import load_or_measure
    from ferry.roofline.report import plot
    from ferry.roofline.run import roofline, to_json
    args = parse(argv)
    torch.set_num_threads(args.threads)
    say = lambda msg: print(f"roofline: {msg}", file=sys.stderr, flush=True)  # noqa: E731
    hw = load_or_measure(args.threads, remeasure=not (args.cached_hardware or args.smoke), progress=say)
    record = new_record("roofline", "predicted step time within 25% of measured, decode and prefill, batch 1 and 16",
                        args)
    record.update(hardware=hw.to_json(), cases=[], models={}, load_average_before=os.getloadavg())
    if args.note:
        record["note"] = args.note
    folder = SMOKE if args.smoke else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    for name in args.models.split(","):
        path = resolve(name)
        loads = [Workload(phase, b, args.prompt_len, args.kv_len, dtype)
                 for dtype in args.dtypes.split(",") for phase in ("prefill", "decode") for b in batches]
        results = roofline(str(path), loads, hw, steps=args.steps, progress=say)
        record["models"][name] = to_json(results)
        record["cases"] += [case(name, r) for r in results]
        for c in record["cases"][-len(results):]:
            say(line(c))
        plot(results, hw, folder / f"roofline-{name}.png")
    save("roofline", record, args.smoke)
    plot_cases(record, folder / "roofline.png")
    for c in record["cases"]:
        print(line(c))


def line(c: dict) -> str:
    return (f"{c['model']:>14} {c['dtype']:>8} {c['phase']:>7} B={c['batch_size']:<3} predicted "
            f"{c['predicted_s'] * 1e3:9.2f} ms  measured {c['measured_s'] * 1e3:9.2f} ms  ratio {c['ratio']:.2f}"
            f"  largest miss: {c['worst_op']}")


def case(model: str, result: dict) -> dict:
    """One row of the scenario: the step's predicted/measured, and the operator whose miss is largest in time."""
    w, step = result["workload"], result["rows"][-1]
    ops = [r for r in result["rows"][:-1] if r["measured_s"] is not None]
    worst = max(ops, key=lambda r: abs(r["measured_s"] - r["predicted_s"]), default=None)
    ratio = step["predicted_s"] / step["measured_s"] if step["measured_s"] else math.nan
    return {"model": model, "phase": w["phase"], "batch_size": w["batch_size"], "dtype": w["dtype"],
            "prompt_len": w["prompt_len"], "kv_len": w["kv_len"], "predicted_s": step["predicted_s"],
            "measured_s": step["measured_s"], "ratio": ratio, "within_25pct": abs(ratio - 1) <= 0.25,
            "worst_op": worst["op"] if worst else None}


def plot_cases(record: dict, path) -> None:
    """Predicted / measured step time per case (1 is a perfect model; the band is the 25% target)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = record["cases"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(cases)), 4.2))
    ax.axhspan(0.75, 1.25, color="green", alpha=0.12, label="within 25%")
    ax.axhline(1.0, color="green", lw=0.8)
    ax.bar(range(len(cases)), [c["ratio"] for c in cases], color=["C0" if c["phase"] == "decode" else "C1" for c in cases])
    ax.set_xticks(range(len(cases)), [f"{c['model']}\n{c['dtype']}\n{c['phase']} B={c['batch_size']}" for c in cases],
                  fontsize=6)
    ax.set_ylabel("predicted / measured step time")
    hw = record["hardware"]
    ax.set_title(f"roofline model vs measured: {hw['cpu']}, {hw['threads']} threads, read {hw['read_gbs']:.1f} GB/s",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()


def section(record: dict) -> str:
    """docs/roofline.md's block: a row per case, then the machine and how to reproduce it."""
    hw = record["hardware"]
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in hw["peak_gflops"].items())
    head = ["model", "dtype", "step", "batch", "predicted ms", "measured ms", "predicted / measured", "within 25%",
            "largest miss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in record["cases"]:
        what = f"prefill {c['prompt_len']}" if c["phase"] == "prefill" else f"decode, KV {c['kv_len']}"
        lines.append("| " + " | ".join([c["model"], c["dtype"], what, str(c["batch_size"]),
                                        f"{c['predicted_s'] * 1e3:.2f}", f"{c['measured_s'] * 1e3:.2f}",
                                        f"{c['ratio']:.2f}", "yes" if c["within_25pct"] else "no",
                                        c["worst_op"] or "—"]) + " |")
    met = sum(c["within_25pct"] for c in record["cases"])
    argv = record["machine"].get("argv", [])
    rest = argv[argv.index("roofline") + 1:] if "roofline" in argv else []
    return ("### Roofline model against the measured step\n\n"
            f"{met} of {len(record['cases'])} cases within 25%. Measured on {hw['cpu']} ({hw['isa']}), "
            f"{hw['threads']} threads, commit `{record['machine'].get('git', '?')}`: read bandwidth "
            f"{hw['read_gbs']:.1f} GB/s, GEMM GFLOP/s {peaks}, {hw['dispatch_us']:.1f} us per call on the thread pool, "
            f"{hw.get('call_us', 0.0):.1f} us per small single-threaded call. "
            "Predicted: the sum over operators of max(bytes / bandwidth, FLOPs / peak) + calls; measured: "
            "median wall time of the step; largest miss: the operator whose predicted and measured times differ most."
            + (f" **{record['note']}**" if record.get("note") else "") + "\n\n" + "\n".join(lines)
            + f"\n\nReproduce: `python -m bench roofline {' '.join(rest)}`".rstrip() + " (results in "
            "`bench/results/roofline.json`; per-operator rows per case in its `models` field)."
            "\n\n![](bench/results/roofline.png)")
