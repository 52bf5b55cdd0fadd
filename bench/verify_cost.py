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
reported. With bench/results/speculative.json present, each measured method's acceptance gets its predicted
speed-up beside the one measured on ferry-tiny.

    python -m bench verify-cost                 # ~15 min; bench/results/verify_cost.json
    python -m bench verify-cost --smoke         # a tiny shape, B = 1 and 2, k = 0..2"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, new_record, result_path


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


def predictions(cost: dict[int, float], measured: dict) -> list[dict]:
    """For every (workload, concurrency, method) of bench/results/speculative.json: predicted vs measured."""
    rows = []
    for case in measured.get("cases", []):
        for method, entry in case["engines"].items():
            a = entry.get("acceptance_rate")
            if a is None or method.startswith("llama.cpp"):
                continue
            best = max(cost, key=lambda k: tokens_per_step(a, k) / cost[k])
            rows.append({"workload": case["workload"], "concurrency": case["concurrency"], "method": method,
                         "acceptance_rate": a, "best_k": best, "predicted": tokens_per_step(a, best) / cost[best],
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
    args = ap.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.max_k, args.context, args.steps = "tiny-llama", "1,2", 2, 32, 3
    from bench import models
    record = new_record("verify_cost", "what does a verification step of k+1 rows per request cost, and what "
                        "speed-up does that predict at the measured acceptance?", args)
    spec_path = RESULTS / "speculative.json"
    measured = json.loads(spec_path.read_text()) if spec_path.is_file() and not args.smoke else {}
    record["curves"] = []
    for name in args.models.split(","):
        path = models.resolve(name)
        for batch in map(int, args.batches.split(",")):
            times = step_times(path, batch, list(range(args.max_k + 1)), args)
            med = {k: statistics.median(v) for k, v in times.items()}
            cost = {k: med[k] / med[0] for k in med}
            record["curves"].append({"model": name, "batch": batch, "step_ms": {k: 1000 * v for k, v in med.items()},
                                     "cost": cost, "runs_ms": {k: [1000 * x for x in v] for k, v in times.items()},
                                     "predicted": predictions(cost, measured)})
    path = result_path("verify_cost", args.smoke)
    path.write_text(json.dumps(record, indent=2, default=str))
    for c in record["curves"]:
        print(f"{c['model']} B={c['batch']}: cost " + " ".join(f"k{k}={v:.2f}" for k, v in c["cost"].items()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
