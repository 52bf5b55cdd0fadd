"""Speculative decoding (issue 20): tokens per second with and without each method, acceptance, and whether the
output is the output without speculation.

Method: one in-process `ferry.LLM` per configuration on the in-house pair (ferry-tiny, drafts from
ferry-tiny-draft), 2 threads: `plain` (no speculation), `ngram`, `phrase` and `draft`, each with
--num-speculative-tokens auto unless --k is given. Workloads, from held-out text (ferry/assets/heldout.txt):
`grounded` (a passage, then its first third again: the continuation repeats its input, where lookup pays) and
`open` (a passage to continue). At each concurrency C, a round sends C new prompts at once (greedy, end-of-sequence
ignored, --max-tokens each) to every configuration in turn, the first rotating per round (bench.common.interleaved);
tok/s is generated tokens / wall time of the round. Every round's tokens are compared with `plain`'s for the same
prompts: `equivalence` is the share of requests with identical tokens (100% wherever the kernels are
batch-invariant, see the README; run with FERRY_ISA=avx2 to measure the torch fallback's agreement). Acceptance
and mean accepted length are read from the engine's view (the same numbers as /metrics).

    python -m bench speculative                 # ~10 min; bench/results/speculative.json
    python -m bench speculative --smoke         # < 1 min; bench/.cache/smoke/speculative.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/speculative.py` from the repo root
from bench.common import interleaved, new_record, ratio, result_path, summary

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "ferry" / "assets"
METHODS = ("plain", "ngram", "phrase", "draft")


def prompts(workload: str, n: int, offset: int, size: int = 600) -> list[str]:
    """n prompts from held-out text, distinct for every (workload, offset): a round never repeats one."""
    text = (ASSETS / "heldout.txt").read_text()
    out = []
    for i in range(n):
        start = ((offset * n + i) * 389) % max(1, len(text) - size)
        passage = text[start:start + size]
        out.append(passage + "\n\n" + passage[:size // 3] if workload == "grounded" else passage)
    return out


def build(method: str, args) -> "object":
    from ferry import LLM
    opts = dict(kv_cache_memory="256M", threads=args.threads)
    if method != "plain":
        opts.update(speculative_method=method, num_speculative_tokens=args.k or "auto")
    if method == "draft":
        opts["speculative_model"] = str(ASSETS / "ferry-tiny-draft")
    return LLM(str(ASSETS / "ferry-tiny"), **opts)


def run_case(llms: dict, workload: str, concurrency: int, args) -> dict:
    """One (workload, concurrency): interleaved rounds over the configurations."""
    from ferry import SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    tokens: dict[str, list] = {m: [] for m in llms}
    rounds = {m: 0 for m in llms}
    before = {m: dict(llm.view().speculative or {}) for m, llm in llms.items()}

    def one(method: str):
        def go() -> float:
            batch = prompts(workload, concurrency, rounds[method])
            rounds[method] += 1
            start = time.perf_counter()
            outs = llms[method].generate(batch, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens[method].append([o.outputs[0].token_ids for o in outs])
            return sum(len(o.outputs[0].token_ids) for o in outs) / seconds
        return go

    tok_s = interleaved({m: one(m) for m in llms}, args.runs)
    case: dict = {"workload": workload, "concurrency": concurrency, "engines": {}, "ratios": {}}
    for m, llm in llms.items():
        entry = summary(tok_s[m])
        after = llm.view().speculative
        if after is not None:
            drafted = after["num_draft_tokens"] - before[m].get("num_draft_tokens", 0)
            accepted = after["num_accepted_tokens"] - before[m].get("num_accepted_tokens", 0)
            entry["acceptance_rate"] = accepted / drafted if drafted else 0.0
            entry["draft_tokens"] = drafted
            entry["mean_accepted_length"] = after["mean_accepted_length"]
        same = [a == b for round_a, round_b in zip(tokens[m], tokens["plain"]) for a, b in zip(round_a, round_b)]
        entry["equivalence"] = sum(same) / len(same) if same else float("nan")
        case["engines"][m] = entry
        if m != "plain":
            case["ratios"][m] = summary([ratio(a, b) for a, b in zip(tok_s[m], tok_s["plain"])])
    return case


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench speculative", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--workloads", default="grounded,open")
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--k", type=int, default=None, help="fixed --num-speculative-tokens (default: auto)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="1 round of 16 tokens, concurrency 1 and 2")
    args = ap.parse_args(argv)
    if args.smoke:
        args.max_tokens, args.runs, args.concurrency = 16, 1, "1,2"
    methods = args.methods.split(",")
    if "plain" not in methods:
        methods.insert(0, "plain")
    record = new_record("speculative", "tok/s, acceptance and output equivalence of speculative decoding "
                        "(ngram, phrase, draft) against none, on ferry-tiny", args)
    llms = {m: build(m, args) for m in methods}
    for llm in llms.values():  # warm-up: kernels loaded, first allocations made
        llm.generate(["warm up"], None, use_tqdm=False)
    record["cases"] = [run_case(llms, w, int(c), args) for w in args.workloads.split(",")
                       for c in args.concurrency.split(",")]
    path = result_path("speculative", args.smoke)
    import json
    path.write_text(json.dumps(record, indent=2, default=str))
    for case in record["cases"]:
        cells = [f"{m} {e['median']:.0f} tok/s" + (f" x{case['ratios'][m]['median']:.2f} acc "
                 f"{e['acceptance_rate']:.0%} eq {e['equivalence']:.0%}" if m in case["ratios"] else "")
                 for m, e in case["engines"].items()]
        print(f"{case['workload']:>8} c={case['concurrency']}: " + " | ".join(cells))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
