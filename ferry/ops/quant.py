"""Weight-only int4 / int8 linears on torch's fused CPU kernels, which read the packed weight once and run
near memory bandwidth with bfloat16 activations (10-50x slower with float32 ones: callers in float32
dequantize instead, see `dequantize`).

Legend: M rows of x, N outputs, K inputs, G inputs per int4 scale (group).
- int4 (`aten._weight_int4pack_mm_for_cpu`): codes u in [0, 15] stand for (u - 8) x scale of their group; the
  kernel takes them packed two per byte in its own tiled order (`pack_int4`, needs N % 64 == 0) and a
  [K/G, N, 2] bf16 tensor of (scale, zero) per group and output. Zeros are 0 here (symmetric), so only the
  scales are stored and the pairs are built per call (K/G x N values, tiny next to the codes).
- int8 (`aten._weight_int8pack_mm`): codes [N, K] int8, one bf16 scale per output row.

torch picks its int4 kernel by its own CPU dispatch level, and only its AVX-512 one reads `pack_int4`'s order (the
AVX2 one expects another, and would compute garbage without an error). So the int4 kernel runs only where torch
dispatches AVX-512 and the level in force (`cpu.isa()`, lowered by ``FERRY_ISA``) is AVX-512; elsewhere an int4
weight is dequantized and multiplied (`available()` says which, `unavailable_reason()` why)."""
from __future__ import annotations

import functools
from abc import ABC, abstractmethod

import torch

from ferry.ops import cpu
from ferry.ops.cpu import Isa

INT4_BLOCK_N = 64  # output rows the int4 kernel packs together (rows j and j + 32 share a byte)


@functools.cache
def _torch_dispatches_avx512() -> bool:
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def available() -> bool:
    """True where torch's int4 kernel runs on `pack_int4`'s layout; False: int4 weights are dequantized per call."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    if cpu.isa() < Isa.AVX512:
        return f"the int4 kernel's packing is AVX-512's; this process runs at {cpu.describe()}"
    if not _torch_dispatches_avx512():
        return (f"torch dispatches its CPU kernels at {torch.backends.cpu.get_cpu_capability()}, whose int4 "
                "packing differs from pack_int4's")
    return None


class QuantLinear(ABC):
    """A weight-only quantized weight: `w(x)` is x @ W.T for x [M, K] in bfloat16."""

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        """W [N, K] written into out (any float dtype)."""


class Int4Linear(QuantLinear):
    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, group: int) -> None:
        self.packed = packed  # uint8 [N, K/2], pack_int4's order
        self.scales = scales  # bf16 [K/G, N]
        self.group = group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not available():  # fallback: W [N, K] dequantized in x's dtype, then a plain matmul
            N, K = self.packed.shape[0], self.packed.shape[1] * 2
            return x @ self.dequantize(torch.empty(N, K, dtype=x.dtype)).T
        scale_zero = torch.stack((self.scales, torch.zeros_like(self.scales)), dim=-1)  # [K/G, N, 2]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group, scale_zero)

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        N, K = out.shape
        q = unpack_int4(self.packed, N, K).to(torch.int16) - 8  # [N, K]
        w = q.reshape(N, K // self.group, self.group).float() * self.scales.float().T[..., None]
        return out.copy_(w.reshape(N, K))


class Int8Linear(QuantLinear):
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes = codes  # int8 [N, K]
        self.scales = scales  # bf16 [N]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.codes, self.scales)

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.codes.float() * self.scales.float()[:, None])


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """Codes u [N, K] (values 0..15) -> uint8 [N, K/2] in the order `_convert_weight_to_int4pack_for_cpu` gives:
    per block of 64 rows, for each input k, 32 bytes whose low nibbles are rows 0-31 and high nibbles rows
    32-63 of the block. A pure permutation: no compute at load time when stored this way."""
    N, K = u.shape
    b = u.to(torch.uint8).reshape(N // INT4_BLOCK_N, 2, INT4_BLOCK_N // 2, K)  # [N/64, half, 32, K]
    return (b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).contiguous().reshape(N, K // 2)  # [N/64, K, 32]


def unpack_int4(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Inverse of pack_int4: uint8 [N, K] codes."""
    p = packed.reshape(N // INT4_BLOCK_N, K, INT4_BLOCK_N // 2).transpose(1, 2)  # [N/64, 32, K]
    return torch.stack((p & 15, p >> 4), dim=1).reshape(N, K)


# ---------------------------------------------------------------------------------------------------------------
# The stored form of a weight-only quantized matrix: CPU-independent, the same bytes on every machine. Kernels
# take it through `prepare`, which repacks (or not) for the kernel the level in force runs. Experts and dense
# weights share it.
#   int8: codes int8 [N, K]; w = code x scale of its group.
#   int4: codes uint8 [N, K/2], in blocks of 32 inputs as llama.cpp's Q4_0: byte i (0..15) of a block holds
#         input i in its low nibble and input i + 16 in its high one; nibble u stands for (u - 8) x scale.
#   scales float16 [N, K/G]: one per `group` G consecutive inputs of a row (G = K: per output channel). G is K or
#   a multiple of 32 dividing K.
# ---------------------------------------------------------------------------------------------------------------
from dataclasses import dataclass  # noqa: E402

QBLOCK = 32  # int4 inputs per packing block
QMAX = {8: 127, 4: 7}


@dataclass(frozen=True)
class QuantizedWeight:
    """W [N, K] as codes and group scales, in the stored form above."""

    bits: int  # 8 or 4
    group: int  # inputs per scale
    codes: torch.Tensor  # int8 [N, K] | uint8 [N, K/2]
    scales: torch.Tensor  # float16 [N, K/G]

    @property
    def shape(self) -> tuple[int, int]:
        n, k = self.codes.shape
        return n, k * (2 if self.bits == 4 else 1)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [N, K] in `dtype`."""
        N, K = self.shape
        q = self.codes.float() if self.bits == 8 else unpack_q4(self.codes).float() - 8
        w = q.reshape(N, K // self.group, self.group) * self.scales.float()[..., None]
        return w.reshape(N, K).to(dtype)


def check_group(bits: int, K: int, group: int) -> str | None:
    """Why `group` cannot split K inputs at `bits`, or None."""
    if bits not in QMAX:
        return f"weight-only quantization is int8 or int4, not {bits} bits"
    if bits == 4 and K % QBLOCK:
        return f"int4 needs the input size ({K}) to be a multiple of {QBLOCK}"
    if group != K and (group % QBLOCK or K % group):
        return f"group size {group} must be {K} (per channel) or a multiple of {QBLOCK} dividing {K}"
    return None


def quantize_weight(w: torch.Tensor, bits: int, group: int) -> QuantizedWeight:
    """Round-to-nearest symmetric quantization of w [N, K]: each group's max |w| maps to the largest code."""
    N, K = w.shape
    reason = check_group(bits, K, group)
    if reason:
        raise ValueError(reason)
    g = w.float().reshape(N, K // group, group)
    scales = (g.abs().amax(dim=-1).clamp(min=1e-12) / QMAX[bits]).to(torch.float16)  # [N, K/G]
    q = torch.round(g / scales.float()[..., None]).clamp(-QMAX[bits] - (bits == 4), QMAX[bits]).reshape(N, K)
    codes = q.to(torch.int8) if bits == 8 else pack_q4((q + 8).to(torch.uint8))
    return QuantizedWeight(bits, group, codes, scales)


def pack_q4(u: torch.Tensor) -> torch.Tensor:
    """Codes u [N, K] (0..15) -> uint8 [N, K/2] in the stored int4 order."""
    N, K = u.shape
    b = u.to(torch.uint8).reshape(N, K // QBLOCK, 2, QBLOCK // 2)
    return (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_q4: uint8 [N, K] codes."""
    N, half = packed.shape
    p = packed.reshape(N, half // (QBLOCK // 2), 1, QBLOCK // 2)
    return torch.cat((p & 15, p >> 4), dim=2).reshape(N, half * 2)


class ReferenceLinear(QuantLinear):
    """Any stored weight on any CPU: dequantize, then a plain matmul (the result every kernel must match)."""

    def __init__(self, qw: QuantizedWeight) -> None:
        self.qw = qw

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.qw.dequantize(x.dtype).T

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.qw.dequantize(out.dtype))


def prepare(qw: QuantizedWeight) -> QuantLinear:
    """The linear for a stored weight on the kernel the level in force runs (repacked for it where needed)."""
    return ReferenceLinear(qw)
