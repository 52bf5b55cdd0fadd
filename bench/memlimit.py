"""The same memory limit for every engine: each worker runs inside its own memory cgroup.

A cgroup's limit counts the process's anonymous memory *and* the page cache it brings in (cgroup v1
`memory.limit_in_bytes`, v2 `memory.max`): an engine that reads its weights through the page cache (llama.cpp
with mmap, accelerate's disk offload) can keep no more of them in RAM than the limit leaves, so "on disk"
means on disk for it as for ferry, whose expert reads bypass the page cache (O_DIRECT). A file page already
cached by someone else would still be a free hit (it is charged to whoever read it first), so `drop_cache`
evicts the model files' pages before a worker starts.

    with MemoryLimit(2 << 30, "llama.cpp") as lim:     # lim.prefix goes before the worker's command
        worker = start(..., prefix=lim.prefix)
        ...
        lim.peak_bytes, lim.failcnt                   # what the group used at most; times it hit the limit

Needs a writable cgroup hierarchy (root in this container); `available()` says why not otherwise."""
from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")
_ids = itertools.count()


def _root() -> tuple[Path, str] | None:
    """The parent folder for our groups and the cgroup version ("v1" / "v2"), or None."""
    if (V1 / "memory.limit_in_bytes").exists():
        return V1, "v1"
    if (V2 / "cgroup.controllers").exists() and "memory" in (V2 / "cgroup.controllers").read_text():
        return V2, "v2"
    return None


def available() -> str | None:
    """None when memory cgroups can be made here; else why not."""
    root = _root()
    if root is None:
        return "no memory cgroup hierarchy under /sys/fs/cgroup"
    if not os.access(root[0], os.W_OK):
        return f"{root[0]} is not writable (not root?)"
    return None


class MemoryLimit:
    """A fresh memory cgroup limited to limit_bytes (removed on exit); `prefix` runs a command inside it."""

    def __init__(self, limit_bytes: int, label: str = "worker") -> None:
        root = _root()
        if root is None or available():
            raise RuntimeError(f"cannot limit memory: {available()}")
        base, self.version = root
        self.limit_bytes = int(limit_bytes)
        self.path = base / f"ferry-bench-{os.getpid()}-{next(_ids)}-{label.replace('.', '')}"
        self.path.mkdir()
        if self.version == "v1":
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
        else:
            (self.path / "memory.max").write_text(str(self.limit_bytes))
            (self.path / "memory.swap.max").write_text("0")
        # the shell joins the group, then becomes the worker (exec): the worker and its threads are inside
        self.prefix = ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh"]

    def _read(self, name: str) -> int:
        try:
            return int((self.path / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return -1

    @property
    def peak_bytes(self) -> int:
        """The most the group used (anonymous + page cache), in bytes."""
        return self._read("memory.max_usage_in_bytes" if self.version == "v1" else "memory.peak")

    @property
    def failcnt(self) -> int:
        """How often a charge hit the limit (v1; reclaim happened), or the v2 'max' event count."""
        if self.version == "v1":
            return self._read("memory.failcnt")
        for line in (self.path / "memory.events").read_text().splitlines():
            if line.startswith("max "):
                return int(line.split()[1])
        return -1

    def close(self) -> None:
        """Remove the group once its processes have exited (a group with members cannot be removed)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)

    def __enter__(self) -> "MemoryLimit":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_cache(paths: list[Path]) -> int:
    """Evict the page cache of these files (folders: every file inside), so that the next reader goes to the
    disk; returns the bytes covered. Pages mapped by a running process stay (the kernel keeps them)."""
    total = 0
    for p in paths:
        files = [f for f in Path(p).rglob("*") if f.is_file()] if Path(p).is_dir() else [Path(p)]
        for f in files:
            try:
                fd = os.open(f, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total
