"""Reader threads for the expert store: reads of byte ranges of files into memory the caller owns, demand reads
before prefetches. The caller submits a read and gets a ticket, then collects finished reads (`reap`) or waits
for one (`wait`).

The native pool (ferry/ops/read_pool.cpp) runs its threads without Python's GIL. Python reader threads need the
GIL around each read and its bookkeeping, and on a machine with few cores each handoff delays the compute
thread (a read beside an in-memory decode slowed it about three times as much per byte as the same reads from
another process). Where the C++ extension cannot be built, ThreadReadPool gives the same interface with Python
threads (after the build's one warning)."""
from __future__ import annotations

import ctypes
import os
import threading
import time
from collections import deque
from typing import NamedTuple

from ferry.ops.read_pool import native_read_pool


class Finished(NamedTuple):
    ticket: int
    nbytes: int  # bytes read (fewer than asked: the file ended)
    error: int  # errno, or 0
    seconds: float


def read_pool(threads: int):
    """The native pool, or ThreadReadPool where it cannot be built."""
    pool = native_read_pool(threads)
    return pool if pool is not None else ThreadReadPool(threads)


class ThreadReadPool:
    """read_pool.cpp's ReadPool with Python threads."""

    def __init__(self, threads: int) -> None:
        self._cond = threading.Condition()
        self._demand: deque[int] = deque()
        self._prefetch: deque[int] = deque()
        self._jobs: dict[int, dict] = {}
        self._next = self._in_flight = self._finished = 0
        self._closing = False
        self._threads = [threading.Thread(target=self._loop, name=f"ferry-read-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, fd: int, address: int, nbytes: int, offset: int, demand: bool, drop_cache: bool) -> int:
        with self._cond:
            if self._closing:
                raise RuntimeError("the read pool is closed")
            t, self._next = self._next, self._next + 1
            self._jobs[t] = dict(fd=fd, address=address, nbytes=nbytes, offset=offset, drop=drop_cache, finished=False)
            (self._demand if demand else self._prefetch).append(t)
            self._cond.notify_all()
            return t

    def prioritize(self, t: int) -> bool:
        with self._cond:
            if t not in self._prefetch:
                return False
            self._prefetch.remove(t)
            self._demand.appendleft(t)
            return True

    def pending(self) -> int:
        with self._cond:
            return len(self._demand) + len(self._prefetch) + self._in_flight

    def reap(self) -> list[Finished]:
        with self._cond:
            return self._take_finished()

    def wait(self, ticket: int = -1) -> list[Finished]:
        with self._cond:
            if ticket >= 0:
                if ticket not in self._jobs:
                    raise RuntimeError(f"read {ticket} is unknown or was reaped already")
                self._cond.wait_for(lambda: self._jobs[ticket]["finished"])
            else:
                idle = lambda: not (self._demand or self._prefetch or self._in_flight)  # noqa: E731
                self._cond.wait_for(lambda: self._finished > 0 or idle())
            return self._take_finished()

    def close(self) -> None:
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()

    def _take_finished(self) -> list[Finished]:
        done = [(t, self._jobs.pop(t)) for t in [t for t, j in self._jobs.items() if j["finished"]]]
        self._finished = 0
        return [Finished(t, j["done"], j["error"], j["seconds"]) for t, j in done]

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or self._demand or self._prefetch)
                if not (self._demand or self._prefetch):
                    return
                t = (self._demand or self._prefetch).popleft()
                job = self._jobs[t]
                self._in_flight += 1
            t0 = time.perf_counter()
            buf = memoryview((ctypes.c_char * job["nbytes"]).from_address(job["address"])).cast("B")
            done = error = 0
            while done < job["nbytes"]:
                try:
                    n = os.preadv(job["fd"], [buf[done:]], job["offset"] + done)
                except InterruptedError:
                    continue
                except OSError as e:
                    error = e.errno or 0
                    break
                if n <= 0:
                    break
                done += n
            if job["drop"] and done == job["nbytes"]:
                os.posix_fadvise(job["fd"], job["offset"], job["nbytes"], os.POSIX_FADV_DONTNEED)
            with self._cond:
                self._in_flight -= 1
                job.update(finished=True, done=done, error=error, seconds=time.perf_counter() - t0)
                self._finished += 1
                self._cond.notify_all()
