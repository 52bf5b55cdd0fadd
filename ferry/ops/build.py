"""Compile-on-first-use for ferry's C++ kernels (torch's cpp_extension toolchain, cached on disk).

Each build lives in a folder named by a hash of its sources, flags and torch version, and compiles a copy of
the sources kept there: checkouts of the same code share one build instead of rebuilding each other's, and
an edited kernel gets a fresh folder. A kernel that cannot be built (no compiler, no ninja) logs one warning
and its caller falls back: to plain torch, or for the expert reader pool to Python threads."""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

log = logging.getLogger("ferry")
_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}
HERE = Path(__file__).resolve().parent
STALE_LOCK_S = 600  # a build takes well under a minute: an older lock was left by a process that died mid-build


def build_dir() -> Path:
    root = os.environ.get("FERRY_CACHE_DIR")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "ferry"
    return base / "ops"


def load_extension(name: str, sources: list[str], cflags: list[str]) -> ModuleType | None:
    """The compiled module, or None (after one warning) if it cannot be built here."""
    if name in _modules:
        return _modules[name]
    with _lock:
        if name in _modules:
            return _modules[name]
        try:
            import torch
            from torch.utils import cpp_extension

            texts = [(HERE / s).read_bytes() for s in sources]
            key = hashlib.sha256(b"\0".join([*texts, " ".join(cflags).encode(), torch.__version__.encode()]))
            d = build_dir() / f"{name}-{key.hexdigest()[:12]}"
            d.mkdir(parents=True, exist_ok=True)
            srcs = []
            for s, text in zip(sources, texts):
                if not (d / s).exists():  # written once: an unchanged mtime lets ninja see nothing to do
                    (d / f"{s}.tmp").write_bytes(text)
                    os.replace(d / f"{s}.tmp", d / s)
                srcs.append(str(d / s))
            _clear_stale_lock(d / "lock")
            if not list(d.glob(f"{name}*.so")):
                print(f"ferry: compiling CPU kernel {name} (once) ...", file=sys.stderr, flush=True)
            _modules[name] = cpp_extension.load(name=name, sources=srcs, extra_cflags=cflags,
                                                extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=False)
        except Exception as e:  # no compiler, no ninja, bad toolchain
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            log.warning("ferry: could not build the %s kernel (%s: %s); using plain torch", name, type(e).__name__, msg)
            _modules[name] = None
    return _modules[name]


def _clear_stale_lock(lock: Path) -> None:
    """cpp_extension waits forever on a build lock left behind by a killed process; drop one that old."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        log.warning("ferry: removing a stale kernel build lock %s (%.0f s old)", lock, age)
        lock.unlink(missing_ok=True)
