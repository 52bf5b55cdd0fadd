"""R2R token routing (`--speculative-method route`, lossy; issue 20): for a few router thresholds, the share of
tokens the large model makes, the quality lost against the large model alone, and tok/s against plain
large-model decoding, on the in-house pair (ferry-tiny large, ferry-tiny-draft small).

Method: first the router is calibrated on held-out text (ferry/engine/route_calibrate.py: both models read
windows of ferry/assets/heldout.txt from CALIBRATION_START on; a position is divergent where their greedy tokens
differ; a logistic model on the small model's top-1 probability, margin and entropy is fitted), written to
route_router.json next to the results. Then one in-process `ferry.LLM` per configuration: `large` (ferry-tiny, no
speculation: the reference), `small` (ferry-tiny-draft alone: the quality floor), `route@T` (calibrated router at
threshold T) and `route-top1@T` (uncalibrated: score 1 - top-1 probability). Open-ended continuation prompts
from the held-out text before CALIBRATION_START; at each concurrency a round sends C new prompts at once
(greedy, end-of-sequence ignored, --max-tokens each) to every configuration in turn, the first rotating per round
(bench.common.interleaved). Per configuration: tok/s (generated tokens / wall time of a round) and its ratio to
`large` in the same round; `large_fraction` (tokens the large model made, from the engine's speculative stats);
quality of the generated text under the large model, teacher-forced: `agreement` (share of generated tokens that
are the large model's own greedy choice after the same prefix) and `perplexity` (of the generated tokens);
`exact` (share of requests whose tokens equal `large`'s); and the eval's retrieval accuracy (ferry eval's tasks,
short contexts) at each threshold. Plotted: agreement and speed ratio against large_fraction.

    python -m bench route                 # ~15 min; bench/results/route.{json,png}
    python -m bench route --smoke         # < 1 min; bench/.cache/smoke/route.{json,png}
    python -m bench route --calibrate-only --router-out ROUTER.json   # just the router file, for --route-router
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/route.py` from the repo root
from bench.common import interleaved, measured_on, new_record, ratio, result_path, summary

ASSETS = Path(__file__).resolve().parents[1] / "ferry" / "assets"
LARGE, SMALL = ASSETS / "ferry-tiny", ASSETS / "ferry-tiny-draft"
CALIBRATION_START = 100_000  # characters of heldout.txt: prompts before, calibration text from here on


def text() -> str:
    return (ASSETS / "heldout.txt").read_text()


def calibration_windows(encode, n: int, size: int) -> list[list[int]]:
    """n windows of `size` tokens from the calibration part of the held-out text."""
    ids = encode(text()[CALIBRATION_START:])
    step = max(size, (len(ids) - size) // max(1, n))
    return [ids[s:s + size] for s in range(0, len(ids) - size, step)][:n]


def prompts(encode, n: int, offset: int, size: int = 400) -> list[list[int]]:
    """n continuation prompts (characters of held-out text before CALIBRATION_START), distinct per offset."""
    body = text()[:CALIBRATION_START]
    starts = [((offset * n + i) * 389) % (len(body) - size) for i in range(n)]
    return [encode(body[s:s + size]) for s in starts]


def quality(large, prompt_ids: list[list[int]], outputs: list[list[int]], reference: list[list[int]]) -> dict:
    """The generated tokens scored by the large model alone (teacher-forced): greedy agreement and perplexity;
    exact: share of outputs equal to the large model's own."""
    from ferry import SamplingParams
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    outs = large.generate([{"prompt_token_ids": p + o} for p, o in zip(prompt_ids, outputs)], params, use_tqdm=False)
    agree, nll, n = 0, 0.0, 0
    for p, o, out in zip(prompt_ids, outputs, outs):
        for lp in out.prompt_logprobs[len(p):len(p) + len(o)]:
            agree += lp.top[0][0] == lp.token_id
            nll -= lp.logprob
            n += 1
    exact = [a == b for a, b in zip(outputs, reference)]
    return {"agreement": agree / n if n else math.nan, "perplexity": math.exp(nll / n) if n else math.nan,
            "exact": sum(exact) / len(exact) if exact else math.nan, "scored_tokens": n}


def build(args, router_path: Path) -> dict:
    """name -> ferry.LLM for every configuration of the run."""
    from ferry import LLM
    common = dict(kv_cache_memory="64M", threads=args.threads, dtype=args.dtype, enable_prefix_caching=False)
    configs = {"large": LLM(str(LARGE), **common), "small": LLM(str(SMALL), **common)}
    for router in args.routers.split(","):
        for t in (float(x) for x in args.thresholds.split(",")):
            name = f"route@{t:g}" if router == "calibrated" else f"route-{router}@{t:g}"
            extra = {"route_router": str(router_path)} if router == "calibrated" else {}
            configs[name] = LLM(str(LARGE), speculative_method="route", speculative_model=str(SMALL),
                                route_threshold=t, **extra, **common)
    return configs


def run_case(configs: dict, encode, concurrency: int, args) -> dict:
    """One concurrency: interleaved rounds over the configurations, then quality and the large-model share."""
    from ferry import SamplingParams
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    rounds, outputs = {m: 0 for m in configs}, {m: [] for m in configs}
    shares = {m: _token_counts(c) for m, c in configs.items()}

    def one(name: str):
        def go() -> float:
            batch = prompts(encode, concurrency, rounds[name])
            rounds[name] += 1
            start = time.perf_counter()
            out = configs[name].generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)
            seconds = time.perf_counter() - start
            outputs[name].append((batch, [list(o.outputs[0].token_ids) for o in out]))
            return sum(len(o.outputs[0].token_ids) for o in out) / seconds
        return go

    tok_s = interleaved({m: one(m) for m in configs}, args.runs)
    case: dict = {"concurrency": concurrency, "engines": {}, "ratios": {}}
    ref = [o for _, outs in outputs["large"] for o in outs]
    for m, config in configs.items():
        batch = [p for ps, _ in outputs[m] for p in ps]
        outs = [o for _, os in outputs[m] for o in os]
        entry = {**summary(tok_s[m]), **quality(configs["large"], batch, outs, ref)}
        after = _token_counts(config)
        if after is not None:
            small, large = after[0] - shares[m][0], after[1] - shares[m][1]
            entry["large_fraction"] = large / (small + large) if small + large else math.nan
        else:
            entry["large_fraction"] = 1.0 if m == "large" else 0.0
        if m != "large":
            case["ratios"][m] = summary([ratio(a, b) for a, b in zip(tok_s[m], tok_s["large"])])
        case["engines"][m] = entry
    return case


def _token_counts(llm) -> tuple[int, int] | None:
    """(tokens the small model made, tokens the large model made) so far; None without route."""
    s = llm.view().speculative
    return None if s is None else (s["num_small_tokens"], s["num_large_tokens"])


def retrieval(configs: dict, args) -> dict:
    """ferry eval's retrieval tasks (short contexts) for each configuration: accuracy over every cell."""
    from ferry.eval.suite import EvalConfig, eval_retrieval
    cfg = EvalConfig(lengths=tuple(args.retrieval_lengths), depths=(0.25, 0.75), samples=args.retrieval_samples,
                     tasks=("passkey", "kv") if not args.smoke else ("passkey",), parts=("retrieval",))
    ids = configs["large"].tokenizer.encode(text())
    out = {}
    for name, llm in configs.items():
        cells = eval_retrieval(llm, ids, cfg)
        out[name] = sum(c["correct"] for c in cells) / max(1, sum(c["total"] for c in cells))
    return out


def plot(record: dict, path: Path) -> None:
    """Greedy agreement with the large model and speed against it, each over the large model's token share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (qa, sp) = plt.subplots(1, 2, figsize=(10, 4))
    for case in record["cases"]:
        groups: dict[str, list] = {}
        for name, e in case["engines"].items():
            family = name.split("@")[0] if "@" in name else name
            groups.setdefault(family, []).append((e["large_fraction"], e["agreement"],
                                                  case["ratios"].get(name, {}).get("median", 1.0), name))
        for family, pts in groups.items():
            pts.sort()
            label = f"{family} c={case['concurrency']}"
            style = "o-" if family.startswith("route") else "s"
            qa.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
            sp.plot([p[0] for p in pts], [p[2] for p in pts], style, label=label)
    qa.set(xlabel="share of tokens made by the large model", ylabel="greedy agreement with the large model",
           title="quality (teacher-forced by ferry-tiny)")
    sp.set(xlabel="share of tokens made by the large model", ylabel="tok/s / plain large-model decoding",
           title="speed")
    sp.axhline(1.0, color="grey", lw=0.8)
    qa.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibrate(args, path: Path) -> dict:
    """Fit the router on the calibration text and write it to path; returns what it was fitted on."""
    from ferry import LLM
    from ferry.engine.route_calibrate import calibrate as fit_router
    common = dict(kv_cache_memory="64M", threads=args.threads, dtype=args.dtype, enable_prefix_caching=False)
    with LLM(str(LARGE), **common) as large, LLM(str(SMALL), **common) as small:
        windows = calibration_windows(large.tokenizer.encode, args.calibration_windows, args.calibration_tokens)
        router = fit_router(large, small, windows)
    router.save(path)
    return {"path": str(path), **router.info, "weights": list(router.weights), "bias": router.bias}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench route", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thresholds", default="0,0.3,0.5,0.6,0.7,0.8,0.9,1", help="route_threshold values")
    ap.add_argument("--routers", default="calibrated,top1", help="calibrated (fitted first) and/or top1")
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--calibration-windows", type=int, default=64)
    ap.add_argument("--calibration-tokens", type=int, default=256)
    ap.add_argument("--retrieval-lengths", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--retrieval-samples", type=int, default=4)
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--router-out", default=None, help="where to write the calibrated router (default: next to "
                                                       "the results, route_router.json)")
    ap.add_argument("--calibrate-only", action="store_true", help="write the router file and stop")
    ap.add_argument("--smoke", action="store_true", help="3 thresholds, calibrated router, 1 round of 8 tokens, "
                                                         "concurrency 1 and 2, one retrieval cell")
    args = ap.parse_args(argv)
    if args.smoke:
        args.thresholds, args.routers, args.concurrency = "0,0.7,1", "calibrated", "1,2"
        args.max_tokens, args.runs, args.calibration_windows, args.calibration_tokens = 8, 1, 8, 128
        args.retrieval_lengths, args.retrieval_samples = [128], 1
    path = result_path("route", args.smoke)
    router_path = Path(args.router_out) if args.router_out else path.with_name("route_router.json")
    record = new_record("route", "R2R token routing: share of tokens made by the large model, quality against it "
                        "and tok/s against plain large-model decoding, per router threshold, on ferry-tiny + "
                        "ferry-tiny-draft", args)
    record["router"] = calibrate(args, router_path)
    print(f"router: {record['router']}")
    if args.calibrate_only:
        return
    configs = build(args, router_path)
    encode = configs["large"].tokenizer.encode
    for llm in configs.values():  # warm-up: kernels loaded, first allocations made
        llm.generate([{"prompt_token_ids": encode("warm up")}], use_tqdm=False)
    record["cases"] = [run_case(configs, encode, int(c), args) for c in args.concurrency.split(",")]
    record["retrieval"] = retrieval(configs, args)
    path.write_text(json.dumps(record, indent=2, default=str))
    plot(record, path.with_suffix(".png"))
    for case in record["cases"]:
        for m, e in case["engines"].items():
            speed = case["ratios"].get(m, {}).get("median", 1.0)
            print(f"c={case['concurrency']} {m:>18}: {e['median']:7.0f} tok/s x{speed:.2f}  large "
                  f"{e['large_fraction']:.0%}  agreement {e['agreement']:.1%}  ppl {e['perplexity']:.2f}  "
                  f"exact {e['exact']:.0%}  retrieval {record['retrieval'][m]:.0%}")
    print(f"wrote {path}")


def section(record: dict) -> str:
    """docs/speculative.md's block: per concurrency and configuration, the large model's share of the tokens,
    speed against it, and the quality kept."""
    from bench.report import command
    head = ["concurrency", "configuration", "large model's tokens", "tok/s", "vs large", "greedy agreement",
            "perplexity under large", "exact output", "retrieval"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in record["cases"]:
        for m, e in c["engines"].items():
            r = c["ratios"].get(m, {}).get("median", 1.0)
            lines.append(f"| {c['concurrency']} | {m} | {e['large_fraction']:.0%} | {e['median']:.0f} | {r:.2f}x | "
                         f"{e['agreement']:.1%} | {e['perplexity']:.2f} | {e['exact']:.0%} | "
                         f"{record['retrieval'][m]:.0%} |")
    cfg, router = record["config"], record["router"]
    return ("### Small-large token routing (R2R, lossy)\n\n"
            f"{measured_on(record)}; ferry-tiny (large) and ferry-tiny-draft (small) at {cfg['dtype']}, 2 threads, "
            f"{cfg['max_tokens']} greedy tokens per request, median of {cfg['runs']} interleaved rounds. `route@T`: the "
            f"calibrated router (logistic on {', '.join(router['features'])}, fitted on {router['positions']} "
            f"positions where the models disagree {router['divergence_rate']:.0%} of the time) at threshold T; "
            "`route-top1@T`: the uncalibrated 1 - top-1 router. Agreement: share of generated tokens that are the "
            "large model's greedy choice after the same prefix (teacher-forced); exact: share of requests with "
            "exactly `large`'s tokens.\n\n" + "\n".join(lines)
            + f"\n\nReproduce: `{command(record)}` (results in `bench/results/route.json`)."
              "\n\n![](bench/results/route.png)")


if __name__ == "__main__":
    main()
