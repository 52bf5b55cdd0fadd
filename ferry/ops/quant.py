"""Weight-only int8/int4 weights: their stored form (`QuantizedWeight`, the same bytes on every CPU), and
`prepare`, which turns one into the linear the level in force runs (`QuantLinear`). Experts and dense weights share
both.

Legend: M rows of x, N outputs, K inputs, G inputs per scale (group).
- int8: codes int8 [N, K]; w = code x scale of its group.
- int4: codes uint8 [N, K/2], in blocks of 32 inputs as llama.cpp's Q4_0: byte i (0..15) of a block holds input
  i in its low nibble and input i + 16 in its high one; nibble u stands for (u - 8) x scale.
- scales float16 [N, K/G]: one per G consecutive inputs of a row (G = K: per output channel). G is K or a multiple
  of 32 dividing K.

`prepare` returns a `KernelLinear` that reads the stored tensors in place (no repacking, so an expert's cache slot
is used as read): at most `qgemv.MAX_M[bits]` rows of x go to the small-M kernel (ferry/ops/qgemv.cpp: x quantized
to int8 per block of 32 on the fly, int32 dot products, float32 sums), more rows dequantize the weight a tile at a
time into a reused scratch and run torch's float32 matmul. `ReferenceLinear` (dequantize, then matmul) is the
oracle both are tested against. The formats hold no CPU-specific order: a weight converted on one machine runs on
any other."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ferry.ops import qgemv


def available() -> bool:
    """True where the native kernel runs (every level with a C++ toolchain); else dequantize-then-matmul."""
    return qgemv.available()


def unavailable_reason() -> str | None:
    return qgemv.unavailable_reason()


class QuantLinear(ABC):
    """A weight-only quantized weight: `w(x)` is x @ W.T for x [M, K] in float32 or bfloat16, in x's dtype."""

    @abstractmethod
    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        """W [N, K] written into out (any float dtype)."""

    @abstractmethod
    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ids [T] of W, dequantized -> [T, K] in dtype: a tied embedding's lookup from the quantized head."""


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

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rows ids [T] of W [N, K] -> [T, K] in dtype, reading only those rows' codes and scales; each value is
        dequantize()'s (code x scale is exact in float32, then one rounding to dtype)."""
        return QuantizedWeight(self.bits, self.group, self.codes[ids], self.scales[ids]).dequantize(dtype)


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

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.qw.rows(ids, dtype)


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] rounded as the kernel rounds it (llama.cpp's Q8_0): per block of 32 inputs, scale d = max|x| / 127
    (float32) and x -> round-half-even(x / d) x d, in x's dtype. K not a multiple of 32: x unchanged."""
    M, K = x.shape
    if K % QBLOCK:
        return x
    xb = x.float().reshape(M, K // QBLOCK, QBLOCK)
    d = xb.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return (torch.round(xb * inv).clamp_(-127, 127) * d).reshape(M, K).to(x.dtype)


class KernelLinear(QuantLinear):
    """The stored tensors used in place: the small-M kernel for at most `qgemv.MAX_M[bits]` rows of x; for more,
    x rounded as the kernel rounds it times the weight dequantized a cache-sized tile at a time (in C++, into a
    scratch tile reused across calls: codes x float16 scales are exact in float32) with torch's float32 matmul,
    then cast to x's dtype (`qgemv.qlinear`). Every M computes the same product up to float32 rounding, so a
    token's result does not depend on the batch it runs in (chunked prefill, an offloaded expert's token count)
    beyond that. The same in bfloat16 would round x and W to 8 bits, and made greedy tokens depend on the batch.
    Where no kernel is built, the same arithmetic in torch (`round_activations`, `QuantizedWeight.dequantize`)."""

    def __init__(self, qw: QuantizedWeight) -> None:
        self.qw = qw
        # the call's arguments, read once: a decode step makes ~100 of these calls, and the Python around the
        # kernel (attribute and shape look-ups) cost about as much as a small matrix's kernel time
        self._args = (qw.codes, qw.scales, qw.bits, qw.group)
        self.shape = qw.shape

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (codes and scales) a decode step reads."""
        return self.qw.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.shape
        x2 = x if x.dim() == 2 else x.reshape(-1, K)
        y = qgemv.qlinear(x2, *self._args)
        if y is None:  # no kernel here: in float32, where codes x scales are exact (as the kernel's)
            y = (round_activations(x2.float()) @ self.qw.dequantize(torch.float32).T).to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], N)

    def dequantize(self, out: torch.Tensor) -> torch.Tensor:
        qw = self.qw
        if qgemv.dequantize(qw.codes, qw.scales, qw.bits, qw.group, out):
            return out
        return out.copy_(qw.dequantize(out.dtype))

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.qw.rows(ids, dtype)


def check(qw: QuantizedWeight) -> None:
    """Raise ValueError naming what is wrong with a stored weight (a corrupted or mismatched folder)."""
    N, K = qw.shape
    reason = check_group(qw.bits, K, qw.group)
    want = (torch.int8 if qw.bits == 8 else torch.uint8, torch.float16)
    if reason is None and (qw.codes.dtype, qw.scales.dtype) != want:
        reason = f"int{qw.bits} needs {want[0]} codes and float16 scales, got {qw.codes.dtype} and {qw.scales.dtype}"
    if reason is None and (qw.codes.dim() != 2 or tuple(qw.scales.shape) != (N, K // qw.group)):
        reason = f"scales {tuple(qw.scales.shape)} do not fit codes {tuple(qw.codes.shape)} with group {qw.group}"
    if reason is None and not (qw.codes.is_contiguous() and qw.scales.is_contiguous()):
        reason = "codes and scales must be contiguous"
    if reason:
        raise ValueError(f"quantized weight [{N}, {K}]: {reason}")


def prepare(qw: QuantizedWeight) -> QuantLinear:
    """The linear for a stored weight at the level in force: the stored tensors in place (no repacking)."""
    check(qw)
    return KernelLinear(qw)
