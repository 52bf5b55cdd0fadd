"""Several engine instances on Ray (`ferry serve --instances N`): what the front end, live migration and the
prefill/decode split cost and buy, on one machine.

Questions:
1. throughput: the same cores as one instance x 2 threads (AsyncLLM, no Ray) or two instances x 1 thread
   (ClusterLLM): output tok/s, TTFT and TPOT p50/p99 under Poisson arrivals with heavy-tailed (Pareto) prompt and
   output lengths, as Llumnix's traces.
2. migration: a request moved in the middle of its decoding, by sequence length: the stop-and-copy pause (the
   request stopped on the source until it runs on the destination), the downtime (until its first token from the
   destination, also in decode steps: over its median inter-token gap), the client-visible gap (the inter-token gap
   around the move against the request's median gap), and the KV bytes and copy time per block (export + import
   in one process: the floor a network transfer adds to).
3. split (Splitwise): prefill:1,decode:1 against 2 colocated instances at the same arrival rate: inter-token
   latency p50/p99 (the split keeps prompts off the decoding instance) and TTFT.
4. front end: what Ray and the front end add, ClusterLLM with one instance x 2 threads against AsyncLLM x 2 threads
   (no Ray), interleaved rounds of the same trace: TTFT p50 difference and throughput ratio; and the memory of the
   local Ray the front end starts (proportional set size of its processes, before any instance).
5. imbalance (Llumnix's case): dispatch cannot know output lengths, so a burst puts the long outputs on one
   instance, whose small KV cache they outgrow, then Poisson arrivals with long and short prompts; two instances
   with --migration-policy off against balance, interleaved rounds of the same trace, pooled: TTFT and TPOT
   p50/p99, throughput, preemptions, migrations (`--only imbalanced` runs this part alone).
6. dispatch: a shared-prefix trace (a few long system prompts, each request one of them plus its own short
   question), two instances with --dispatch-policy least-loaded against cache-aware: TTFT p50/p99, throughput and
   the instances' prefix cache hit rate.

Method: in-process front ends (ClusterLLM as the server runs it, AsyncLLM for one instance); requests are random
token ids (no prefix-cache help), temperature 0 with end-of-sequence disabled, so each produces its drawn length.

    python -m bench cluster             # bench/results/cluster.{json,png} (~15 min on 2 cores)
    python -m bench cluster --smoke     # a small run, bench/.cache/smoke/cluster.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import measured_on, new_record, result_path

from ferry import SamplingParams  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "ferry" / "assets" / "ferry-tiny"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TINY))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-memory", default="64M")
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    ap.add_argument("--input-len", type=int, nargs=2, default=(16, 1024), help="Pareto-distributed in [lo, hi]")
    ap.add_argument("--output-len", type=int, nargs=2, default=(8, 256), help="Pareto-distributed in [lo, hi]")
    ap.add_argument("--migration-lens", type=int, nargs="+", default=[128, 512, 1024, 2048, 4096],
                    help="prompt tokens of the migrated requests")
    ap.add_argument("--migration-model", default="qwen2.5-0.5b",
                    help="a second model the migrations by length also run on (a bench/models.py shape, or a "
                         "folder; '' for none): ferry-tiny's decode step is shorter than a Ray call, a real one's not")
    ap.add_argument("--migration-kv-cache-memory", default="512M", help="per instance, for --migration-model")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the front-end comparison")
    ap.add_argument("--burst", type=int, default=16, help="requests of the imbalanced trace's burst (half long)")
    ap.add_argument("--long-output", type=int, default=512, help="output tokens of the burst's long requests")
    ap.add_argument("--imbalance-kv-cache-memory", default="12M",
                    help="per instance on the imbalanced trace: the long outputs must outgrow one instance's KV, "
                         "not both")
    ap.add_argument("--imbalance-requests", type=int, default=48, help="Poisson arrivals after the burst")
    ap.add_argument("--imbalance-rate", type=float, default=8.0, help="their rate, per second")
    ap.add_argument("--imbalance-prompt-max", type=int, default=1536,
                    help="longest prompt of the arrivals (Pareto from 64): a long one needs most of a KV cache")
    ap.add_argument("--imbalance-at", type=float, default=0.5, help="seconds after the burst they start")
    ap.add_argument("--imbalance-rounds", type=int, default=2,
                    help="interleaved rounds of the imbalanced trace (off, balance, off, ...), pooled")
    ap.add_argument("--only", choices=("imbalanced",), help="run only this part (and write no results file)")
    ap.add_argument("--prefixes", type=int, default=4, help="system prompts of the shared-prefix trace")
    ap.add_argument("--prefix-len", type=int, default=768, help="tokens of each system prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a small run (a few minutes), bench/.cache/smoke/")
    args = ap.parse_args(argv)
    if args.smoke:
        args.num_requests, args.rate, args.input_len, args.output_len = 8, 8.0, (8, 64), (8, 32)
        args.migration_lens, args.kv_cache_memory, args.rounds, args.burst = [32, 96], "16M", 1, 4
        args.long_output, args.imbalance_kv_cache_memory, args.imbalance_requests = 64, "4M", 6
        args.imbalance_rounds, args.imbalance_at, args.imbalance_prompt_max = 1, 0.3, 512
        args.migration_model, args.migration_kv_cache_memory = "tiny-qwen2", "16M"
        args.prefixes, args.prefix_len = 2, 64
    return args


def _pareto(rng: random.Random, lo: int, hi: int, alpha: float = 1.2) -> int:
    return min(hi, int(lo * rng.paretovariate(alpha)))


def workload(args: argparse.Namespace) -> list[tuple[float, list[int], int]]:
    """(arrival s, prompt token ids, output tokens) per request, seeded."""
    rng, t, out = random.Random(args.seed), 0.0, []
    for _ in range(args.num_requests):
        t += rng.expovariate(args.rate)
        prompt = [rng.randrange(10, 500) for _ in range(_pareto(rng, *args.input_len))]
        out.append((t, prompt, _pareto(rng, *args.output_len)))
    return out


async def _one(llm, rid: str, arrival: float, prompt: list[int], max_tokens: int, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
    start, times = time.perf_counter(), []
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    n = 0
    async for out in llm.generate({"prompt_token_ids": prompt}, params, rid):
        now = time.perf_counter()
        times += [now] * (len(out.outputs[0].token_ids) - n)
        n = len(out.outputs[0].token_ids)
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"ttft": times[0] - start, "tpot": (times[-1] - times[0]) / max(1, n - 1), "gaps": gaps, "tokens": n,
            "end": times[-1]}


def imbalanced(args: argparse.Namespace) -> list[tuple[float, list[int], int]]:
    """Llumnix's case: output lengths that dispatch cannot know pile the long requests on one instance until its KV
    is full. A burst of args.burst requests with 64-token prompts, outputs alternating args.long_output and 8 tokens
    (all alike when they arrive: dispatch by committed KV alternates them, every long one on the first instance);
    the long ones outgrow its KV cache (args.imbalance_kv_cache_memory) while the short ones free the second. Then
    args.imbalance_requests Poisson arrivals at args.imbalance_rate from args.imbalance_at s, outputs 8-64 tokens
    (Pareto), a third of the prompts long (half to all of args.imbalance_prompt_max), the rest 64 to a quarter of
    it (Pareto): when dispatch sends one to the instance of the long outputs, it finds the KV taken by requests
    that do not end soon, and waits there (or is preempted) while the other instance's KV frees."""
    rng = random.Random(args.seed + 1)
    burst = [(0.001 * i, [rng.randrange(10, 500) for _ in range(64)], args.long_output if i % 2 == 0 else 8)
             for i in range(args.burst)]
    t, rest = args.imbalance_at, []
    for _ in range(args.imbalance_requests):
        t += rng.expovariate(args.imbalance_rate)
        hi = args.imbalance_prompt_max  # a third of the prompts long: they need most of a KV cache
        n = rng.randrange(hi // 2, hi + 1) if rng.random() < 1 / 3 else _pareto(rng, 64, hi // 4)
        prompt = [rng.randrange(10, 500) for _ in range(n)]
        rest.append((t, prompt, _pareto(rng, 8, 64)))
    return burst + rest


def shared_prefix(args: argparse.Namespace) -> list[tuple[float, list[int], int]]:
    """args.num_requests Poisson arrivals, each one of args.prefixes system prompts of args.prefix_len tokens plus
    its own 32-token question, 32 tokens out."""
    rng, t, out = random.Random(args.seed + 2), 0.0, []
    systems = [[rng.randrange(10, 500) for _ in range(args.prefix_len)] for _ in range(args.prefixes)]
    for _ in range(args.num_requests):
        t += rng.expovariate(args.rate)
        out.append((t, rng.choice(systems) + [rng.randrange(10, 500) for _ in range(32)], 32))
    return out


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def trace_rows(llm, trace: list, tag: str) -> tuple[list[dict], float]:
    """Each request's measures, and the seconds from the trace's start to its last token."""
    t0 = time.perf_counter()
    rows = await asyncio.gather(*(_one(llm, f"{tag}-{i}", a, p, m, t0) for i, (a, p, m) in enumerate(trace)))
    return list(rows), max(r["end"] for r in rows) - t0


def summarize(rows: list[dict], seconds: float) -> dict:
    gaps = [g for r in rows for g in r["gaps"]]
    return {"output_tok_s": sum(r["tokens"] for r in rows) / seconds,
            "ttft_p50_s": _pct([r["ttft"] for r in rows], 0.5), "ttft_p99_s": _pct([r["ttft"] for r in rows], 0.99),
            "tpot_p50_s": _pct([r["tpot"] for r in rows], 0.5), "tpot_p99_s": _pct([r["tpot"] for r in rows], 0.99),
            "itl_p50_s": _pct(gaps, 0.5), "itl_p99_s": _pct(gaps, 0.99), "seconds": seconds}


async def serve_trace(llm, trace: list, tag: str) -> dict:
    return summarize(*await trace_rows(llm, trace, tag))


async def migration_gaps(cluster, lens: list[int], seed: int) -> list[dict]:
    """One request per prompt length, moved once it has 8 tokens: pause, visible gap, blocks. A first move, not
    recorded, warms the migration path up (Ray's first calls of it are slower than its steady state: on a busy
    machine a short request could end before it), and each request has 88 tokens left to move with."""
    rng, rows = random.Random(seed), []
    for i, n in enumerate([lens[0], *lens]):
        prompt = [rng.randrange(10, 500) for _ in range(n)]
        params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
        times, task, moved_at = [], None, None
        m = cluster._migrations
        pause0, down0, blocks0 = m.pause.total, m.downtime.total, m.num_blocks
        rid = f"move-{n}" if i else "move-warm-up"
        async for out in cluster.generate({"prompt_token_ids": prompt}, params, rid):
            times.append(time.perf_counter())
            if task is None and len(out.outputs[0].token_ids) >= 8:
                task, moved_at = asyncio.create_task(cluster.migrate(rid)), len(times)
        outcome = await task
        if not i:
            continue
        gaps = [b - a for a, b in zip(times, times[1:])]
        around = gaps[moved_at - 1:]  # from the move's start (stages, then the stop) to the end of the request
        step = statistics.median(gaps)  # the request's decode step, as its client sees it
        rows.append({"model": Path(cluster._model).name, "prompt_tokens": n, "outcome": outcome, "pause_ms": 1e3 * (m.pause.total - pause0),
                     "downtime_ms": 1e3 * (m.downtime.total - down0), "downtime_steps": (m.downtime.total - down0) / step,
                     "blocks": m.num_blocks - blocks0, "median_gap_ms": 1e3 * step,
                     "max_gap_around_move_ms": 1e3 * max(around) if around else float("nan")})
    return rows


async def front_end_cost(one, cluster, trace: list, rounds: int) -> dict:
    """Interleaved rounds of the same trace on AsyncLLM (no Ray) and a one-instance ClusterLLM (same threads)."""
    runs: dict[str, list[dict]] = {"no_ray": [], "ray_1_instance": []}
    for r in range(rounds):
        order = [("no_ray", one), ("ray_1_instance", cluster)]
        for name, llm in order[r % 2:] + order[:r % 2]:
            runs[name].append(await serve_trace(llm, trace, f"{name}-{r}"))
    med = {k: {m: statistics.median(run[m] for run in v) for m in v[0]} for k, v in runs.items()}
    return {**med, "rounds": runs,
            "ttft_p50_added_ms": 1e3 * (med["ray_1_instance"]["ttft_p50_s"] - med["no_ray"]["ttft_p50_s"]),
            "throughput_ratio": med["ray_1_instance"]["output_tok_s"] / med["no_ray"]["output_tok_s"]}


def copy_cost(args: argparse.Namespace) -> dict:
    """KV bytes per block and export + import time per block, in one process (no Ray, no network)."""
    from ferry import LLM
    src, dst = (LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory, threads=1) for _ in range(2))
    eng = src.engine
    prompt = [10 + i % 490 for i in range(max(args.migration_lens))]  # in every model's vocabulary
    eng.add_processed("c", eng.inputs.process({"prompt_token_ids": prompt},
                                              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)))
    while not any(r.num_output_tokens for r in src.view().running):
        eng.step()
    start = time.perf_counter()
    blocks = eng.migration.export_full("c", 0)
    mid = time.perf_counter()
    dst.engine.migration.receive("c", blocks)
    end = time.perf_counter()
    dst.engine.migration.cancel("c")
    eng.abort_request("c")
    return {"blocks": blocks.num_blocks, "bytes_per_block": blocks.nbytes / blocks.num_blocks,
            "export_us_per_block": 1e6 * (mid - start) / blocks.num_blocks,
            "import_us_per_block": 1e6 * (end - mid) / blocks.num_blocks}


def _run(cluster, trace: list, tag: str) -> dict:
    """One trace on a ClusterLLM, which is shut down after it."""
    try:
        return asyncio.run(serve_trace(cluster, trace, tag))
    finally:
        asyncio.run(cluster.shutdown(drain=False, timeout=60))


def policies(args: argparse.Namespace, opts: dict, record: dict) -> None:
    """The shared-prefix trace under each dispatch policy, and the usual trace on a prefill/decode split, each on
    2 instances."""
    from ferry.cluster.frontend import ClusterLLM
    from ferry.engine.options import parse_instance_roles
    for policy in ("least-loaded", "cache-aware"):
        c = ClusterLLM(args.model, 2, opts, dispatch_policy=policy)
        row = record[f"prefix_{policy}"] = asyncio.run(serve_trace(c, shared_prefix(args), f"pre-{policy}"))
        stats = [s for s in c.instance_stats() if s is not None]
        asyncio.run(c.shutdown(drain=False, timeout=60))
        row["prefix_cache_hit_rate"] = sum(s.prefix_cache_hits for s in stats) / max(
            1, sum(s.prefix_cache_queries for s in stats))
    pd = ClusterLLM(args.model, 2, opts, roles=parse_instance_roles("prefill:1,decode:1"))
    handovers = pd._migrations.outcomes
    record["split_prefill_1_decode_1"] = _run(pd, workload(args), "pd")
    record["split_handovers"] = dict(handovers)


def imbalance(args: argparse.Namespace, opts: dict, record: dict) -> None:
    """The imbalanced trace on 2 instances, --migration-policy off and balance in interleaved rounds (the same trace
    each time: the machine's noise hits both alike), pooled over the rounds: TTFT, TPOT, throughput, the
    instances' preemptions and the migrations."""
    from ferry.cluster.frontend import ClusterLLM
    trace = imbalanced(args)
    opts = {**opts, "kv_cache_memory": args.imbalance_kv_cache_memory}
    rows, seconds = {"off": [], "balance": []}, {"off": 0.0, "balance": 0.0}
    counts = {p: {"preemptions": 0, "migrations": {}} for p in rows}
    for r in range(args.imbalance_rounds):
        for policy in rows:
            c = ClusterLLM(args.model, 2, opts, migration_policy=policy)
            try:
                got, span = asyncio.run(trace_rows(c, trace, f"imb-{policy}-{r}"))
                stats = [s for s in c.instance_stats() if s is not None]
            finally:
                asyncio.run(c.shutdown(drain=False, timeout=60))
            rows[policy] += got
            seconds[policy] += span
            counts[policy]["preemptions"] += sum(s.num_preemptions for s in stats)
            for outcome, n in c._migrations.outcomes.items():
                counts[policy]["migrations"][outcome] = counts[policy]["migrations"].get(outcome, 0) + n
            print(f"imbalanced {policy} round {r}: {summarize(got, span)} {counts[policy]}", flush=True)
    for policy in rows:
        record[f"imbalanced_{policy}"] = {**summarize(rows[policy], seconds[policy]), **counts[policy],
                                          "rounds": args.imbalance_rounds}


def migrations(args: argparse.Namespace, opts: dict, record: dict) -> None:
    """The usual trace on 2 instances x 1 thread, then one request per length moved mid-decode, on ferry-tiny
    and on --migration-model."""
    from ferry.cluster.frontend import ClusterLLM
    two = ClusterLLM(args.model, 2, opts)
    record["two_instances_1_thread"] = asyncio.run(serve_trace(two, workload(args), "two"))
    record["migrations"] = asyncio.run(migration_gaps(two, args.migration_lens, args.seed))
    asyncio.run(two.shutdown(drain=False, timeout=60))
    if args.migration_model:  # the same moves on a model whose decode step is not shorter than a Ray call
        from bench import models
        big = ClusterLLM(str(models.resolve(args.migration_model)), 2,
                         {"dtype": "auto", "kv_cache_memory": args.migration_kv_cache_memory, "threads": 1})
        record["migrations"] += asyncio.run(migration_gaps(big, args.migration_lens, args.seed))
        asyncio.run(big.shutdown(drain=False, timeout=60))


def main(argv: list[str] | None = None) -> None:
    from ferry.cluster.frontend import ClusterLLM
    from ferry.engine.async_engine import AsyncLLM

    args = parse_args(argv)
    record = new_record("cluster", "what do several instances, live migration and the prefill/decode split cost "
                                   "and buy on one machine?", args)
    opts = {"dtype": args.dtype, "kv_cache_memory": args.kv_cache_memory, "threads": 1}
    if args.only == "imbalanced":
        imbalance(args, opts, record)
        print(imbalance_table(record))
        return

    async def front_end() -> dict:
        one = AsyncLLM.from_options(args.model, **{**opts, "threads": 2})
        c1 = ClusterLLM(args.model, 1, {**opts, "threads": 2})
        record["ray_memory_bytes"] = c1.ray_memory_bytes
        try:
            return await front_end_cost(one, c1, workload(args), args.rounds)
        finally:
            await one.shutdown()
            await c1.shutdown(drain=False, timeout=60)
    record["front_end"] = asyncio.run(front_end())
    record["one_instance_2_threads"] = record["front_end"]["no_ray"]
    imbalance(args, opts, record)
    policies(args, opts, record)
    migrations(args, opts, record)
    record["copy_cost"] = copy_cost(args)
    path = result_path("cluster", args.smoke)
    path.write_text(json.dumps(record, indent=2, default=str))
    plot(record, path.with_suffix(".png"))
    print(report(record))
    print(f"wrote {path}")


def report(record: dict) -> str:
    lines = ["| setup | output tok/s | TTFT p50/p99 s | TPOT p50/p99 s | ITL p50/p99 s |", "|---|---|---|---|---|"]
    for key in ("one_instance_2_threads", "two_instances_1_thread", "split_prefill_1_decode_1"):
        r = record[key]
        lines.append(f"| {key} | {r['output_tok_s']:.1f} | {r['ttft_p50_s']:.3f}/{r['ttft_p99_s']:.3f} | "
                     f"{r['tpot_p50_s']:.4f}/{r['tpot_p99_s']:.4f} | {r['itl_p50_s']:.4f}/{r['itl_p99_s']:.4f} |")
    f = record["front_end"]
    lines.append(f"\nfront end (Ray, 1 instance x 2 threads vs no Ray, median of {len(f['rounds']['no_ray'])} "
                 f"interleaved rounds): TTFT p50 +{f['ttft_p50_added_ms']:.1f} ms, throughput "
                 f"{f['throughput_ratio']:.3f}x; local Ray's processes {record['ray_memory_bytes'] / 2**20:.0f} MiB")
    lines += ["", imbalance_table(record)]
    lines += ["", "| shared-prefix trace, 2 instances | output tok/s | TTFT p50/p99 s | prefix cache hit rate |",
              "|---|---|---|---|"]
    for policy in ("least-loaded", "cache-aware"):
        r = record[f"prefix_{policy}"]
        lines.append(f"| --dispatch-policy {policy} | {r['output_tok_s']:.1f} | {r['ttft_p50_s']:.3f}/"
                     f"{r['ttft_p99_s']:.3f} | {r['prefix_cache_hit_rate']:.0%} |")
    lines += ["", "| model | prompt tokens | outcome | blocks | pause ms | downtime ms | downtime in decode steps | "
                  "median gap ms | client's largest gap from the move on, ms |", "|---|---|---|---|---|---|---|---|---|"]
    for m in record["migrations"]:
        lines.append(f"| {m['model']} | {m['prompt_tokens']} | {m['outcome']} | {m['blocks']} | {m['pause_ms']:.1f} | "
                     f"{m['downtime_ms']:.1f} | {m['downtime_steps']:.1f} | {m['median_gap_ms']:.1f} | "
                     f"{m['max_gap_around_move_ms']:.1f} |")
    c = record["copy_cost"]
    lines.append(f"\nKV block: {c['bytes_per_block'] / 1024:.1f} KiB, export {c['export_us_per_block']:.0f} us + "
                 f"import {c['import_us_per_block']:.0f} us per block (one process)")
    return "\n".join(lines)


def imbalance_table(record: dict) -> str:
    rounds = record["imbalanced_off"].get("rounds", 1)
    lines = ["| imbalanced trace, 2 instances | output tok/s | TTFT p50/p99 s | TPOT p50/p99 s | "
             f"preemptions ({rounds} rounds) | migrations ({rounds} rounds) |", "|---|---|---|---|---|---|"]
    for policy in ("off", "balance"):
        r = record[f"imbalanced_{policy}"]
        lines.append(f"| --migration-policy {policy} | {r['output_tok_s']:.1f} | {r['ttft_p50_s']:.3f}/"
                     f"{r['ttft_p99_s']:.3f} | {r['tpot_p50_s']:.4f}/{r['tpot_p99_s']:.4f} | "
                     f"{r.get('preemptions', 0)} | {r['migrations'].get('migrated', 0)} |")
    return "\n".join(lines)


LINKS_GBIT = (1, 10, 25)  # network links the multi-host table prices a KV block on
QWEN_05B_BLOCK = 24 * 2 * 16 * 2 * 64 * 2  # Qwen2.5-0.5B's KV block: layers, K/V, tokens, KV heads, head dim, bf16


def network_table(copy: dict) -> str:
    """What moving KV between hosts would cost, from the measured per-block copy cost (export + import, scaled
    by bytes) plus the bytes on the wire: per block, for a 4K-token request's staged copy, and for its
    stop-and-copy (the last block only), for ferry-tiny's block and Qwen2.5-0.5B's."""
    us_per_byte = (copy["export_us_per_block"] + copy["import_us_per_block"]) / copy["bytes_per_block"]
    lines = ["| KV block | link | per block ms | 4K tokens staged (256 blocks) ms | stop-and-copy (1 block) ms |",
             "|---|---|---|---|---|"]
    for name, nbytes in (("ferry-tiny f32, " + f"{copy['bytes_per_block'] / 1024:.0f} KiB", copy["bytes_per_block"]),
                         (f"Qwen2.5-0.5B bf16, {QWEN_05B_BLOCK / 1024:.0f} KiB", QWEN_05B_BLOCK)):
        for gbit in LINKS_GBIT:
            ms = 1e-3 * us_per_byte * nbytes + 1e3 * nbytes * 8 / (gbit * 1e9)
            lines.append(f"| {name} | {gbit} Gbit/s | {ms:.3f} | {256 * ms:.0f} | {ms:.2f} |")
    return "\n".join(lines)


def section(record: dict) -> str:
    """docs/cluster.md's block: report()'s tables under the run they come from."""
    from bench.report import command
    cfg = record["config"]
    return ("### Several instances on Ray\n\n"
            f"{measured_on(record)}; {Path(cfg['model']).name} at {cfg['dtype']}, {cfg['num_requests']} requests, "
            f"Poisson arrivals at {cfg['rate']:g}/s, prompts {cfg['input_len'][0]}–{cfg['input_len'][1]} and outputs "
            f"{cfg['output_len'][0]}–{cfg['output_len'][1]} tokens (Pareto), greedy. Pause: from the source's stop to "
            "the request running on the destination; downtime: from the source's stop to the first token from the "
            "destination (Llumnix's measure), also over the request's median inter-token gap (its decode step); "
            "client gap: the largest inter-token gap the client saw from the move's start to its last token.\n\n" + report(record)
            + "\n\nOn several hosts (`--ray-address`), a block also crosses the network. Priced from the copy cost "
              "measured above (scaled by bytes) plus the bytes on the wire:\n\n" + network_table(record["copy_cost"])
            + f"\n\nReproduce: `{command(record)}` (results in `bench/results/cluster.json`)."
              "\n\n![](bench/results/cluster.png)")


def plot(record: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    keys = ("one_instance_2_threads", "two_instances_1_thread", "split_prefill_1_decode_1")
    labels = ("1 x 2 threads", "2 x 1 thread", "prefill:1,decode:1")
    for i, (name, q) in enumerate((("itl_p50_s", "ITL p50"), ("itl_p99_s", "ITL p99"))):
        a.bar([x + 0.4 * i for x in range(3)], [1e3 * record[k][name] for k in keys], 0.4, label=q)
    a.set_xticks([x + 0.2 for x in range(3)], labels, fontsize=8)
    a.set_ylabel("inter-token latency, ms")
    a.legend(fontsize=8)
    for model in dict.fromkeys(r["model"] for r in record["migrations"]):
        m = [r for r in record["migrations"] if r["model"] == model]
        b.plot([r["prompt_tokens"] for r in m], [r["downtime_steps"] for r in m], "o-", label=f"{model}: downtime")
    b.axhline(2.0, color="k", lw=0.8, ls="--", label="2 decode steps")
    b.set_xscale("log", base=2)
    b.set_xlabel("prompt tokens of the migrated request")
    b.set_ylabel("decode steps (the request's median token gap)")
    b.legend(fontsize=8)
    for i, policy in enumerate(("off", "balance")):
        r = record[f"imbalanced_{policy}"]
        c.bar([x + 0.4 * i for x in range(2)], [r["ttft_p99_s"], r["tpot_p99_s"] * 100], 0.4,
              label=f"--migration-policy {policy}")
    c.set_xticks([0.2, 1.2], ["TTFT p99, s", "TPOT p99, s x 100"], fontsize=8)
    c.set_title("imbalanced trace, 2 instances", fontsize=9)
    c.legend(fontsize=8)
    fig.suptitle(f"cluster: {Path(record['config']['model']).name}, {record['config']['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
