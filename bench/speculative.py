"""Speculative decoding (issue 20): tokens per second with and without each method, acceptance, and whether the
output is the output without speculation, for ferry and for llama.cpp's own speculation on the same pair.

Method: one in-process `ferry.LLM` per ferry configuration on the in-house pair (ferry-tiny, drafts from
ferry-tiny-draft): `plain` (no speculation), `ngram`, `phrase` and `draft`, each with --num-speculative-tokens auto
unless --k is given; one `llama-server` per llama.cpp configuration on the same pair converted to GGUF at the same
precision: `llama.cpp` (none), `llama.cpp-ngram`, `llama.cpp-draft` (bench/speculative_engines.py). 2 threads each.
Workloads, from held-out text (ferry/assets/heldout.txt): `grounded` (a passage, then its first third again: the
continuation repeats its input, where lookup pays) and `open` (a passage to continue). At each concurrency C, a
round sends C new prompts (the same token ids to both engines) at once (greedy, end-of-sequence ignored,
--max-tokens each) to every configuration in turn, the first rotating per round (bench.common.interleaved); tok/s is
generated tokens / wall time of the round. Ratios and `equivalence` (the share of requests with the tokens of the
same engine without speculation; 100% wherever ferry's kernels are batch-invariant, see the README; run with
FERRY_ISA=avx2 to measure the torch fallback's agreement) compare each configuration with its own engine's plain
one; `ferry_llamacpp_agreement` says whether the two engines without speculation give the same tokens.
MoE part (`moe`): ferry-tiny-moe with its experts on disk (a quarter of them cached), plain / ngram / phrase on the
grounded workload: verification sends k+1 rows per request through the experts, so expert bytes read per generated
token and the cache hit rate go beside tok/s.

    python -m bench speculative                 # ~5 min; bench/results/speculative.json
    python -m bench speculative --smoke         # ferry only, < 1 min; bench/.cache/smoke/speculative.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/speculative.py` from the repo root
from bench.common import interleaved, measured_on, new_record, ratio, result_path, summary
from bench.speculative_engines import ASSETS, FERRY_METHODS, LLAMACPP_MODES, FerryConfig, build

METHODS = FERRY_METHODS + tuple(LLAMACPP_MODES)


def prompts(workload: str, n: int, offset: int, size: int = 600) -> list[str]:
    """n prompts from held-out text, distinct for every (workload, offset): a round never repeats one."""
    text = (ASSETS / "heldout.txt").read_text()
    out = []
    for i in range(n):
        start = ((offset * n + i) * 389) % max(1, len(text) - size)
        passage = text[start:start + size]
        out.append(passage + "\n\n" + passage[:size // 3] if workload == "grounded" else passage)
    return out


def baseline(name: str) -> str:
    """What a configuration's speed and tokens are compared with: its own engine without speculation."""
    return "llama.cpp" if name.startswith("llama.cpp") else "plain"


def run_case(configs: dict, encode, workload: str, concurrency: int, args) -> dict:
    """One (workload, concurrency): interleaved rounds over the configurations."""
    tokens: dict[str, list] = {m: [] for m in configs}
    rounds = {m: 0 for m in configs}
    before = {m: c.spec_counts() for m, c in configs.items()}

    def one(name: str):
        def go() -> float:
            batch = [encode(p) for p in prompts(workload, concurrency, rounds[name])]
            rounds[name] += 1
            start = time.perf_counter()
            out = configs[name].generate(batch, args.max_tokens)
            seconds = time.perf_counter() - start
            tokens[name].append(out)
            return sum(len(t) for t in out) / seconds
        return go

    experts_before = {m: _experts(c) for m, c in configs.items()}
    tok_s = interleaved({m: one(m) for m in configs}, args.runs)
    case: dict = {"workload": workload, "concurrency": concurrency, "engines": {}, "ratios": {}}
    for m, config in configs.items():
        entry = summary(tok_s[m])
        if experts_before[m] is not None:  # MoE with an expert store: what verification costs in reads
            (b0, l0, h0), (b1, l1, h1) = experts_before[m], _experts(config)
            generated = sum(len(t) for r in tokens[m] for t in r)
            entry.update(expert_bytes_per_token=(b1 - b0) / generated, expert_hit_rate=(h1 - h0) / max(1, l1 - l0))
        after = config.spec_counts()
        if after is not None:
            drafted, accepted = after[0] - before[m][0], after[1] - before[m][1]
            entry.update(acceptance_rate=accepted / drafted if drafted else 0.0, draft_tokens=drafted,
                         accepted_tokens=accepted)
        ref = baseline(m)
        if ref in configs:
            same = [a == b for round_a, round_b in zip(tokens[m], tokens[ref]) for a, b in zip(round_a, round_b)]
            entry["equivalence"] = sum(same) / len(same) if same else float("nan")
            if m != ref:
                case["ratios"][m] = summary([ratio(a, b) for a, b in zip(tok_s[m], tok_s[ref])])
        case["engines"][m] = entry
    if "plain" in configs and "llama.cpp" in configs:  # same weights and precision: do the engines agree?
        same = [a == b for ra, rb in zip(tokens["plain"], tokens["llama.cpp"]) for a, b in zip(ra, rb)]
        case["ferry_llamacpp_agreement"] = sum(same) / len(same) if same else float("nan")
    return case


def _experts(config) -> tuple[int, int, int] | None:
    get = getattr(config, "expert_counts", None)
    return get() if get else None


def moe_cases(args: argparse.Namespace) -> dict:
    """ferry-tiny-moe with its experts on disk (a lossless store, --expert-cache-memory a quarter of it): plain,
    ngram and phrase on the grounded workload. Verification routes k+1 rows per request through each layer's
    experts: expert bytes read per generated token and hit rate beside tok/s."""
    from bench.moe_setup import expert_store
    from ferry.experts.layout import StoreIndex
    store = expert_store(ASSETS / "ferry-tiny-moe", args.dtype)
    budget = StoreIndex.load(store).total_nbytes // 4
    configs = {m: FerryConfig(m, args.dtype, args.threads, args.k, ASSETS / "ferry-tiny-moe",
                              expert_store=str(store), expert_cache_memory=budget)
               for m in ("plain", "ngram", "phrase")}
    encode = configs["plain"].llm.tokenizer.encode
    for config in configs.values():
        config.generate([encode("warm up")], 4)
    return {"model": "ferry-tiny-moe", "expert_store": str(store), "expert_cache_memory": budget,
            "cases": [run_case(configs, encode, "grounded", int(c), args) for c in args.moe_concurrency.split(",")]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench speculative", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS),
                    help="ferry's (plain, ngram, phrase, draft) and llama.cpp's (llama.cpp, llama.cpp-ngram, "
                         "llama.cpp-draft: llama-server, built into bench/.cache/peers if missing)")
    ap.add_argument("--workloads", default="grounded,open")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--k", type=int, default=None, help="fixed draft length (ferry's default: auto; llama.cpp's: 3)")
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 for both engines (default: what ferry's "
                                                  "--dtype auto picks on this CPU)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--moe-concurrency", default="1,4", help="the MoE part's concurrencies ('' to skip it)")
    ap.add_argument("--smoke", action="store_true", help="ferry only, 1 round of 16 tokens, concurrency 1 and 2")
    args = ap.parse_args(argv)
    if args.smoke:
        args.max_tokens, args.runs, args.concurrency, args.moe_concurrency = 16, 1, "1,2", "1"
        args.methods = ",".join(m for m in args.methods.split(",") if m in FERRY_METHODS)
    if args.dtype is None:
        from ferry.ops import cpu
        args.dtype = "bfloat16" if cpu.native_bf16() else "float32"
    names = args.methods.split(",")
    for ref in {"plain"} | ({"llama.cpp"} if any(n in LLAMACPP_MODES for n in names) else set()):
        if ref not in names:
            names.insert(0, ref)
    record = new_record("speculative", "tok/s, acceptance and output equivalence of speculative decoding "
                        "(ferry: ngram, phrase, draft; llama.cpp: ngram, draft) against none, on ferry-tiny", args)
    slots = max(int(c) for c in args.concurrency.split(","))
    configs = {n: build(n, args.dtype, args.threads, slots, args.k) for n in names}
    try:
        encode = configs["plain"].llm.tokenizer.encode
        for config in configs.values():  # warm-up: kernels loaded, first allocations made
            config.generate([encode("warm up")], 4)
        record["cases"] = [run_case(configs, encode, w, int(c), args) for w in args.workloads.split(",")
                           for c in args.concurrency.split(",")]
    finally:
        for config in configs.values():
            config.close()
    if args.moe_concurrency:
        record["moe"] = moe_cases(args)
    path = result_path("speculative", args.smoke)
    path.write_text(json.dumps(record, indent=2, default=str))
    plot(record, path.with_suffix(".png"))
    for case in record["cases"]:
        cells = [f"{m} {e['median']:.0f} tok/s" + (f" x{case['ratios'][m]['median']:.2f} acc "
                 f"{e.get('acceptance_rate', 0):.0%} eq {e['equivalence']:.0%}" if m in case["ratios"] else "")
                 for m, e in case["engines"].items()]
        print(f"{case['workload']:>8} c={case['concurrency']}: " + " | ".join(cells))
    for case in record.get("moe", {}).get("cases", []):
        cells = [f"{m} {e['median']:.0f} tok/s, {e['expert_bytes_per_token'] / 1024:.0f} KiB experts/token, hit "
                 f"{e['expert_hit_rate']:.0%}" + (f" x{case['ratios'][m]['median']:.2f} eq {e['equivalence']:.0%}"
                                                  if m in case["ratios"] else "") for m, e in case["engines"].items()]
        print(f"MoE, experts on disk, c={case['concurrency']}: " + " | ".join(cells))
    print(f"wrote {path}")


def plot(record: dict, path: Path) -> None:
    """Each method's speed-up over its own engine without speculation, per workload and concurrency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = record["cases"]
    methods = [m for m in cases[0]["ratios"]]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ax.bar([x + i * width for x in range(len(cases))], [c["ratios"][m]["median"] for c in cases], width, label=m)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))],
                  [f"{c['workload']}, c={c['concurrency']}" for c in cases], fontsize=8)
    ax.set_ylabel("tok/s over the same engine without speculation")
    ax.legend(fontsize=8, ncol=3)
    ax.set_title(f"speculative decoding on ferry-tiny, {record['config']['dtype']} ({record['machine'].get('cpu')})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def section(record: dict) -> str:
    """docs/speculative.md's block: tok/s per configuration and case, each method's ratio to its own engine without
    speculation with its acceptance and output equivalence; then the MoE part."""
    from bench.report import command
    cases = record["cases"]
    names = list(cases[0]["engines"])
    head = ["workload", "concurrency", *[n + (" tok/s" if n in ("plain", "llama.cpp") else "") for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        cells = []
        for n in names:
            e = c["engines"][n]
            r = c["ratios"].get(n)
            cells.append(f"{e['median']:.0f}" if r is None else
                         f"{r['median']:.2f}x (acc {e.get('acceptance_rate', 0):.0%}, eq {e['equivalence']:.0%})")
        lines.append(f"| {c['workload']} | {c['concurrency']} | " + " | ".join(cells) + " |")
    out = ("### Speculative decoding against none, and against llama.cpp's own\n\n"
           f"{measured_on(record)}; ferry-tiny with ferry-tiny-draft at {record['config']['dtype']}, 2 threads, "
           f"{record['config']['max_tokens']} greedy tokens per request, median of {record['config']['runs']} "
           "interleaved rounds. Each method: its tok/s over the same engine without speculation (ferry's `plain`, "
           "llama.cpp's plain llama-server), acceptance (accepted / drafted tokens) and equivalence (share of requests "
           "with the tokens of the same engine without speculation).\n\n" + "\n".join(lines))
    moe = record.get("moe")
    if moe:
        rows = ["| concurrency | configuration | tok/s | ratio | expert KiB read per token | expert cache hit rate "
                "| equivalence |", "|---|---|---|---|---|---|---|"]
        for c in moe["cases"]:
            for n, e in c["engines"].items():
                r = c["ratios"].get(n)
                rows.append(f"| {c['concurrency']} | {n} | {e['median']:.0f} | "
                            f"{'—' if r is None else format(r['median'], '.2f') + 'x'} | "
                            f"{e['expert_bytes_per_token'] / 1024:.0f} | {e['expert_hit_rate']:.0%} | "
                            f"{e['equivalence']:.0%} |")
        out += (f"\n\nMoE with its experts on disk: {moe['model']}, a lossless expert store with "
                f"{moe['expert_cache_memory'] / 2**20:.1f} MiB of cache (a quarter of it), grounded prompts:\n\n"
                + "\n".join(rows))
    return (out + f"\n\nReproduce: `{command(record)}` (results in `bench/results/speculative.json`)."
            "\n\n![](bench/results/speculative.png)")


if __name__ == "__main__":
    main()
