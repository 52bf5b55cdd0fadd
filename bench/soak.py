"""`python -m bench soak`: the abuse campaign of issue 23 against a real `ferry serve` on ferry-tiny, as a repeatable
check rather than a speed benchmark. Phases:

    mixed      many requests, every request field mixed, ~20% random client disconnects
    burst      rounds of 100 simultaneous streams: admitted must equal free running slots + --max-waiting
    bad        malformed and out-of-range bodies: every one a 4xx, never a 5xx
    slow       slow-header and half-body sockets: closed by the read deadlines
    tokenize   a /tokenize flood while /health is timed
    sigterm    SIGTERM with streams in flight: they finish, exit code 0, no traceback in the log
    sigkill    SIGKILL with streams in flight, restart, serve again

Prints a table (sent, outcomes, anomalies per phase; RSS before/after, KV blocks after) and writes
bench/results/soak.{json,png} (--smoke: a small run into bench/.cache/smoke/). An anomaly is anything the
target forbids: a 5xx, a hang, a malformed response, a socket left open, a wrong admission count."""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx

from bench.common import new_record, result_path
from bench.soak_server import Phase, SoakServer

MAX_NUM_SEQS, MAX_WAITING = 16, 8
HEADER_TIMEOUT, BODY_TIMEOUT = 2.0, 3.0
TOKENIZE_PENDING = 4
ROUNDS = 5
WORDS = "Lily Tom park dog ball sun tree happy ran saw big little red the a and".split()


def _random_body(rng: random.Random) -> tuple[str, dict]:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    body: dict = {"max_tokens": rng.randint(1, 48), "stream": rng.random() < 0.5}
    for key, value in (("temperature", rng.choice([0, 0.7, 1.0, 2.0])), ("top_p", rng.choice([0.5, 0.9, 1])),
                       ("top_k", rng.choice([-1, 5, 50])), ("seed", rng.randint(0, 1 << 30)),
                       ("stop", rng.choice([["."], ["the", "and"], "Tom"])), ("n", rng.choice([1, 2])),
                       ("presence_penalty", 0.5), ("ignore_eos", True), ("min_tokens", 1)):
        if rng.random() < 0.3:
            body[key] = value
    if rng.random() < 0.5:
        body["prompt"] = text
        if rng.random() < 0.3:
            body["logprobs"] = rng.choice([0, 2])
        return "/v1/completions", body
    body["messages"] = [{"role": "user", "content": text}]
    if rng.random() < 0.3:
        body.update(logprobs=True, top_logprobs=rng.choice([0, 2]))
    if body.get("stream") and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    return "/v1/chat/completions", body


async def _one_mixed(client: httpx.AsyncClient, url: str, path: str, body: dict, disconnect_after: float | None,
                     phase: Phase) -> None:
    async def go() -> str:
        if body.get("stream"):
            async with client.stream("POST", url + path, json=body) as r:
                lines = [line async for line in r.aiter_lines()]
                if r.status_code != 200:
                    return str(r.status_code)
                events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
                if "data: [DONE]" not in lines or any("error" in e for e in events):
                    phase.anomalies.append(f"stream without [DONE] or with an error event: {body} {lines[-3:]}")
                return "200"
        r = await client.post(url + path, json=body)
        if r.status_code == 200:
            choices = r.json().get("choices") or []
            if len(choices) != body.get("n", 1) or any(c.get("finish_reason") not in ("stop", "length") for c in choices):
                phase.anomalies.append(f"malformed 200: {r.text[:200]}")
        return str(r.status_code)

    try:
        if disconnect_after is None:
            outcome = await asyncio.wait_for(go(), 300)
        else:
            try:
                outcome = await asyncio.wait_for(go(), disconnect_after)
            except asyncio.TimeoutError:
                outcome = "disconnected"
    except asyncio.TimeoutError:
        outcome = "hang"
    except httpx.HTTPError as e:
        outcome = f"error {type(e).__name__}"
    phase.record(outcome, f"{outcome}: {path} {body}" if outcome == "hang" or outcome.startswith(("5", "error"))
                 else None)


async def mixed(server: SoakServer, n: int, seed: int, phase: Phase | None = None) -> Phase:
    phase, rng = phase or Phase("mixed"), random.Random(seed)
    limit = asyncio.Semaphore(MAX_NUM_SEQS + MAX_WAITING // 2)  # some waiting, never over --max-waiting

    async def one(client: httpx.AsyncClient) -> None:
        path, body = _random_body(rng)
        cut = rng.uniform(0.05, 1.5) if rng.random() < 0.2 else None
        async with limit:
            await _one_mixed(client, server.url, path, body, cut, phase)

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=64)) as client:
        await asyncio.gather(*(one(client) for _ in range(n)))
    return phase


async def burst(server: SoakServer, rounds: int, size: int = 100) -> Phase:
    phase = Phase("burst")
    body = {"prompt": "Lily and Tom", "max_tokens": 400, "ignore_eos": True, "stream": True}
    for _ in range(rounds):
        server.wait_idle()
        decided, all_decided = [0], asyncio.Event()

        async def one(client: httpx.AsyncClient) -> str:
            async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
                decided[0] += 1
                if decided[0] == size:
                    all_decided.set()
                if r.status_code == 200:
                    await asyncio.wait_for(all_decided.wait(), 120)
                elif r.status_code == 429 and not r.headers.get("retry-after"):
                    phase.anomalies.append("429 without Retry-After")
                return str(r.status_code)

        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=size)) as client:
            statuses = await asyncio.gather(*(one(client) for _ in range(size)))
        for s in statuses:
            phase.record(s, f"{s} in a burst" if s not in ("200", "429") else None)
        if statuses.count("200") != MAX_NUM_SEQS + MAX_WAITING:
            phase.anomalies.append(f"burst admitted {statuses.count('200')}, expected {MAX_NUM_SEQS + MAX_WAITING}")
    return phase


BAD_BODIES: list[bytes] = [
    b"", b"null", b"[1, 2]", b'"hi"', b"{", b'{"prompt": "hi"} x', b'{"prompt": "caf\xe9 \xff"}',
    b'{"prompt": "a\\ud800b"}', b'{"prompt": "hi", "temperature": NaN}', b'{"prompt": "hi", "max_tokens": 1'
    + b"0" * 5000 + b"}", b'{"max_tokens": 3}', b'{"prompt": 5}', b'{"prompt": "hi", "max_tokens": "ten"}',
    b'{"prompt": "hi", "max_tokens": -1}', b'{"prompt": "hi", "temperature": 1000}', b'{"prompt": "hi", "n": 2.0}',
    b'{"prompt": "hi", "stream": "yes"}', b'{"prompt": "hi", "stop_token_ids": [1000000]}',
    b'{"prompt": [1, 1000000]}', b'{"prompt": "hi", "model": "gpt-17"}', b'{"prompt": "hi", "top_p": 5}',
    b'{"messages": []}', b'{"messages": [{"role": "wizard", "content": "hi"}]}',
]


async def bad(server: SoakServer, repeats: int) -> Phase:
    phase = Phase("bad")
    async with httpx.AsyncClient(timeout=60) as client:
        for _ in range(repeats):
            for raw in BAD_BODIES:
                r = await client.post(server.url + "/v1/completions" if b"messages" not in raw else
                                      server.url + "/v1/chat/completions", content=raw,
                                      headers={"Content-Type": "application/json"})
                ok = 400 <= r.status_code < 500 and "error" in r.json()
                phase.record(str(r.status_code), None if ok else f"{r.status_code} for {raw[:60]!r}")
    return phase


def _main_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "ferry/assets/ferry-tiny"))
    ap.add_argument("--requests", type=int, default=6000, help=f"mixed requests, in {ROUNDS} rounds (default 6000)")
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--bad-repeats", type=int, default=3, help="passes over the bad bodies")
    ap.add_argument("--slow-sockets", type=int, default=5, help="slow-header and half-body sockets, each")
    ap.add_argument("--flood", type=int, default=100, help="concurrent /tokenize calls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="a small run (about a minute), results in bench/.cache/smoke")
    args = ap.parse_args(argv)
    if args.smoke:
        args.requests, args.bursts, args.bad_repeats, args.slow_sockets, args.flood = 50, 1, 1, 2, 20
    return args


def main(argv: list[str] | None = None) -> None:
    from bench.soak_faults import flood, report, sigkill_restart, sigterm_in_flight, slow_sockets

    args = _main_args(argv)
    flags = ("--threads", "1", "--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting", str(MAX_WAITING),
             "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
             "--max-tokenize-pending", str(TOKENIZE_PENDING))
    record = new_record("soak", "does ferry serve stay correct and bounded under abuse?", args)
    started = time.monotonic()
    phases: list[Phase] = []
    with SoakServer(args.model, flags) as server:
        # warm-up, not counted: every kind of work once, a round of mixed requests as big as the counted ones, so
        # the allocators and caches reach their working size before RSS is read
        asyncio.run(mixed(server, args.requests // ROUNDS, args.seed + 1))
        asyncio.run(burst(server, 1))
        asyncio.run(flood(server, max(10, args.flood // 5)))
        server.wait_idle()
        rss_before = server.rss_mb()
        rss_rounds = []
        phases.append(Phase("mixed"))
        for r in range(ROUNDS):  # RSS after each round: a leak shows as a trend
            asyncio.run(mixed(server, args.requests // ROUNDS, args.seed + 10 + r, phases[-1]))
            rss_rounds.append(server.rss_mb())
        phases[-1].rss_mb = rss_rounds[-1]
        for run in (lambda: asyncio.run(burst(server, args.bursts)), lambda: asyncio.run(bad(server, args.bad_repeats)),
                    lambda: slow_sockets(server, args.slow_sockets, HEADER_TIMEOUT, BODY_TIMEOUT)):
            phases.append(run())
            phases[-1].rss_mb = server.rss_mb()
        phase, health_ms = asyncio.run(flood(server, args.flood))
        phases.append(phase)
        idle = server.wait_idle()
        rss_after = phase.rss_mb = server.rss_mb()
        phases.append(sigterm_in_flight(server))
    phases.append(sigkill_restart(args.model, flags))
    record.update(phases=[p.row() for p in phases], rss_before_mb=rss_before, rss_after_mb=rss_after,
                  rss_growth_pct=100 * (rss_after - rss_before) / rss_before, rss_rounds_mb=rss_rounds, idle_after=idle,
                  health_max_ms=health_ms, seconds=time.monotonic() - started,
                  anomalies=sum(len(p.anomalies) for p in phases))
    path = result_path("soak", args.smoke)
    path.write_text(json.dumps(record, indent=2, default=str))
    print(report(record, path.with_suffix(".png")))
    print(f"wrote {path}")
