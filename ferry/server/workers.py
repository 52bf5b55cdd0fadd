"""Bounded tokenizer work for the HTTP edge: /tokenize, /detokenize and chat templates run on a small dedicated
thread pool, with a cap on calls in flight (429 past it).

Why not asyncio.to_thread: its default pool has min(32, cores + 4) threads and no queue bound, so a flood of
200 large /tokenize calls ran 6 tokenizations at once on 2 cores (starving the engine thread and the event
loop: /health took 54 s) and held 200 requests' worth of text and ids in memory at once. Here at most
`workers` run and at most `max_pending` are admitted (running or queued); a cancelled call (client gone) still
counts until its thread work ends, so the bound is on real work, not on live requests.

The workers run at a lower CPU priority (nice +10, Linux threads have their own): on 2 cores a flood of large
/tokenize calls otherwise competes on equal terms with the event loop and the engine thread, and /health waited
behind it (114 ms in the soak flood). Tokenization is the work that should yield."""
from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

from ferry.errors import Overloaded

T = TypeVar("T")

DEFAULT_TOKENIZE_WORKERS = 1
DEFAULT_MAX_TOKENIZE_PENDING = 16
WORKER_NICENESS = 10


def _lower_priority() -> None:
    """Pool initializer: this worker thread (only) yields the CPU to the event loop and the engine."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), WORKER_NICENESS))
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


class TokenizerWork:
    def __init__(self, workers: int = DEFAULT_TOKENIZE_WORKERS,
                 max_pending: int = DEFAULT_MAX_TOKENIZE_PENDING) -> None:
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="ferry-tokenize",
                                        initializer=_lower_priority)
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        return self._pending

    def check(self) -> None:
        """Overloaded (429) when max_pending calls are already in. The guard calls it before reading a /tokenize
        body, so a flood is turned away without the event loop reading and parsing each large body."""
        if self._pending >= self.max_pending:
            raise Overloaded(f"{self._pending} tokenizer calls are in progress (max {self.max_pending}); retry later")

    async def run(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the pool; Overloaded (429) when max_pending calls are already in."""
        with self._lock:
            self.check()
            self._pending += 1
        try:
            future: Future[T] = self._pool.submit(fn, *args)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return await asyncio.wrap_future(future)

    def _done(self, _: Future | None) -> None:
        with self._lock:
            self._pending -= 1

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
