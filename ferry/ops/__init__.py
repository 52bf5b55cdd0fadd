"""CPU kernels for ferry.

``linear(x, weight, bias)`` is a drop-in for ``torch.nn.functional.linear``.
For decode-sized inputs (few rows of ``x``) on a CPU with AVX-512 it runs a
C++ kernel (``gemv.cpp``) that streams the weight from DRAM about twice as
fast as ``F.linear``; everything else goes to ``F.linear``.

The extension is compiled lazily, on the first call that could use it, with
torch's ``cpp_extension`` toolchain (needs a C++ compiler and ``ninja``), and
cached under ``$FERRY_CACHE_DIR/ops/`` (default ``~/.cache/ferry/ops/``; see ``build.py``).
If the build fails, a warning is logged once and ``F.linear`` is used.
``MAX_M`` is handed to the extension when it loads; change it before the
first call.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from ferry.ops.build import load_extension

__all__ = ["linear", "kernel_available", "cpu_features", "kernel_calls", "MAX_M"]

# Largest number of rows of x sent to the kernel; above it F.linear. Measured
# with bench/gemv.py (Zen 4, 2 threads, weights streamed from DRAM): the
# kernel beats F.linear at every M <= 16 for both dtypes (~2-5x at M=1..4
# where it runs at DRAM speed, 1.3-3x at M=16 where it is compute-bound).
# Past 16 the gain fades (even with MKL/oneDNN around M=32), so 16 is the
# crossover. One exception is decided in C++: float32 with M > 8 and a weight
# under 1 MiB goes to F.linear (both compute-bound there, MKL about as fast).
MAX_M = {torch.float32: 16, torch.bfloat16: 16}

_ext: ModuleType | None = None
_features = 0
_tried = False


def _load() -> ModuleType | None:
    """Compile/load the extension once per process; None if unavailable."""
    global _ext, _features, _tried
    if not _tried:
        ext = load_extension("ferry_gemv", ["gemv.cpp"], ["-O3", "-fopenmp", "-DNDEBUG"])
        if ext is not None:
            ext.set_max_m(MAX_M[torch.float32], MAX_M[torch.bfloat16])
            _features = int(ext.cpu_features())
        _ext, _tried = ext, True
    return _ext


def kernel_available() -> bool:
    """True if the extension is built and at least the float32 kernel runs here."""
    return _load() is not None and bool(_features & 1)


def cpu_features() -> dict[torch.dtype, bool]:
    """Which dtypes the kernel supports on this CPU (all False without the kernel)."""
    _load()
    return {torch.float32: bool(_features & 1), torch.bfloat16: bool(_features & 2)}


def kernel_calls() -> int:
    """How many times the kernel ran in this process (tests, diagnostics)."""
    return int(_ext.kernel_calls()) if _ext is not None else 0


def _may_use_kernel(x: Tensor) -> bool:
    # Cheap pre-check deciding whether a call is worth compiling for.
    if x.device.type != "cpu" or x.dtype not in MAX_M or x.dim() < 1 or x.shape[-1] == 0:
        return False
    return 1 <= x.numel() // x.shape[-1] <= MAX_M[x.dtype]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``torch.nn.functional.linear`` with a fast path for small-M CPU decode.

    The eligibility checks run in C++ (``gemv.cpp: linear``), which falls back
    to ``at::linear`` itself, so a call costs about as much as ``F.linear``.
    """
    ext = _ext
    if ext is not None:
        return ext.linear(x, weight, bias)
    if not _tried and _may_use_kernel(x):
        ext = _load()
        if ext is not None:
            return ext.linear(x, weight, bias)
    return F.linear(x, weight, bias)
