"""Compile-on-first-use for ferry's C++ kernels (torch's cpp_extension toolchain, cached on disk).

A kernel that cannot be built (no compiler, no ninja) logs one warning and its caller falls back to
plain torch; `ferry.ops.kernels_report()` says which kernels are live."""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger("ferry")
_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}
HERE = Path(__file__).resolve().parent


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
            from torch.utils import cpp_extension

            # one folder per extension: cpp_extension's build lock is per folder, and a process finding the
            # lock taken assumes its own module is being built there
            d = build_dir() / name
            d.mkdir(parents=True, exist_ok=True)
            srcs = [str(HERE / s) for s in sources]
            newest = max(Path(s).stat().st_mtime for s in srcs)
            if not any(p.stat().st_mtime >= newest for p in d.glob(f"{name}*.so")):
                print(f"ferry: compiling CPU kernel {name} (once) ...", file=sys.stderr, flush=True)
            _modules[name] = cpp_extension.load(name=name, sources=srcs, extra_cflags=cflags,
                                                extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=False)
        except Exception as e:  # no compiler, no ninja, bad toolchain
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            log.warning("ferry: could not build the %s kernel (%s: %s); using plain torch", name, type(e).__name__, msg)
            _modules[name] = None
    return _modules[name]
