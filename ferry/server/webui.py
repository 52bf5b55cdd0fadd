"""The built-in web page (issue 24): static files at / and /webui/*, and the engine panel's feed /v1/stats/stream.

The page is plain HTML/CSS/JS shipped in ferry/server/webui/ (no build step, nothing from other hosts); every
response of these routes carries a Content-Security-Policy that allows only this server, so even a rendering bug
cannot load or send anything elsewhere. The page itself is public (it asks for the key); its API calls and the
stats feed live under /v1/, which the guard protects with --api-key like the rest of the API."""
from __future__ import annotations

import asyncio
import json
import pathlib
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from fastapi import FastAPI
from starlette.responses import Response, StreamingResponse

from ferry.engine.stats import EngineStats

if TYPE_CHECKING:
    from ferry.engine.async_engine import AsyncLLM

STATIC_DIR = pathlib.Path(__file__).with_name("webui")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
          ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml"}
STATS_INTERVAL = 1.0  # seconds between two events of /v1/stats/stream


def _headers() -> dict[str, str]:
    return {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache"}


def static_files() -> dict[str, bytes]:
    """name -> bytes of every file the page is made of (read once: the page is a few tens of KB)."""
    return {p.name: p.read_bytes() for p in sorted(STATIC_DIR.iterdir()) if p.suffix in _TYPES}


def add_webui_routes(app: FastAPI) -> None:
    """GET / (the page), GET /webui/{name} (its files)."""
    files = static_files()

    def serve(name: str) -> Response:
        body = files.get(name)
        if body is None:
            return Response("not found", status_code=404, media_type="text/plain", headers=_headers())
        return Response(body, media_type=_TYPES[pathlib.Path(name).suffix], headers=_headers())

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return serve("index.html")

    @app.get("/webui/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        return serve(name)


def add_stats_stream(app: FastAPI, engine: "AsyncLLM", model_name: str) -> None:
    """GET /v1/stats/stream: one SSE event a second with the engine's counters (the numbers of /metrics)."""
    kv_policy = _kv_policy_name(engine)

    @app.get("/v1/stats/stream", include_in_schema=False)
    async def stats_stream() -> Response:
        # app.state.stopping (set by run_server): true once SIGTERM/SIGINT arrived. The feed never ends on its
        # own, and uvicorn's graceful shutdown waits for open responses: an open engine tab must not hold it.
        stopping = getattr(app.state, "stopping", None) or (lambda: False)
        events = stats_events(engine.stats, model_name, kv_policy, STATS_INTERVAL, stopping)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={**_headers(), "X-Accel-Buffering": "no"})


async def stats_events(stats: Callable[[], EngineStats], model_name: str, kv_policy: str, interval: float,
                       stopping: Callable[[], bool] = lambda: False) -> AsyncIterator[str]:
    """SSE events until the client goes away (Starlette cancels the generator then) or the server stops."""
    prev: tuple[float, EngineStats] | None = None
    while not stopping():
        now, s = time.monotonic(), stats()
        yield f"data: {json.dumps(stats_payload(s, prev, now, model_name, kv_policy), separators=(',', ':'))}\n\n"
        prev = (now, s)
        await asyncio.sleep(interval)


def stats_payload(s: EngineStats, prev: tuple[float, EngineStats] | None, now: float, model_name: str,
                  kv_policy: str) -> dict[str, Any]:
    """One event: the /metrics numbers, plus tokens/s since the previous event (None for the first)."""
    gen_tps = prompt_tps = None
    if prev is not None and now > prev[0]:
        dt = now - prev[0]
        gen_tps = (s.num_generation_tokens - prev[1].num_generation_tokens) / dt
        prompt_tps = (s.num_prompt_tokens - prev[1].num_prompt_tokens) / dt
    out: dict[str, Any] = {
        "model": model_name, "kv_policy": kv_policy, "running": s.num_running, "waiting": s.num_waiting,
        "kv_blocks_used": s.num_kv_blocks_used, "kv_blocks_total": s.num_kv_blocks_total,
        "kv_cache_bytes": s.kv_cache_bytes, "kv_host_bytes": s.kv_host_bytes,
        "prefix_cache_hit_rate": s.prefix_cache_hit_rate, "prefix_cache_queries": s.prefix_cache_queries,
        "preemptions": s.num_preemptions, "prompt_tokens": s.num_prompt_tokens,
        "generation_tokens": s.num_generation_tokens, "steps": s.num_steps,
        "generation_tokens_per_s": gen_tps, "prompt_tokens_per_s": prompt_tps, "experts": None}
    e = s.experts
    if e is not None:
        per_token = s.num_generation_tokens or 0
        out["experts"] = {"hit_rate": e.hit_rate, "bytes_read": e.bytes_read, "cache_bytes": e.cache_nbytes,
                          "bytes_read_per_token": e.bytes_read / per_token if per_token else 0.0,
                          "io_stall_seconds": e.stall_seconds,
                          "io_stall_per_token": e.stall_seconds / per_token if per_token else 0.0}
    return out


def _kv_policy_name(engine: "AsyncLLM") -> str:
    """The --kv-policy in use, or '' when the engine does not say (a test double)."""
    limits = getattr(getattr(engine, "inputs", None), "limits", None)
    return str(getattr(limits, "kv_policy", "") or "")
