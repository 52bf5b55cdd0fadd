"""`python -m bench verify-cost`: what verifying draft tokens costs on the bench's model shapes, and the speed-up
that cost predicts at the acceptance `bench speculative` measured on the in-house pair (issue 20).

On ferry-tiny a step costs Python overhead more than weight reads, so its speed-ups say little about real models.
Here a real step of the Qwen2.5-0.5B and Llama-1B shapes (random weights, bench/models.py) is timed with B
decoding requests that each verify k draft tokens (k + 1 rows each; k = 0 is plain decode), B = 1 and 16,
k = 0..8: cost(k) = step time / step time at k = 0. The drafts come from a proposer that always guesses k tokens
(the step's work does not depend on whether they are accepted), and the rows-per-step cap that keeps greedy
output exact (ferry/engine/speculation.py: exact_rows) is lifted: this measures cost, not output.

Predicted speed-up at acceptance rate a and draft length k (each draft accepted with probability a, independently,
as in Leviathan et al.): tokens per step E(a, k) = (1 - a^(k+1)) / (1 - a), speed-up E(a, k) / cost(k), best k
reported. A draft model adds k of its own steps, each costing its share of the target's weight bytes (the
in-house pair's ratio, ferry-tiny-draft / ferry-tiny: `draft_ratio`), as on a bandwidth-bound CPU: speed-up
E(a, k) / (cost(k) + k x draft_ratio). With bench/results/speculative.json present, each measured method's
acceptance gets its predicted speed-up beside the one measured on ferry-tiny.

    python -m bench verify-cost                 # ~15 min; bench/results/verify_cost.json
    python -m bench verify-cost --smoke         # a tiny shape, B = 1 and 2, k = 0..2
    python -m bench verify-cost --predict-only  # the same curves, predictions from a newer speculative.json"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, measured_on, new_record, result_path


class AlwaysK:
    """Guesses k tokens for every request (its last token repeated): a verification step of exactly k + 1 rows."""

    name = "always"

    def __init__(self, k: int) -> None:
        self.k = k

    def propose(self, reqs, max_tokens) -> list[list[int]]:
        return [[r.all_token_ids[-1]] * min(self.k, m) for r, m in zip(reqs, max_tokens)]

    def observe(self, req, num_new_tokens: int) -> None:
        pass

    def release(self, req_id: str) -> None:
        pass


def step_times(model: Path, batch: int, ks: list[int], args) -> dict[int, list[float]]:
    """Median-able step times per k, one engine per k (the speculator's draft length is fixed at build)."""
    from ferry import LLM, SamplingParams
    out: dict[int, list[float]] = {}
    for k in ks:
        opts = dict(threads=args.threads, max_num_seqs=batch, enable_prefix_caching=False, dtype=args.dtype,
                    kv_cache_memory="2G")
        if k:
            opts.update(speculative_method="ngram", num_speculative_tokens=k)
        llm = LLM(str(model), **opts)
        eng = llm.engine
        if k:
            eng.use_proposer(AlwaysK(k), exact_rows_only=False)
        rng = random.Random(0)
        vocab = llm.view().vocab_size
        params = SamplingParams(max_tokens=(args.steps + 4) * (k + 1) + 8, temperature=0, ignore_eos=True)
        for i in range(batch):
            eng.add_request(f"v{k}-{i}", [rng.randrange(3, vocab) for _ in range(args.context)], params)
        while llm.view().num_waiting or not all(r.decoding for r in llm.view().running):
            eng.step()
        eng.step()  # warm-up
        runs = []
        for _ in range(args.steps):
            t = time.perf_counter()
            eng.step()
            runs.append(time.perf_counter() - t)
        out[k] = runs
        print(f"  {model.name} B={batch} k={k}: {1000 * statistics.median(runs):.1f} ms/step", flush=True)
        del llm, eng
    return out


def tokens_per_step(a: float, k: int) -> float:
    return k + 1.0 if a >= 1.0 else (1 - a ** (k + 1)) / (1 - a)


def draft_ratio() -> float:
    """A draft token's cost in target steps for a bandwidth-bound pair of the in-house pair's proportions: the
    draft's weight bytes over the target's (ferry-tiny-draft / ferry-tiny)."""
    assets = Path(__file__).resolve().parents[1] / "ferry" / "assets"
    size = {m: sum(f.stat().st_size for f in (assets / m).glob("*.safetensors")) for m in ("ferry-tiny", "ferry-tiny-draft")}
    return size["ferry-tiny-draft"] / size["ferry-tiny"]


def predictions(cost: dict[int, float], measured: dict, per_draft: float) -> list[dict]:
    """For every (workload, concurrency, method) of bench/results/speculative.json: predicted vs measured. A draft
    model's k steps cost k x per_draft target steps on top of the verification; n-gram and phrase lookups cost
    microseconds (left out)."""
    rows = []
    for case in measured.get("cases", []):
        for method, entry in case["engines"].items():
            a = entry.get("acceptance_rate")
            if a is None or method.startswith("llama.cpp"):
                continue
            extra = per_draft if method == "draft" else 0.0
            speed = {k: tokens_per_step(a, k) / (cost[k] + k * extra) for k in cost}
            best = max(speed, key=speed.get)
            rows.append({"workload": case["workload"], "concurrency": case["concurrency"], "method": method,
                         "acceptance_rate": a, "best_k": best, "predicted": speed[best],
                         "measured_on_ferry_tiny": case["ratios"].get(method, {}).get("median")})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench verify-cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="qwen2.5-0.5b,llama-1b")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--max-k", type=int, default=8)
    ap.add_argument("--context", type=int, default=256, help="prompt tokens of every request")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--predict-only", action="store_true",
                    help="keep the timed curves of bench/results/verify_cost.json, recompute the predictions from "
                         "the current bench/results/speculative.json (after a new `speculative` run)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.max_k, args.context, args.steps = "tiny-llama", "1,2", 2, 32, 3
    from bench import models
    spec_path = RESULTS / "speculative.json"
    measured = json.loads(spec_path.read_text()) if spec_path.is_file() and not args.smoke else {}
    path = result_path("verify_cost", args.smoke)
    if args.predict_only:
        record = json.loads(path.read_text())
        record["draft_ratio"] = draft_ratio()
        record["predicted_from"] = measured.get("machine", {}).get("git")  # the speculative run's commit
        for c in record["curves"]:
            c["predicted"] = predictions({int(k): v for k, v in c["cost"].items()}, measured, record["draft_ratio"])
        path.write_text(json.dumps(record, indent=2, default=str))
        print(f"predictions in {path} recomputed from {spec_path}")
        return
    record = new_record("verify_cost", "what does a verification step of k+1 rows per request cost, and what "
                        "speed-up does that predict at the measured acceptance?", args)
    record["curves"], record["draft_ratio"] = [], draft_ratio()
    for name in args.models.split(","):
        path = models.resolve(name)
        for batch in map(int, args.batches.split(",")):
            times = step_times(path, batch, list(range(args.max_k + 1)), args)
            med = {k: statistics.median(v) for k, v in times.items()}
            cost = {k: med[k] / med[0] for k in med}
            record["curves"].append({"model": name, "batch": batch, "step_ms": {k: 1000 * v for k, v in med.items()},
                                     "cost": cost, "runs_ms": {k: [1000 * x for x in v] for k, v in times.items()},
                                     "predicted": predictions(cost, measured, record["draft_ratio"])})
    path.write_text(json.dumps(record, indent=2, default=str))
    plot(record, path.with_suffix(".png"))
    for c in record["curves"]:
        print(f"{c['model']} B={c['batch']}: cost " + " ".join(f"k{k}={v:.2f}" for k, v in c["cost"].items()))
    print(f"wrote {path}")


def plot(record: dict, path: Path) -> None:
    """Step time with k drafts per request over the plain step, per model and batch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for c in record["curves"]:
        ks = sorted(int(k) for k in c["cost"])
        ax.plot(ks, [c["cost"][k] if k in c["cost"] else c["cost"][str(k)] for k in ks], "o-",
                label=f"{c['model']}, batch {c['batch']}")
    ax.set_xlabel("draft tokens per request k (k + 1 rows each)")
    ax.set_ylabel("step time / plain decode step")
    ax.legend(fontsize=8)
    ax.set_title(f"verification cost ({record['machine'].get('cpu')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def section(record: dict) -> str:
    """docs/speculative.md's block: the cost curves, then the speed-up they predict at the measured acceptance."""
    from bench.report import command
    curves = record["curves"]
    ks = sorted(int(k) for k in curves[0]["cost"])
    cost = [{int(k): v for k, v in c["cost"].items()} for c in curves]
    lines = ["| model | batch | plain step ms | " + " | ".join(f"k={k}" for k in ks if k) + " |",
             "|" + "---|" * (2 + len(ks))]
    for c, cs in zip(curves, cost):
        step = {int(k): v for k, v in c["step_ms"].items()}
        lines.append(f"| {c['model']} | {c['batch']} | {step[0]:.1f} | "
                     + " | ".join(f"{cs[k]:.2f}" for k in ks if k) + " |")
    pred = ["| model | batch | workload, concurrency | method | acceptance | best k | predicted speed-up | "
            "measured on ferry-tiny |", "|---|---|---|---|---|---|---|---|"]
    for c in curves:
        for p in c["predicted"]:
            if p["concurrency"] != c["batch"]:
                continue
            got = p["measured_on_ferry_tiny"]
            pred.append(f"| {c['model']} | {c['batch']} | {p['workload']}, {p['concurrency']} | {p['method']} | "
                        f"{p['acceptance_rate']:.0%} | {p['best_k']} | {p['predicted']:.2f}x | "
                        f"{'—' if got is None else format(got, '.2f') + 'x'} |")
    return ("### What verification costs on real shapes\n\n"
            f"{measured_on(record)}; random weights of the shapes, {record['config']['context']}-token contexts, "
            f"median of {record['config']['steps']} steps. Step time with k drafts per request (k + 1 rows each) over "
            "the plain decode step:\n\n" + "\n".join(lines)
            + "\n\nThe speed-up those curves predict, (1 - a^(k+1)) / (1 - a) tokens per step over the step's cost at "
              "the best k, at the acceptance a that `speculative` measured on ferry-tiny (its case at the same "
              "concurrency as the curve's batch), beside the speed-up measured there. A draft model's k steps are "
              f"added at {record['draft_ratio']:.2f} of a target step each (the pair's weight bytes); n-gram and "
              "phrase lookups cost microseconds and are left out:\n\n"
            + "\n".join(pred)
            + f"\n\nReproduce: `{command(record)}` (results in `bench/results/verify_cost.json`)."
              "\n\n![](bench/results/verify_cost.png)")


if __name__ == "__main__":
    main()
