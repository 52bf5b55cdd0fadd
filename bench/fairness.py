"""`python -m bench fairness`: does `--scheduling-policy fair` give every client its share, and what does it cost?

One flooding client (many concurrent streams) and several light clients (a few streams each) against a real
`ferry serve` on ferry-tiny, every client always wanting more than an equal share of the running slots (so an equal
share is what fairness owes each). Once with fcfs, then with fair (recompute and swap preemption). Per client: tokens
per second and share of the tokens served in the measured interval, TTFT p50/p99; overall: Jain's fairness index over
the clients' throughputs (1 = equal), total throughput (the cost of fairness: preemptions), preemptions.
Also the copy cost of a swap, block by block vs gather/scatter vs block groups (bench/swap_copy.py).

Writes bench/results/fairness.{json,png} (--smoke: a small run into bench/.cache/smoke/)."""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import time
from pathlib import Path

import httpx

from bench import swap_copy
from bench.common import new_record, result_path
from bench.soak_server import SoakServer

WORDS = "Lily Tom park dog ball sun tree happy ran saw big little red the a and".split()
CONFIGS = {"fcfs": ("fcfs", "recompute"), "fair": ("fair", "recompute"), "fair-swap": ("fair", "swap")}


def jain(xs: list[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n sum x^2), 1 when all equal, 1/n when one client gets everything."""
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs)) if any(xs) else float("nan")


async def _stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, list[float], int]:
    """(seconds to the first token, arrival time of each chunk, completion tokens) of one streamed completion."""
    start, chunks, tokens = time.monotonic(), [], 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {await r.aread()}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event.get("choices"):
                chunks.append(time.monotonic())
    return (chunks[0] - start if chunks else float("nan")), chunks, tokens


async def _client(url: str, user: str, streams: int, args, rng: random.Random, until: float, out: dict) -> None:
    """`streams` closed loops for one client: each sends a request as soon as its previous one ends, until `until`."""
    async def loop(client: httpx.AsyncClient) -> None:
        while time.monotonic() < until:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, args.prompt_words)))
            body = {"prompt": prompt, "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}, "user": user}
            ttft, chunks, tokens = await _stream(client, url, body)
            out["ttft"].append(ttft)
            per_chunk = tokens / len(chunks) if chunks else 0.0  # a chunk may carry more than one token
            out["token_times"] += [(t, per_chunk) for t in chunks]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=streams)) as client:
        await asyncio.gather(*(loop(client) for _ in range(streams)))


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(x for x in xs if x == x)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _workload(url: str, args) -> dict:
    clients = {"flood": args.flood_streams, **{f"light-{i}": args.light_streams for i in range(args.light_clients)}}
    start = time.monotonic()
    lo, hi = start + args.warmup, start + args.warmup + args.duration
    outs = {c: {"ttft": [], "token_times": []} for c in clients}
    rng = random.Random(args.seed)
    await asyncio.gather(*(_client(url, c, n, args, random.Random(rng.random()), hi, outs[c])
                           for c, n in clients.items()))
    rows = {}
    for c, o in outs.items():
        served = sum(n for t, n in o["token_times"] if lo <= t < hi)
        rows[c] = {"streams": clients[c], "tok_s": served / args.duration, "requests": len(o["ttft"]),
                   "ttft_p50_s": _pct(o["ttft"], 0.5), "ttft_p99_s": _pct(o["ttft"], 0.99)}
    total = sum(r["tok_s"] for r in rows.values())
    for r in rows.values():
        r["share"] = r["tok_s"] / total if total else float("nan")
    return {"clients": rows, "total_tok_s": total, "jain": jain([r["tok_s"] for r in rows.values()])}


def _counters(server: SoakServer) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    out = {}
    for name in ("ferry_num_preemptions_total", "ferry_num_fair_preemptions_total"):
        m = re.search(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M)
        out[name.removeprefix("ferry_").removesuffix("_total")] = float(m.group(1)) if m else 0.0
    return out


def run_config(args, policy: str, mode: str) -> dict:
    flags = ("--threads", str(args.threads), "--max-num-seqs", str(args.max_num_seqs), "--max-waiting", "4096",
             "--scheduling-policy", policy, "--preemption-mode", mode)
    with SoakServer(args.model, flags, startup_timeout=3600) as server:  # a loaded machine starts slowly
        asyncio.run(_workload(server.url, argparse.Namespace(**{**vars(args), "duration": 1.0, "warmup": 0.0})))
        server.wait_idle()
        before = _counters(server)
        row = asyncio.run(_workload(server.url, args))
        idle = server.wait_idle()
        after = _counters(server)
    row.update({k: after[k] - before[k] for k in after}, idle_after=idle)
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench fairness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "ferry/assets/ferry-tiny"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=8, help="running slots of the server")
    ap.add_argument("--flood-streams", type=int, default=24, help="concurrent streams of the flooding client")
    ap.add_argument("--light-clients", type=int, default=3)
    ap.add_argument("--light-streams", type=int, default=3, help="concurrent streams of each light client")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=60)
    ap.add_argument("--duration", type=float, default=120.0, help="measured seconds per configuration")
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of load before measuring")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"of {','.join(CONFIGS)}")
    ap.add_argument("--copy-blocks", default="16,128,1024", help="blocks moved per swap in the copy-cost part")
    ap.add_argument("--copy-runs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a small run (a few minutes), into bench/.cache/smoke")
    args = ap.parse_args(argv)
    if args.smoke:
        args.threads, args.max_num_seqs, args.flood_streams, args.light_clients, args.light_streams = 1, 4, 8, 2, 2
        args.max_tokens, args.prompt_words, args.duration, args.warmup = 16, 12, 6.0, 2.0
        args.copy_blocks, args.copy_runs = "8,32", 3
    return args


def main(argv: list[str] | None = None) -> None:
    from bench.fairness_report import plot, print_table

    args = parse_args(argv)
    record = new_record("fairness", "does --scheduling-policy fair give every client its share, at what cost?", args)
    record["configs"] = {}
    for name in args.configs.split(","):
        policy, mode = CONFIGS[name]
        print(f"=== {name} (--scheduling-policy {policy} --preemption-mode {mode}) ===", flush=True)
        record["configs"][name] = run_config(args, policy, mode)
    shapes = ["qwen2.5-0.5b"] if args.smoke else list(swap_copy.SHAPES)
    record["swap_copy"] = swap_copy.measure([int(n) for n in args.copy_blocks.split(",")], args.copy_runs, shapes)
    path = result_path("fairness", args.smoke)
    path.write_text(json.dumps(record, indent=2, default=str))
    print(print_table(record))
    plot(record, path.with_suffix(".png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
