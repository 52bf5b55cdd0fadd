"""Long context within a KV budget: what each KV policy buys and what it costs, against full attention.

Question: per KV policy (and budget), how many fast-tier KV bytes does a token cost, how many sequences of the
longest length fit a fixed --kv-cache-memory, how long does prefill take, how fast is decode — and how much
retrieval accuracy and perplexity are lost for it? Two models:
- quality, memory and concurrency on the in-house retrieval-trained model (ferry-tiny, default): passkey
  retrieval by context length and needle depth plus perplexity (ferry.eval, the same code as `ferry eval`);
  fast-tier bytes per token measured from one sequence at the longest length (device blocks at the
  high-water mark x block bytes + index bytes, over its tokens; host bytes beside it); concurrency measured by
  the real scheduler: --num-seqs sequences of the longest length submitted at once under a KV budget that holds
  --full-seqs of them at full attention, peak number running at once;
- speed on a random-weight Qwen2.5-0.5B shape (--speed-model): prefill seconds of one prompt of the longest
  length, and decode tokens/s of --decode-batch such sequences (decode time = time with --decode-tokens more
  tokens minus prefill time).
`lazy` (prefill-time token pruning): its prefill also records `computed_fraction`, the token-layers computed over
those scheduled (rows pruned and revived included); its perplexity equals full's by construction, since
prompt_logprobs asks for every row's logits and a row whose logits are needed is never pruned.

    python -m bench long-context                              # ~20 min on 2 idle cores
    python -m bench long-context --smoke                      # tiny sizes, < 2 min
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from bench.common import new_record, result_path
from ferry import LLM, SamplingParams
from ferry.default_model import inhouse_path
from ferry.eval.suite import EvalConfig, evaluate_one

# every policy, the retrieval ones at several budgets (the accuracy-memory frontier)
POLICIES = ("full,int8,spans:0.5,spans:0.25,spans:0.125,shadow:0.25,shadow:0.125,lazy:0.5,lazy:0.25,lazy:0.1,merge,"
            "layer-budget:0.5,layer-budget:0.25")


def policy_options(spec: str) -> dict:
    """'spans:0.25' -> {'kv_policy': 'spans', 'kv_budget': 0.25}; 'int8' -> {'kv_policy': 'int8'}."""
    name, _, budget = spec.partition(":")
    return {"kv_policy": name, **({"kv_budget": float(budget)} if budget else {})}


def _add(llm: LLM, n: int, length: int, max_tokens: int, seed: int) -> None:
    vocab = llm.view().vocab_size
    rng = random.Random(seed)
    for i in range(n):
        llm.engine.add_request(f"s{seed}-{i}", {"prompt_token_ids": [rng.randrange(3, vocab) for _ in range(length)]},
                               SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def footprint(model: str, spec: str, length: int, dtype: str) -> dict:
    """Fast-tier and host bytes one sequence of `length` prompt tokens actually holds: at its peak (the last
    prefill chunk in flight) and while it decodes (what concurrent sequences pay)."""
    with LLM(model, dtype=dtype, kv_cache_memory="256M", swap_space="256M", **policy_options(spec)) as llm:
        eng = llm.engine
        _add(llm, 1, length, 16, seed=1)
        decoding = (0, 0)
        while eng.has_unfinished():
            eng.step()
            v = eng.view()
            if v.running and v.running[0].num_output_tokens > 1:
                decoding = (v.num_kv_blocks_used, v.num_host_blocks_used)
        tokens = length + 16
        v = eng.view()
        policy = v.kv_policy

        def fast(blocks: int, host: int) -> float:
            return (blocks * policy.device_bytes_per_block() + host * policy.index_bytes_per_host_block()) / tokens

        return {"fast_bytes_per_token": fast(*decoding), "peak_fast_bytes_per_token":
                fast(v.max_kv_blocks_used, v.max_host_blocks_used),
                "host_bytes_per_token": decoding[1] * policy.host_bytes_per_block() / tokens,
                "read_tokens": policy.read_tokens(tokens), "context": tokens}


def concurrency(model: str, spec: str, length: int, budget_bytes: int, swap_bytes: int, num_seqs: int,
                dtype: str) -> int:
    """Peak number of sequences holding KV at once under a fixed KV budget (outputs long enough that every
    sequence could overlap every other)."""
    # host memory sized to the job (a spans index over host blocks is paid from the fast-tier budget)
    with LLM(model, dtype=dtype, kv_cache_memory=budget_bytes, swap_space=swap_bytes, max_num_seqs=num_seqs,
             **policy_options(spec)) as llm:
        chunks = -(-length // llm.view().max_num_batched_tokens)
        _add(llm, num_seqs, length, num_seqs * chunks + 16, seed=2)
        peak = 0
        while llm.engine.has_unfinished():
            llm.engine.step()
            peak = max(peak, llm.view().num_running)
        return peak


def speed(model: str, spec: str, length: int, batch: int, decode_tokens: int, dtype: str) -> dict:
    """Prefill seconds of one prompt; decode tokens/s of `batch` sequences at that context (steps with no
    prefill in them, timed one by one)."""
    with LLM(model, dtype=dtype, kv_cache_memory="2G", swap_space="2G", max_num_seqs=batch,
             enable_prefix_caching=False, **policy_options(spec)) as llm:
        eng = llm.engine
        _add(llm, 1, min(length, 512), 2, seed=3)  # warm-up: kernels, allocator
        while eng.has_unfinished():
            eng.step()
        _add(llm, 1, length, 1, seed=4)
        before = eng.view().kv_stats  # lazy: token-layers computed / scheduled
        t = time.perf_counter()
        while eng.has_unfinished():
            eng.step()
        prefill = time.perf_counter() - t
        stats = eng.view().kv_stats
        computed = {} if "token_layers" not in stats else {"computed_fraction": (
            stats["token_layers"] - before["token_layers"]) / (
            stats["scheduled_token_layers"] - before["scheduled_token_layers"])}
        _add(llm, batch, length, 1 + decode_tokens, seed=5)
        decode_s, decoded = 0.0, 0
        while eng.has_unfinished():
            running = eng.view().running
            all_decoding = len(running) == batch and all(r.decoding for r in running)
            t = time.perf_counter()
            eng.step()
            if all_decoding:
                decode_s += time.perf_counter() - t
                decoded += batch
        return {"prefill_s": prefill, "decode_tok_s": decoded / decode_s if decode_s else float("nan"), **computed}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="ferry bench long_context", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(inhouse_path("ferry-tiny")), help="the retrieval-trained model")
    ap.add_argument("--speed-model", default="qwen2.5-0.5b", help="a bench/models.py shape or a folder")
    ap.add_argument("--policies", default=POLICIES, help="comma list of NAME or NAME:BUDGET")
    ap.add_argument("--lengths", default="1024,2048,4096", help="retrieval context lengths (the last is the longest)")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    # 4: 60 prompts, so that one answer is 1.7 points (the targets are stated in points)
    ap.add_argument("--samples", type=int, default=4, help="passkey samples per (length, depth)")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--full-seqs", type=int, default=2, help="the fixed KV budget holds this many full sequences")
    ap.add_argument("--num-seqs", type=int, default=12, help="sequences submitted for the concurrency count")
    ap.add_argument("--speed-length", type=int, help="prompt tokens for the speed runs (default: the longest length)")
    ap.add_argument("--decode-batch", type=int, default=1)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1, help="(recorded; each number is one run)")
    ap.add_argument("--out", help="results name (default long_context)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code, not the numbers")
    ap.add_argument("--skip-speed", action="store_true", help="no speed runs (they hold 2G + 2G of KV tensors)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.lengths, args.depths, args.samples, args.ppl_tokens = "256,512", "0.5", 1, 512
        args.num_seqs, args.decode_batch, args.decode_tokens, args.threads = 4, 2, 4, 1
        args.speed_model = "tiny-qwen2"
    import torch
    torch.set_num_threads(args.threads)
    from bench.models import resolve
    started = time.perf_counter()
    record = new_record("long_context", "KV bytes/token, concurrency at a fixed KV budget, prefill time, decode "
                        "tok/s, retrieval accuracy and perplexity per KV policy, against full attention", args)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    longest = lengths[-1]
    full_bytes = footprint(args.model, "full", longest, args.dtype)["fast_bytes_per_token"]
    budget_bytes = int(args.full_seqs * full_bytes * (longest + 16 + 16))
    speed_model = str(resolve(args.speed_model))
    record.update({"model": args.model, "speed_model": speed_model, "kv_budget_bytes": budget_bytes,
                   "full_bytes_per_token": full_bytes, "rows": []})
    ecfg = EvalConfig(tasks=("passkey",), lengths=lengths, depths=tuple(float(d) for d in args.depths.split(",")),
                      samples=args.samples, ppl_tokens=args.ppl_tokens, parts=("ppl", "retrieval"))
    for spec in args.policies.split(","):
        row = {"policy": spec, **footprint(args.model, spec, longest, args.dtype)}
        rep = evaluate_one(args.model, {"dtype": args.dtype, **policy_options(spec)}, ecfg)
        row["accuracy"] = {str(n): rep.accuracy(length=n) for n in {r["length"] for r in rep.retrieval}}
        row["accuracy_all"] = rep.accuracy()
        row["retrieval"] = rep.retrieval
        row["perplexity"] = rep.perplexity["perplexity"]
        outputs = args.num_seqs * (-(-longest // 512)) + 16  # as concurrency() asks for
        swap_bytes = int(args.num_seqs * (longest + outputs + 64) * full_bytes)
        row["concurrent_seqs"] = concurrency(args.model, spec, longest, budget_bytes, swap_bytes, args.num_seqs,
                                             args.dtype)
        if args.skip_speed:
            row.update(prefill_s=float("nan"), decode_tok_s=float("nan"))
        else:
            row.update(speed(speed_model, spec, args.speed_length or longest, args.decode_batch, args.decode_tokens,
                             args.dtype))
        record["rows"].append(row)
        print(f"[long_context] {spec}: {json.dumps({k: v for k, v in row.items() if k != 'retrieval'})}", flush=True)
        record["duration_s"] = time.perf_counter() - started
        path = result_path("long_context", args.smoke, args.out)  # after every policy: a long run keeps its rows
        path.write_text(json.dumps(record, indent=2, default=str))
        plot(record, path.with_suffix(".png"))
    print(f"[long_context] saved {path} (+ .png) after {record['duration_s']:.0f} s")


def plot(record: dict, path: Path) -> None:
    """Left: the accuracy-memory frontier (fast-tier bytes/token relative to full vs passkey accuracy at the longest
    length); right: concurrency, prefill and decode speed relative to full."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = record["rows"]
    full = next((r for r in rows if r["policy"] == "full"), rows[0])
    longest = max(full["accuracy"], key=int)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        x = r["fast_bytes_per_token"] / full["fast_bytes_per_token"]
        a.scatter(x, r["accuracy"][longest], s=40)
        a.annotate(r["policy"], (x, r["accuracy"][longest]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    a.set_xlabel("fast-tier KV bytes per token (fraction of full)")
    a.set_ylabel(f"passkey accuracy at {longest} tokens")
    a.set_xscale("log")
    a.grid(alpha=0.3)
    a.set_title("accuracy-memory frontier", fontsize=9)
    keys = [("concurrent_seqs", "sequences at fixed KV budget"), ("prefill_s", "prefill time"),
            ("decode_tok_s", "decode tok/s")]
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        b.bar([j + i * width for j in range(len(keys))], [r[k] / full[k] if full[k] else 0 for k, _ in keys], width,
              label=r["policy"])
    b.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(keys))], [l for _, l in keys], fontsize=8)
    b.set_ylabel("relative to full attention")
    b.axhline(1.0, color="k", lw=0.5)
    b.legend(fontsize=7)
    b.set_title(f"speed on {Path(record['speed_model']).name}, memory on {Path(record['model']).name}", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


def markdown(record: dict) -> str:
    """The README table: one row per policy, ratios to full attention."""
    rows = record["rows"]
    full = next((r for r in rows if r["policy"] == "full"), rows[0])
    lengths = sorted(full["accuracy"], key=int)
    head = ["policy", "fast-tier KV B/token (peak)", "host KV B/token", *[f"passkey @{n}" for n in lengths], "perplexity",
            "seqs at fixed budget", "prefill s", "decode tok/s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        rel = r["fast_bytes_per_token"] / full["fast_bytes_per_token"]
        out.append("| " + " | ".join([
            r["policy"], f"{r['fast_bytes_per_token']:.0f} ({rel:.0%}; {r['peak_fast_bytes_per_token']:.0f})",
            f"{r['host_bytes_per_token']:.0f}",
            *[f"{r['accuracy'][n]:.0%}" for n in lengths], f"{r['perplexity']:.2f}",
            f"{r['concurrent_seqs']} ({r['concurrent_seqs'] / max(1, full['concurrent_seqs']):.1f}x)",
            _ratio(r["prefill_s"], full["prefill_s"] / r["prefill_s"]),
            _ratio(r["decode_tok_s"], r["decode_tok_s"] / full["decode_tok_s"])]) + " |")
    return "\n".join(out)


def _ratio(value: float, ratio: float) -> str:
    return "not timed" if value != value else f"{value:.2f} ({ratio:.2f}x)"


def section(record: dict) -> str:
    cfg = record["config"]
    return (f"Quality, memory and concurrency on {Path(record['model']).name} ({cfg['dtype']}; passkey, {cfg['samples']} "
            f"samples per length and depth {cfg['depths']}; perplexity over {cfg['ppl_tokens']} held-out tokens); "
            f"concurrency: {cfg['num_seqs']} sequences of {record['rows'][0]['context'] - 16} tokens under a KV budget "
            f"holding {cfg['full_seqs']} at full attention ({record['kv_budget_bytes'] / 2**20:.1f} MiB); speed on "
            f"{Path(record['speed_model']).name} (random weights, "
            f"{cfg.get('speed_length') or cfg['lengths'].split(',')[-1]}-token prompts, "
            f"decode batch {cfg['decode_batch']}, {cfg['threads']} threads, one run). Fast-tier "
            "bytes are measured while decoding (peak: with the last prefill chunk in flight); host bytes are the "
            "spans moved to host memory, which on a CPU machine is the same RAM." +
            (f" **{record['note']}**" if record.get("note") else "") + "\n\n" + markdown(record) +
            f"\n\nReproduce: `python -m bench {' '.join(record['machine']['argv'][1:])}` "
            "(results in `bench/results/long_context.{json,png}`)."
            "\n\n![](bench/results/long_context.png)")


if __name__ == "__main__":
    main()
