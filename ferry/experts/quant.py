"""Expert-wise bitwidth (EdgeMoE): an expert stored as int8 or int4 with group-wise scales, to cut the bytes
read per expert 2-8x. Lossy: a store with quantized experts does not reproduce the resident model's tokens.

Each weight row is split into groups of `group` consecutive inputs sharing one float32 scale (symmetric:
max |w| of the group maps to 127 or 7). int4 packs two values per byte, low nibble first.
A record is  gate_up q | gate_up scales | down q | down scales, each part 64-byte aligned, padded to ALIGN.
The forward gets dense weights: `unpack` dequantizes into a scratch pair in the compute dtype."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.tiers.disk import ALIGN, align_up

QMAX = {8: 127, 4: 7}


def group_size_for(*in_dims: int) -> int:
    """The largest of 128, 64, 32 dividing every input dim (gate_up: D, down: I), else one group per row."""
    for g in (128, 64, 32):
        if all(d % g == 0 for d in in_dims):
            return g
    return 0


def quantize(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w [R, C] -> (codes as uint8 [R, C] for int8, [R, C/2] for int4; scales float32 [R, C/group])."""
    rows, cols = w.shape
    g = w.float().reshape(rows, cols // group, group)
    scales = g.abs().amax(dim=-1).clamp(min=1e-12) / QMAX[bits]  # [R, C/G]
    q = torch.round(g / scales[..., None]).clamp(-QMAX[bits] - (bits == 4), QMAX[bits]).to(torch.int8).reshape(rows, cols)
    if bits == 8:
        return q.view(torch.uint8), scales
    u = (q + 8).to(torch.uint8)  # [-8, 7] -> [0, 15]
    return u[:, 0::2] | (u[:, 1::2] << 4), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, group: int, out: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize, written into out [R, C] (any float dtype)."""
    rows, cols = out.shape
    if bits == 8:
        q = codes.view(torch.int8)
    else:
        q = torch.stack(((codes & 15).to(torch.int8) - 8, (codes >> 4).to(torch.int8) - 8), dim=-1).reshape(rows, cols)
    w = q.reshape(rows, cols // group, group).float() * scales[..., None]
    return out.copy_(w.reshape(rows, cols))


@dataclass(frozen=True)
class QuantLayout:
    """Byte layout of one quantized expert record."""

    bits: int
    group: int
    hidden_size: int  # D
    intermediate_size: int  # I

    def _parts(self) -> list[tuple[str, int, int, tuple[int, int]]]:
        """(name, offset, nbytes, shape of the code or scale tensor) of each part."""
        D, I, G, per_byte = self.hidden_size, self.intermediate_size, self.group, 8 // self.bits
        shapes = [("gate_up_q", (2 * I, D // per_byte), 1), ("gate_up_s", (2 * I, D // G), 4),
                  ("down_q", (D, I // per_byte), 1), ("down_s", (D, I // G), 4)]
        parts, offset = [], 0
        for name, shape, item in shapes:
            parts.append((name, offset, shape[0] * shape[1] * item, shape))
            offset = align_up(offset + shape[0] * shape[1] * item, 64)
        return parts

    @property
    def payload_nbytes(self) -> int:
        _, offset, nbytes, _ = self._parts()[-1]
        return offset + nbytes

    @property
    def record_nbytes(self) -> int:
        return align_up(self.payload_nbytes, ALIGN)

    def encode(self, gate_up: torch.Tensor, down: torch.Tensor) -> bytes:
        rec = bytearray(self.record_nbytes)
        tensors = dict(zip(("gate_up_q", "gate_up_s"), quantize(gate_up, self.bits, self.group)))
        tensors.update(zip(("down_q", "down_s"), quantize(down, self.bits, self.group)))
        for name, offset, nbytes, _ in self._parts():
            rec[offset:offset + nbytes] = tensors[name].contiguous().view(torch.uint8).flatten().numpy().tobytes()
        return bytes(rec)

    def unpack(self, slot: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize a record held in a uint8 slot into the scratch pair (gate_up [2I, D], down [D, I])."""
        t = {name: slot[offset:offset + nbytes].view(torch.float32 if name.endswith("_s") else torch.uint8).view(shape)
             for name, offset, nbytes, shape in self._parts()}
        dequantize(t["gate_up_q"], t["gate_up_s"], self.bits, self.group, gate_up)
        dequantize(t["down_q"], t["down_s"], self.bits, self.group, down)
        return gate_up, down
