"""Small-M linear for decode (gemv.cpp): ``linear(x, weight, bias)`` is a drop-in for ``F.linear``.

For decode-sized inputs (few rows of ``x``) at an AVX-512 level it runs a C++ kernel that streams the weight from
DRAM about twice as fast as ``F.linear``; bfloat16 also needs AVX512_BF16. Everything else, and every CPU (or
``FERRY_ISA`` override) below AVX-512, goes to ``F.linear``: the kernel is then never built or loaded, so no
AVX-512 instruction can reach a CPU without it. An AVX2 body (issue 19) slots in as a lower ``min_isa`` with
``#if FERRY_ISA_LEVEL`` in the source. ``MAX_M`` is handed to the extension when it loads; change it before.
"""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from ferry.ops.cpu import Isa
from ferry.ops.kernel import NativeKernel

# Largest number of rows of x sent to the kernel; above it F.linear. Measured
# with bench/gemv.py (Zen 4, 2 threads, weights streamed from DRAM): the
# kernel beats F.linear at every M <= 16 for both dtypes (~2-5x at M=1..4
# where it runs at DRAM speed, 1.3-3x at M=16 where it is compute-bound).
# Past 16 the gain fades (even with MKL/oneDNN around M=32), so 16 is the
# crossover. One exception is decided in C++: float32 with M > 8 and a weight
# under 1 MiB goes to F.linear (both compute-bound there, MKL about as fast).
MAX_M = {torch.float32: 16, torch.bfloat16: 16}


def _configure(ext: ModuleType, level: Isa) -> None:
    ext.set_max_m(MAX_M[torch.float32], MAX_M[torch.bfloat16])


KERNEL = NativeKernel("ferry_gemv", ["gemv.cpp"], ["-O3", "-fopenmp", "-DNDEBUG", "-Wno-psabi"], min_isa=Isa.PORTABLE,
                      on_load=_configure)


def available() -> bool:
    """True if the kernel is built and at least its float32 path runs here."""
    ext = KERNEL.ext()
    return ext is not None and bool(int(ext.cpu_features()) & 1)


def unavailable_reason() -> str | None:
    return KERNEL.unavailable_reason()


def supported_dtypes() -> dict[torch.dtype, bool]:
    """Which dtypes the kernel runs for at the level in force (all False where it is unavailable)."""
    ext = KERNEL.ext()
    bits = int(ext.cpu_features()) if ext is not None else 0
    return {torch.float32: bool(bits & 1), torch.bfloat16: bool(bits & 2)}


def kernel_calls() -> int:
    """How many times the kernel ran in this process at the level in force (tests, diagnostics)."""
    ext = KERNEL.loaded()
    return int(ext.kernel_calls()) if ext is not None else 0


def _may_use_kernel(x: Tensor) -> bool:
    # Cheap pre-check deciding whether a call is worth loading (or compiling) the kernel for.
    if x.device.type != "cpu" or x.dtype not in MAX_M or x.dim() < 1 or x.shape[-1] == 0:
        return False
    return 1 <= x.numel() // x.shape[-1] <= MAX_M[x.dtype]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``torch.nn.functional.linear`` with a fast path for small-M CPU decode.

    The eligibility checks run in C++ (``gemv.cpp: linear``), which falls back
    to ``at::linear`` itself, so a call costs about as much as ``F.linear``.
    """
    ext = KERNEL.loaded()
    if ext is None and not KERNEL.chosen() and _may_use_kernel(x):
        ext = KERNEL.ext()
    if ext is not None:
        return ext.linear(x, weight, bias)
    return F.linear(x, weight, bias)
