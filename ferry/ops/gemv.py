"""Small-M linear for decode (gemv.cpp): ``linear(x, weight, bias)`` is a drop-in for ``F.linear``.

For decode-sized inputs (1..``MAX_M`` rows of ``x``, float32 or bfloat16) it runs a C++ kernel that reads every
weight byte once per call, at every instruction-set level (``cpu.isa()``: the CPU's, or ``FERRY_ISA``'s lower one):

- ``avx512_bf16``: AVX-512 FMA for float32, native bf16 dot products (vdpbf16ps) for bfloat16.
- ``avx512``: AVX-512 FMA; bfloat16 weights are widened to float32 in registers (a 16-bit shift, exact).
- ``avx2`` (AVX2 + FMA + F16C: Haswell, Zen 1-3, Intel client chips): the same kernel on 256-bit vectors, bfloat16
  widened in registers. Before issue 19 these CPUs ran ``F.linear`` for decode (0.52x llama.cpp).
- ``portable``: the same kernel on GCC vector extensions (plain C++, no x86 header: it builds on ARM, where the
  compiler emits NEON). Chosen over ``F.linear`` so a row's result is the same at every M on every path (below);
  its speed against ``F.linear`` is not yet measured on a quiet machine (``FERRY_ISA=portable python bench/gemv.py``):
  on x86 ``F.linear`` dispatches to MKL at the CPU's own width, so the portable body is a correctness floor there.

Everything else (larger M, other dtypes, autograd, non-contiguous weights) goes to ``F.linear``.

Batch invariance: row i of ``linear(x[:m])`` equals ``linear(x[i:i+1])`` bit for bit for every m <= ``MAX_M`` on
every path: each (row of x, row of W) dot product is accumulated in its own vector along K in the same order and
reduced by the same lane tree whatever M and the tile configuration (speculative decoding's verify step relies on
it). ``F.linear`` (M > ``MAX_M``) makes no such promise. Paths differ from each other (FMA vs mul+add, vector
width, bf16 pair sums) within float tolerance, not bit for bit. ``MAX_M`` is handed to the extension when it
loads; change it before.
"""
from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

from ferry.ops.cpu import Isa
from ferry.ops.kernel import NativeKernel

# Largest number of rows of x sent to the kernel; above it F.linear. Measured
# with bench/gemv.py (Zen 4, 2 threads, weights streamed from DRAM, AVX-512):
# the kernel beats F.linear at every M <= 16 for both dtypes (~2-5x at M=1..4
# where it runs at DRAM speed, 1.3-3x at M=16 where it is compute-bound).
# bfloat16 stops at 16: above it oneDNN's AMX / bf16 GEMM is faster. float32
# goes on to 32: MKL's sgemm streams a DRAM-resident weight at a fraction of
# the bandwidth at 17-32 rows, and the 32-request float32 job of `bench
# quantization` went from 1.38x to 1.57x llama.cpp with it (Sapphire Rapids).
# Every M <= MAX_M is batch-invariant (small weights too).
MAX_M = {torch.float32: 32, torch.bfloat16: 16}


def _configure(ext: ModuleType, level: Isa) -> None:
    ext.set_max_m(MAX_M[torch.float32], MAX_M[torch.bfloat16])


KERNEL = NativeKernel("ferry_gemv", ["gemv.cpp"], ["-O3", "-fopenmp", "-DNDEBUG", "-Wno-psabi"], min_isa=Isa.PORTABLE,
                      on_load=_configure)


def available() -> bool:
    """True if the kernel is built and runs on this CPU."""
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
