"""Online load against one OpenAI-compatible server, like vLLM's benchmark_serving.

Requests arrive as a Poisson process (exponential gaps at `rate` requests/s; rate inf: all at once), each
streams /v1/completions, and the client timestamps every server-sent chunk. Per request:
    ttft  seconds from sending to the first chunk with text
    tpot  (e2e - ttft) / (output tokens - 1): the mean time per output token after the first
    e2e   seconds from sending to the last chunk
Output tokens are the server's usage.completion_tokens (stream_options.include_usage), else the number of
chunks with text. Prompts are token ids, or for servers that take only text (llama-cpp-python) the words
"w<id>" of bench/models.py's synthetic vocabulary, which its GGUF tokenizes back to the same ids.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import re
import statistics
import time
from dataclasses import asdict, dataclass

import httpx

from bench.peers.servers import Server


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int
    arrival: float          # seconds after the start of the run


@dataclass
class Result:
    num_prompt_tokens: int
    num_output_tokens: int = 0
    ttft: float = math.nan
    e2e: float = math.nan
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.num_output_tokens - 1) if self.num_output_tokens > 1 else math.nan


def workload(num_requests: int, rate: float, input_len: tuple[int, int], output_len: tuple[int, int],
             vocab_size: int, seed: int) -> list[Request]:
    """Seeded: the same requests and arrival times for every engine in a run (fresh ids per seed, so no run
    hits a prefix cache filled by an earlier one)."""
    rng = random.Random(seed)
    t, reqs = 0.0, []
    for _ in range(num_requests):
        ids = [rng.randrange(3, vocab_size) for _ in range(rng.randint(*input_len))]
        reqs.append(Request(ids, rng.randint(*output_len), t))
        if math.isfinite(rate):
            t += rng.expovariate(rate)
    return reqs


def body(server: Server, prompt_ids: list[int], max_tokens: int, stream: bool) -> dict:
    prompt = " ".join(f"w{i}" for i in prompt_ids) if server.prompt_as_text else prompt_ids
    b = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream,
         **server.extra_body}
    if server.min_tokens:
        b["min_tokens"] = max_tokens
    if stream:
        b["stream_options"] = {"include_usage": True}
    return b


async def send(client: httpx.AsyncClient, server: Server, req: Request) -> Result:
    res = Result(len(req.prompt_ids))
    num_chunks = 0
    start = time.perf_counter()
    try:
        async with client.stream("POST", server.url + "/v1/completions",
                                 json=body(server, req.prompt_ids, req.max_tokens, True)) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if num_chunks == 0:
                        res.ttft = now - start
                    num_chunks += 1
                    res.e2e = now - start
                if chunk.get("usage"):
                    res.num_output_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    res.num_output_tokens = res.num_output_tokens or num_chunks
    if not res.error and res.num_output_tokens != req.max_tokens:
        res.error = f"{res.num_output_tokens} output tokens, asked for {req.max_tokens}"
    return res


async def _run(server: Server, reqs: list[Request], timeout: float) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=len(reqs) + 4, max_keepalive_connections=len(reqs) + 4)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None)) as client:
        t0 = time.perf_counter()

        async def one(req: Request) -> Result:
            await asyncio.sleep(max(0.0, req.arrival - (time.perf_counter() - t0)))
            return await send(client, server, req)

        tasks = [asyncio.create_task(one(r)) for r in reqs]
        done, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:  # closing the stream makes the server abort the request
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
    results = [t.result() if t in done else Result(len(r.prompt_ids), error=f"not finished in {timeout:.1f}s")
               for t, r in zip(tasks, reqs)]
    return results, duration


def run(server: Server, reqs: list[Request], timeout: float) -> tuple[list[Result], float]:
    """All requests at their arrival times; (results in request order, seconds from start to the last end)."""
    return asyncio.run(_run(server, reqs, timeout))


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def metrics(results: list[Result], duration: float, slo_ttft: float, slo_tpot: float) -> dict:
    """Throughput, latency percentiles and goodput (requests meeting both SLOs, per second) of one run."""
    ok = [r for r in results if not r.error]
    ttft, tpot, e2e = [r.ttft for r in ok], [r.tpot for r in ok if not math.isnan(r.tpot)], [r.e2e for r in ok]
    good = [r for r in ok if r.ttft <= slo_ttft and (math.isnan(r.tpot) or r.tpot <= slo_tpot)]
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "output_tok_s": sum(r.num_output_tokens for r in ok) / duration,
        "total_tok_s": sum(r.num_output_tokens + r.num_prompt_tokens for r in ok) / duration,
        "request_s": len(ok) / duration,
        "goodput_request_s": len(good) / duration, "slo_attained": len(good) / len(results),
        "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99), "ttft_mean_s": statistics.fmean(ttft) if ttft else math.nan,
        "tpot_p50_s": _pct(tpot, 50), "tpot_p99_s": _pct(tpot, 99), "tpot_mean_s": statistics.fmean(tpot) if tpot else math.nan,
        "e2e_p50_s": _pct(e2e, 50), "e2e_p99_s": _pct(e2e, 99),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def raw(results: list[Result]) -> list[dict]:
    """Per-request numbers for the JSON record (rounded), to recompute any statistic later."""
    return [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in {**asdict(r), "tpot": r.tpot}.items()
             if k != "error" or v} for r in results]


def complete(server: Server, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy, non-streaming; the generated ids read back from the text (words "w<id>", specials dropped)."""
    r = httpx.post(server.url + "/v1/completions", json=body(server, prompt_ids, max_tokens, False), timeout=600)
    r.raise_for_status()
    return [int(m) for m in re.findall(r"w(\d+)", r.json()["choices"][0]["text"])]


def wait_idle(server: Server, timeout: float = 300.0) -> None:
    """Until the server has nothing running or queued (after a run that timed out and cancelled requests)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.busy_metrics:
            text = httpx.get(server.url + "/metrics", timeout=10).text
            busy = sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.split(" ")[0].split("{")[0] in server.busy_metrics)
            if busy == 0:
                return
            time.sleep(0.5)
        else:  # a server that runs one request at a time: a new one finishes after all earlier ones
            complete(server, [5], 1)
            return
    raise TimeoutError(f"{server.name} still busy after {timeout:.0f}s")
