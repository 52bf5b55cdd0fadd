"""What the cluster front end adds to the time to first token: ClusterLLM with one instance against AsyncLLM (no
Ray), same model and threads, requests interleaved one by one (A, B, B, A, ...) so that a shared machine's noise
falls on both alike. Not a bench scenario: a quick before/after check for changes to ferry/cluster.

    python bench/cluster_ttft.py                    # 40 pairs, one request at a time
    python bench/cluster_ttft.py --concurrency 4    # 4 requests in flight on each side (still interleaved)

Prints TTFT p50/mean/p90 per side, the added p50 and mean, and the time per output token after the first."""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ferry import SamplingParams  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "ferry" / "assets" / "ferry-tiny"


async def one(llm, rid: str, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(TTFT, seconds per output token after the first) of one request."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start, first, n = time.perf_counter(), None, 0
    async for out in llm.generate({"prompt_token_ids": prompt}, params, rid):
        if first is None:
            first = time.perf_counter()
        n = len(out.outputs[0].token_ids)
    return first - start, (time.perf_counter() - first) / max(1, n - 1)


async def compare(args: argparse.Namespace) -> None:
    from ferry.cluster.frontend import ClusterLLM
    from ferry.engine.async_engine import AsyncLLM

    opts = {"dtype": "float32", "kv_cache_memory": "64M", "threads": args.threads}
    sides = {"async_llm": AsyncLLM.from_options(args.model, **opts), "cluster_1": ClusterLLM(args.model, 1, opts)}
    rng = random.Random(args.seed)
    ttft: dict[str, list[float]] = {k: [] for k in sides}
    tpot: dict[str, list[float]] = {k: [] for k in sides}
    try:
        for i in range(args.warmup + args.pairs):
            prompts = [[rng.randrange(10, 500) for _ in range(rng.randint(*args.input_len))]
                       for _ in range(args.concurrency)]
            names = list(sides) if i % 2 == 0 else list(reversed(sides))
            for name in names:
                rows = await asyncio.gather(*(one(sides[name], f"{name}-{i}-{j}", p, args.max_tokens)
                                              for j, p in enumerate(prompts)))
                if i >= args.warmup:
                    ttft[name] += [r[0] for r in rows]
                    tpot[name] += [r[1] for r in rows]
    finally:
        for llm in sides.values():
            await llm.shutdown(drain=False, timeout=60)
    for name in sides:
        t = sorted(ttft[name])
        print(f"{name:10s} TTFT ms p50 {1e3 * statistics.median(t):6.2f}  mean {1e3 * statistics.fmean(t):6.2f}  "
              f"p90 {1e3 * t[int(0.9 * len(t))]:6.2f}   TPOT ms p50 {1e3 * statistics.median(tpot[name]):5.2f}  "
              f"(n={len(t)})")
    a, c = ttft["async_llm"], ttft["cluster_1"]
    print(f"added TTFT: p50 {1e3 * (statistics.median(c) - statistics.median(a)):+.2f} ms, "
          f"mean {1e3 * (statistics.fmean(c) - statistics.fmean(a)):+.2f} ms; added TPOT p50 "
          f"{1e3 * (statistics.median(tpot['cluster_1']) - statistics.median(tpot['async_llm'])):+.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(TINY))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--input-len", type=int, nargs=2, default=(16, 64))
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    asyncio.run(compare(ap.parse_args()))


if __name__ == "__main__":
    main()
