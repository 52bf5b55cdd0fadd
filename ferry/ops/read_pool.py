"""The native reader pool (read_pool.cpp): threads that read byte ranges of files into memory the caller owns
without taking Python's GIL. Where it cannot be built, ``native_read_pool`` gives None and the caller uses its
Python-thread stand-in with the same interface (``ferry.tiers.read_pool.ThreadReadPool``, the expert store's).
The pool does no arithmetic: one portable build serves every instruction-set level."""
from __future__ import annotations

from typing import Any

from ferry.ops.kernel import NativeKernel

KERNEL = NativeKernel("ferry_read_pool", ["read_pool.cpp"], ["-O2", "-DNDEBUG"], vectorized=False)


def available() -> bool:
    return KERNEL.available()


def unavailable_reason() -> str | None:
    return KERNEL.unavailable_reason()


def native_read_pool(threads: int) -> Any | None:
    """A started native pool of `threads` readers (read_pool.cpp's ReadPool), or None where it cannot be built."""
    ext = KERNEL.ext()
    return ext.ReadPool(threads) if ext is not None else None
