"""TokenizerWork: at most max_pending calls in progress (the rest Overloaded), counted until their thread work
ends even when the awaiting request was cancelled."""
from __future__ import annotations

import asyncio
import os
import threading

import pytest

from ferry.errors import Overloaded
from ferry.server.workers import WORKER_NICENESS, TokenizerWork


def test_bound_and_release():
    gate = threading.Event()
    work = TokenizerWork(workers=1, max_pending=3)

    async def run() -> None:
        calls = [asyncio.ensure_future(work.run(gate.wait, 10)) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert work.pending == 3
        with pytest.raises(Overloaded, match="max 3"):
            await work.run(len, "x")
        calls[2].cancel()  # queued, never started: frees its place at once
        await asyncio.sleep(0.05)
        assert work.pending == 2
        calls[0].cancel()  # running: its place is held until the thread finishes
        await asyncio.sleep(0.05)
        assert work.pending == 2
        gate.set()
        assert await calls[1] is True
        await asyncio.sleep(0.05)
        assert work.pending == 0
        assert await work.run(len, "abc") == 3

    asyncio.run(run())
    work.shutdown()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="thread priorities are a Linux feature")
def test_workers_yield_the_cpu():
    """Tokenizer threads run niced, the caller's thread keeps its priority."""
    work = TokenizerWork(workers=1, max_pending=2)
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    try:
        assert asyncio.run(work.run(niceness)) == max(own, WORKER_NICENESS)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
    finally:
        work.shutdown()


def test_guard_turns_a_full_pool_away_before_reading_the_body():
    """A flood of /tokenize calls past the bound gets 429 from the guard, which reads no body (the event loop
    would otherwise read and parse each large text only to refuse it)."""
    from ferry.engine.stats import EngineStats
    from ferry.server.metrics import ServerMetrics
    from ferry.server.middleware import GuardMiddleware

    gate = threading.Event()
    work = TokenizerWork(workers=1, max_pending=1)
    sent: list[dict] = []

    async def app(scope, receive, send) -> None:
        raise AssertionError("the route must not run")

    async def receive() -> dict:
        raise AssertionError("the body must not be read")

    async def send(message: dict) -> None:
        sent.append(message)

    guard = GuardMiddleware(app, api_key=None, max_body_bytes=1 << 20, metrics=ServerMetrics(EngineStats, "m"),
                            tokenizer_work=work)
    scope = {"type": "http", "method": "POST", "path": "/tokenize", "headers": [(b"content-length", b"300000")]}

    async def run() -> None:
        busy = asyncio.ensure_future(work.run(gate.wait, 10))
        await asyncio.sleep(0.05)
        await guard(scope, receive, send)
        gate.set()
        await busy

    asyncio.run(run())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 429
    assert b"tokenizer calls are in progress" in sent[1]["body"]
