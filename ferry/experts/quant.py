"""Expert-wise bitwidth (EdgeMoE): an expert stored as int8 or int4, to cut the bytes read and held per expert
2-4x. Lossy: a store with quantized experts does not reproduce the bf16/f32 model's tokens (check with
`ferry eval`); an offloaded run still gives exactly the tokens of the same store with every expert in RAM.

Records hold the stored form of weight-only quantization (ferry/ops/quant.py, the same as dense weights'): the
same bytes on every CPU, read in place by the kernel the level in force runs (`prepare`), in any engine dtype:
  - int4: symmetric, one float16 scale per `group` consecutive inputs of a row (max |w| of the group -> 7; group 0:
    one per row, FineQuant's coarsest granularity); codes in llama.cpp's Q4_0 nibble order, scales [N, K/G];
  - int8: symmetric, one float16 scale per row (scales [N, 1]).
A record is  gate_up codes | gate_up scales | down codes | down scales, each part 64-byte aligned, padded to
ALIGN. Store format 3 (layout.py); stores of format 2 held int4 in torch's AVX-512-only packing and are refused."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ferry.ops.quant import QBLOCK, QuantizedWeight, QuantLinear, prepare, quantize_weight
from ferry.tiers.disk import ALIGN, align_up


def group_size_for(*in_dims: int) -> int:
    """The largest of 128, 64, 32 dividing every input dim (gate_up: D, down: I); 0 if none does."""
    for g in (128, 64, 32):
        if all(d % g == 0 for d in in_dims):
            return g
    return 0


@dataclass(frozen=True)
class QuantLayout:
    """Byte layout of one quantized expert record."""

    bits: int
    group: int  # int4 inputs per scale, 0: per row (int8: always per row)
    hidden_size: int  # D
    intermediate_size: int  # I

    def _group(self, K: int) -> int:
        return K if self.bits == 8 or self.group == 0 else self.group

    def _parts(self) -> list[tuple[str, int, int, torch.dtype, tuple[int, ...]]]:
        """(name, offset, nbytes, dtype, shape) of each part."""
        D, I = self.hidden_size, self.intermediate_size
        code = torch.int8 if self.bits == 8 else torch.uint8
        per_byte = 8 // self.bits
        shapes = [("gate_up_q", code, (2 * I, D // per_byte)),
                  ("gate_up_s", torch.float16, (2 * I, D // self._group(D))),
                  ("down_q", code, (D, I // per_byte)), ("down_s", torch.float16, (D, I // self._group(I)))]
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

    def quantize(self, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[QuantizedWeight, QuantizedWeight]:
        """(gate_up, down) in the stored form of this layout: what encode writes and the kernels read."""
        return (quantize_weight(gate_up, self.bits, self._group(gate_up.shape[1])),
                quantize_weight(down, self.bits, self._group(down.shape[1])))

    def encode(self, gate_up: torch.Tensor, down: torch.Tensor) -> bytes:
        rec = bytearray(self.record_nbytes)
        g, d = self.quantize(gate_up, down)
        tensors = {"gate_up_q": g.codes, "gate_up_s": g.scales, "down_q": d.codes, "down_s": d.scales}
        for name, offset, nbytes, _, _ in self._parts():
            rec[offset:offset + nbytes] = tensors[name].contiguous().view(torch.uint8).flatten().numpy().tobytes()
        return bytes(rec)

    def stored(self, slot: torch.Tensor) -> tuple[QuantizedWeight, QuantizedWeight]:
        """(gate_up, down) of a record held in a uint8 slot, as stored weights over views of the slot."""
        t = {name: slot[offset:offset + nbytes].view(dtype).view(shape)
             for name, offset, nbytes, dtype, shape in self._parts()}
        D, I = self.hidden_size, self.intermediate_size
        return (QuantizedWeight(self.bits, self._group(D), t["gate_up_q"], t["gate_up_s"]),
                QuantizedWeight(self.bits, self._group(I), t["down_q"], t["down_s"]))

    def weights(self, slot: torch.Tensor) -> tuple[QuantLinear, QuantLinear]:
        """(gate_up, down) of a record held in a uint8 slot: the kernel's linears, reading the slot in place."""
        g, d = self.stored(slot)
        return prepare(g), prepare(d)

    def unpack(self, slot: torch.Tensor, gate_up: torch.Tensor,
               down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantize a record held in a uint8 slot into gate_up [2I, D] and down [D, I] (any float dtype)."""
        g, d = self.weights(slot)
        return g.dequantize(gate_up), d.dequantize(down)


def quantizable(bits: int, hidden: int, inter: int) -> str | None:
    """Why experts of this shape cannot be stored at `bits`, or None."""
    if bits == 4 and not group_size_for(hidden, inter):
        return f"int4 needs hidden size {hidden} and expert intermediate size {inter} to be multiples of {QBLOCK}"
    return None
