"""Expert-wise bitwidth (EdgeMoE): an expert stored as int8 or int4, to cut the bytes read and held per expert
2-4x. Lossy: a store with quantized experts does not reproduce the bf16/f32 model's tokens (check with
`ferry eval`); an offloaded run still gives exactly the tokens of the same store with every expert in RAM.

Records are kept in the layout of torch's fused weight-only kernels (ferry/ops/quant.py), so a read expert
is used in place, with no unpacking, when the engine runs bfloat16:
  - int4: symmetric, one bf16 scale per `group` consecutive inputs of a row (max |w| of the group -> 7);
    codes packed in the int4 kernel's tiled order, scales [K/G, N];
  - int8: symmetric, one bf16 scale per row (what `_weight_int8pack_mm` takes).
A record is  gate_up codes | gate_up scales | down codes | down scales, each part 64-byte aligned, padded to
ALIGN. In float32 the fused kernels are slow, so `unpack` dequantizes into a scratch pair instead."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.ops.quant import INT4_BLOCK_N, Int4Linear, Int8Linear, QuantLinear, pack_int4
from ferry.tiers.disk import ALIGN, align_up

QMAX = {8: 127, 4: 7}


def group_size_for(*in_dims: int) -> int:
    """The largest of 128, 64, 32 dividing every input dim (gate_up: D, down: I); 0 if none does."""
    for g in (128, 64, 32):
        if all(d % g == 0 for d in in_dims):
            return g
    return 0


def quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> stored (codes, scales): int8 [N, K] and bf16 [N] for 8 bits (group unused); for 4 bits
    uint8 [N, K/2] in pack_int4's order and bf16 [K/G, N]."""
    rows, cols = w.shape
    group = cols if bits == 8 else group
    g = w.float().reshape(rows, cols // group, group)
    scales = (g.abs().amax(dim=-1).clamp(min=1e-12) / QMAX[bits]).to(torch.bfloat16)  # [N, K/G]
    q = torch.round(g / scales.float()[..., None]).clamp(-QMAX[bits] - (bits == 4), QMAX[bits]).reshape(rows, cols)
    if bits == 8:
        return q.to(torch.int8), scales.reshape(rows)
    return pack_int4((q + 8).to(torch.uint8)), scales.T.contiguous()


def linear_of(codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int) -> QuantLinear:
    return Int8Linear(codes, scales) if bits == 8 else Int4Linear(codes, scales, group)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int, out: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize, written into out [N, K] (any float dtype)."""
    return linear_of(codes, scales, bits, group).dequantize(out)


@dataclass(frozen=True)
class QuantLayout:
    """Byte layout of one quantized expert record."""

    bits: int
    group: int  # int4 inputs per scale
    hidden_size: int  # D
    intermediate_size: int  # I

    def _parts(self) -> list[tuple[str, int, int, torch.dtype, tuple[int, ...]]]:
        """(name, offset, nbytes, dtype, shape) of each part."""
        D, I, G = self.hidden_size, self.intermediate_size, self.group
        if self.bits == 8:
            shapes = [("gate_up_q", torch.int8, (2 * I, D)), ("gate_up_s", torch.bfloat16, (2 * I,)),
                      ("down_q", torch.int8, (D, I)), ("down_s", torch.bfloat16, (D,))]
        else:
            shapes = [("gate_up_q", torch.uint8, (2 * I, D // 2)), ("gate_up_s", torch.bfloat16, (D // G, 2 * I)),
                      ("down_q", torch.uint8, (D, I // 2)), ("down_s", torch.bfloat16, (I // G, D))]
        parts, offset = [], 0
        for name, dtype, shape in shapes:
            nbytes = dtype.itemsize * int(torch.Size(shape).numel())
            parts.append((name, offset, nbytes, dtype, shape))
            offset = align_up(offset + nbytes, 64)
        return parts

    @property
    def payload_nbytes(self) -> int:
        _, offset, nbytes, _, _ = self._parts()[-1]
        return offset + nbytes

    @property
    def record_nbytes(self) -> int:
        return align_up(self.payload_nbytes, ALIGN)

    def encode(self, gate_up: torch.Tensor, down: torch.Tensor) -> bytes:
        rec = bytearray(self.record_nbytes)
        tensors = dict(zip(("gate_up_q", "gate_up_s"), quantize(gate_up, self.bits, self.group)))
        tensors.update(zip(("down_q", "down_s"), quantize(down, self.bits, self.group)))
        for name, offset, nbytes, _, _ in self._parts():
            rec[offset:offset + nbytes] = tensors[name].contiguous().view(torch.uint8).flatten().numpy().tobytes()
        return bytes(rec)

    def weights(self, slot: torch.Tensor) -> tuple[QuantLinear, QuantLinear]:
        """(gate_up, down) of a record held in a uint8 slot, as fused-kernel linears over views of the slot."""
        t = {name: slot[offset:offset + nbytes].view(dtype).view(shape)
             for name, offset, nbytes, dtype, shape in self._parts()}
        return (linear_of(t["gate_up_q"], t["gate_up_s"], self.bits, self.group),
                linear_of(t["down_q"], t["down_s"], self.bits, self.group))

    def unpack(self, slot: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize a record held in a uint8 slot into the scratch pair (gate_up [2I, D], down [D, I])."""
        g, d = self.weights(slot)
        return g.dequantize(gate_up), d.dequantize(down)


def quantizable(bits: int, hidden: int, inter: int) -> str | None:
    """Why experts of this shape cannot be stored at `bits`, or None."""
    if bits == 4 and not group_size_for(hidden, inter):
        return f"int4 needs hidden size {hidden} and expert intermediate size {inter} to be multiples of 32"
    if bits == 4 and (hidden % INT4_BLOCK_N or 2 * inter % INT4_BLOCK_N):
        return (f"int4 needs hidden size {hidden} and twice the expert intermediate size {inter} to be multiples "
                f"of {INT4_BLOCK_N} (the fused kernel's row blocks)")
    return None
