"""Compile-on-first-use for ferry's C++ kernels (torch's cpp_extension toolchain, cached on disk).

Each build lives in a folder named by the kernel, the instruction-set level it is built for (``cpu.Isa``) and a
hash of its sources, flags, level and torch version, e.g. ``ferry_fused-avx2-1a2b3c4d5e6f``. It compiles a copy of
the sources kept there: checkouts of the same code share one build instead of rebuilding each other's, an edited
kernel gets a fresh folder, and a cache shared by machines of different CPUs (a network home folder) never hands
one CPU a build that uses instructions it lacks. A kernel that cannot be built (no compiler, no ninja) logs one
warning and its module falls back: to plain torch, or for the expert reader pool to Python threads."""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

from ferry.ops.cpu import Isa, compile_flags

log = logging.getLogger("ferry")
_lock = threading.Lock()
_modules: dict[tuple[str, Isa, tuple[str, ...]], ModuleType | None] = {}  # (name, level, cflags) -> loaded or None
HERE = Path(__file__).resolve().parent
STALE_LOCK_S = 600  # a build takes well under a minute: an older lock was left by a process that died mid-build


def build_dir() -> Path:
    root = os.environ.get("FERRY_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "ferry"
    return base / "ops"


def build_folder(name: str, sources: list[str], cflags: list[str], level: Isa) -> Path:
    """Where `name` built from `sources` with `cflags` at `level`, against this torch install, lives."""
    import torch

    texts = [(HERE / s).read_bytes() for s in sources]
    flags = [*cflags, *compile_flags(level)]
    # torch's install folder too: the build's include and library paths point into it, so two virtualenvs with the
    # same torch version would otherwise share a folder whose ninja file each sees as changed, and rebuild in turn
    key = hashlib.sha256(b"\0".join([*texts, " ".join(flags).encode(), level.label.encode(),
                                     torch.__version__.encode(), str(Path(torch.__file__).parent).encode()]))
    return build_dir() / f"{name}-{level.label}-{key.hexdigest()[:12]}"


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
        from torch.utils import cpp_extension

        d = build_folder(name, sources, cflags, level)
        d.mkdir(parents=True, exist_ok=True)
        srcs = []
        for s in sources:
            if not (d / s).exists():  # written once: an unchanged mtime lets ninja see nothing to do
                (d / f"{s}.tmp").write_bytes((HERE / s).read_bytes())
                os.replace(d / f"{s}.tmp", d / s)
            srcs.append(str(d / s))
        _clear_stale_lock(d / "lock")
        # One module name per level: torch renames a second load of a name with other flags (name_v1), which
        # would make each process's first load decide the file name and rebuild the other's.
        module = f"{name}_{level.label}"
        compiling = not list(d.glob(f"{module}*.so"))
        if compiling:
            print(f"ferry: compiling CPU kernel {name} for {level.label} (once, about a minute) ...",
                  file=sys.stderr, flush=True)
        start = time.perf_counter()
        ext = cpp_extension.load(name=module, sources=srcs, extra_cflags=[*cflags, *compile_flags(level)],
                                 extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=False)
        if compiling:
            print(f"ferry: compiled {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        return ext
    except Exception as e:  # no compiler, no ninja, bad toolchain
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        log.warning("ferry: could not build the %s kernel (%s: %s); using its fallback", name, type(e).__name__, msg)
        return None


def _clear_stale_lock(lock: Path) -> None:
    """cpp_extension waits forever on a build lock left behind by a killed process; drop one that old."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("ferry: removing a stale kernel build lock %s (%.0f s old)", lock, age)
        lock.unlink(missing_ok=True)
