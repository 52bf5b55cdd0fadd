"""Weight-only int8/int4 linear for small M (qgemv.cpp), on the stored form of ``ferry.ops.quant`` as is.

Built for every level (portable, avx2, avx512, avx512_bf16: the last with AVX512-VNNI dot products); the level in
force picks the build, so ``FERRY_ISA`` runs the lower paths on this machine too. x is quantized on the fly to int8
per block of 32 inputs (llama.cpp's Q8_0: scale max|x|/127, round to nearest even); block dot products are exact in
int32 and summed in float32. Relative error against dequantize-then-matmul: that of Q8_0 activations, about 0.5%
of the output's norm (tests bound it at 2%); see qgemv.cpp for what each path computes.

``max_m(dtype, bits)`` rows and fewer go to the kernel (decode, an expert's tokens, short prefill chunks); more
(``qmatmul``) round x the same way and dequantize the weight a cache-sized tile of rows at a time into a scratch reused across
calls, each tile multiplied by torch's matmul (float32; bfloat16 for bfloat16 x where the CPU computes it natively),
with no per-call allocation of the dequantized weight.
"""
from __future__ import annotations

import torch

from ferry.ops import cpu
from ferry.ops.cpu import Isa
from ferry.ops.kernel import NativeKernel

KERNEL = NativeKernel("ferry_qgemv", ["qgemv.cpp"], ["-O3", "-fopenmp", "-DNDEBUG", "-ffp-contract=off"],
                      min_isa=Isa.PORTABLE)

# Largest M sent to the kernel, per bit width; above it ``qmatmul``. First measured with bench/qgemv.py against a
# per-call dequantize + float32 matmul (kernel 2-7x faster at M=64, 5x slower at M=512). Remeasured after the
# kernel's scales and qmatmul's tiles (one layer's four Qwen2.5-0.5B linears, bfloat16 x, 1 thread, CPU time,
# interleaved, shared Xeon): int8 kernel / qmatmul 21 / 41 ms at M=64, 60 / 64 at 128, 123 / 102 at 256, 329 / 191
# at 512; int4 13 / 45, 30 / 73, 69 / 101, 151 / 188. int4 does twice the multiply-adds per step of the kernel's
# float work (the per-block scaling), so it stays ahead of the float32 matmul four times longer.
MAX_M = {8: 128, 4: 512}
# bfloat16 x goes to the kernel up to the same rows: below 128 rows the bfloat16 tiles of qmatmul were faster in an
# interleaved run (int8 kernel / qmatmul 21 / 16 ms at M=64, 52 / 22 at 128), but a MoE expert's rows then took a
# path that rounds x differently by row count, and offloaded experts (grouped otherwise) stopped giving the
# in-memory tokens. Above the limit: bfloat16 tiles on native-bf16 CPUs (a quarter of float32's time at 512 rows).
DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    return KERNEL.available()


def unavailable_reason() -> str | None:
    return KERNEL.unavailable_reason()


def path() -> str | None:
    """The code path the kernel runs at the level in force ("avx512_vnni", "avx512", "avx2", "portable")."""
    ext = KERNEL.ext()
    return ext.path() if ext is not None else None


def kernel_calls() -> int:
    """How many times the small-M kernel ran in this process at the level in force (tests, diagnostics)."""
    ext = KERNEL.loaded()
    return int(ext.kernel_calls()) if ext is not None else 0


def qlinear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> torch.Tensor | None:
    """x [M, K] @ W.T -> [M, N] in x's dtype (x rounded to Q8_0 at every M), or None where no kernel takes the
    call (the caller falls back). M <= max_m(dtype, bits): the small-M kernel; more: ``qmatmul`` (W dequantized per
    tile into a reused scratch, torch's matmul in float32, or in bfloat16 for bfloat16 x where the CPU has it)."""
    ext = KERNEL.ext()
    if ext is None or x.dtype not in DTYPES or x.shape[1] % 32:
        return None
    if x.shape[0] <= max_m(x.dtype, bits):
        return ext.qlinear(x, codes, scales, bits, group)
    if x.dtype == torch.bfloat16 and not cpu.native_bf16():  # bf16 matmul emulated here: float32 is faster
        return ext.qmatmul(x.float(), codes, scales, bits, group).to(torch.bfloat16)
    return ext.qmatmul(x, codes, scales, bits, group)


def max_m(dtype: torch.dtype, bits: int) -> int:
    """The most rows of x in `dtype` that go to the small-M kernel at `bits` (at the level in force)."""
    return MAX_M[bits]


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int, out: torch.Tensor) -> bool:
    """W [N, K] written into out (float32 or bfloat16, contiguous); False where the kernel cannot (caller does)."""
    ext = KERNEL.ext()
    if ext is None or out.dtype not in DTYPES or not out.is_contiguous() or out.shape[1] % 32:
        return False
    ext.dequantize(codes, scales, bits, group, out)
    return True
