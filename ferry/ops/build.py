"""Compile-on-first-use for ferry's C++ kernels (torch's cpp_extension toolchain, cached on disk).

Each build lives in a folder named by the kernel, the instruction-set level it is built for (``cpu.Isa``) and a
hash of its sources, flags, level and toolchain (torch's version and folder, Python's headers, the compiler), e.g.
``ferry_fused-avx2-1a2b3c4d5e6f``. It compiles a copy of the sources kept there: checkouts of the same code in one
environment share one build instead of rebuilding each other's, an edited kernel gets a fresh folder, and a cache
shared by machines of different CPUs (a network home folder) never hands one CPU a build that uses instructions it
lacks. Builds of one folder are serialized by a lock the OS releases when its holder dies, so a process killed
mid-build never leaves the next one waiting. A kernel that cannot be built (no compiler, no ninja) logs one
warning and its module falls back: to plain torch, or for the expert reader pool to Python threads."""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from ferry.ops.cpu import Isa, compile_flags

log = logging.getLogger("ferry")
_lock = threading.Lock()
_modules: dict[tuple[str, Isa, tuple[str, ...]], ModuleType | None] = {}  # (name, level, cflags) -> loaded or None
HERE = Path(__file__).resolve().parent


def build_dir() -> Path:
    root = os.environ.get("FERRY_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "ferry"
    return base / "ops"


def build_folder(name: str, sources: list[str], cflags: list[str], level: Isa) -> Path:
    """Where `name` built from `sources` with `cflags` at `level` lives (flags include the level's own)."""
    texts = [(HERE / s).read_bytes() for s in sources]
    flags = [*cflags, *compile_flags(level)]
    key = hashlib.sha256(b"\0".join([*texts, " ".join(flags).encode(), level.label.encode(),
                                     *(t.encode() for t in toolchain())]))
    return build_dir() / f"{name}-{level.label}-{key.hexdigest()[:12]}"


def toolchain() -> list[str]:
    """What else goes into the build command: torch's version and install folder, Python's headers, the compiler.

    Two virtual environments with the same sources must not share a folder: their build commands name different
    torch folders, so each would see the other's build as stale and recompile it in turn (under the same lock)."""
    import torch

    return [torch.__version__, str(Path(torch.__file__).resolve().parent), sysconfig.get_path("include") or "",
            os.environ.get("CXX", "c++")]


def load_extension(name: str, sources: list[str], cflags: list[str], level: Isa) -> ModuleType | None:
    """The module compiled for `level` (its instructions enabled, ``FERRY_ISA_LEVEL`` defined), or None after one
    warning if it cannot be built here. Loaded once per process per level."""
    ident = (name, level, tuple(cflags))
    if ident in _modules:
        return _modules[ident]
    with _lock:
        if ident not in _modules:
            _modules[ident] = _build(name, sources, cflags, level)
    return _modules[ident]


def _build(name: str, sources: list[str], cflags: list[str], level: Isa) -> ModuleType | None:
    try:
        d = build_folder(name, sources, cflags, level)
        d.mkdir(parents=True, exist_ok=True)
        srcs = []
        for s in sources:
            if not (d / s).exists():  # written once: an unchanged mtime lets ninja see nothing to do
                (d / f"{s}.tmp").write_bytes((HERE / s).read_bytes())
                os.replace(d / f"{s}.tmp", d / s)
            srcs.append(str(d / s))
        with _folder_lock(d):
            return _compile_or_load(name, srcs, [*cflags, *compile_flags(level)], level, d)
    except Exception as e:  # no compiler, no ninja, bad toolchain
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        log.warning("ferry: could not build the %s kernel (%s: %s); using its fallback", name, type(e).__name__, msg)
        return None


def _compile_or_load(name: str, srcs: list[str], flags: list[str], level: Isa, d: Path) -> ModuleType:
    from torch.utils import cpp_extension

    # One module name per level: torch renames a second load of a name with other flags (name_v1), which
    # would make each process's first load decide the file name and rebuild the other's.
    module = f"{name}_{level.label}"
    compiling = not list(d.glob(f"{module}*.so"))
    if compiling:
        print(f"ferry: compiling CPU kernel {name} for {level.label} (once, about a minute) ...",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    ext = cpp_extension.load(name=module, sources=srcs, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                             build_directory=str(d), verbose=False)
    if compiling:
        print(f"ferry: compiled {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return ext


@contextmanager
def _folder_lock(d: Path) -> Iterator[None]:
    """Hold the folder's build lock (flock: the OS drops it when its holder dies, however it dies).

    cpp_extension takes its own lock, a file that a process killed inside load() leaves behind and every later
    load then waits on forever. Holding ours, no live process is inside load() for this folder, so such a file is
    a leftover and is removed."""
    with open(d / "ferry.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if (d / "lock").exists():
                log.warning("ferry: removing the build lock %s left by a process that died building", d / "lock")
                (d / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
