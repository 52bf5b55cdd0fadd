"""The precision modelkit trains in: bfloat16 autocast where the CPU computes bfloat16 natively, float32 elsewhere.

The shipped models were trained with bf16 autocast (float32 master weights) on a CPU with AVX-512 BF16 / AMX.
A CPU without native bf16 (AVX2-only, or AVX-512 without the BF16 extension) emulates every bf16 op with
float32 arithmetic plus conversions, slower than plain float32, so there autocast is off and the same loop runs
in float32: the same steps, losses and export, with float32's rounding instead of bf16's. `torch.backends.cpu` reports the
instruction set ATen dispatches to (lowered by ATEN_CPU_CAPABILITY=avx2, as the tests do to stand in for an
AVX2-only machine); the CPU flags say whether bf16 instructions exist at all.
"""
from __future__ import annotations

import contextlib
import functools
import torch

from ferry.ops.cpu import cpu_flags

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo names of the x86 bf16 instructions


@functools.cache
def native_bf16() -> bool:
    """Whether bf16 matmuls run in hardware here: AVX-512 kernels selected and a bf16 instruction present."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and bool(BF16_FLAGS & cpu_flags())


def train_dtype() -> torch.dtype:
    """The dtype the forward passes compute in (weights and optimizer state stay float32 either way)."""
    return torch.bfloat16 if native_bf16() else torch.float32


def autocast() -> contextlib.AbstractContextManager:
    """bf16 autocast on a native-bf16 CPU, a no-op (float32) elsewhere."""
    if train_dtype() == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()
