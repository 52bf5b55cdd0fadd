"""How a cache slot's bytes become the weights a MoE layer computes with.

A slot holds one expert record (layout.py). A dense record is used in place: gate_up and down are views into
the slot. A quantized record (int8/int4, quant.py) is used in place too when the engine runs bfloat16 (the
fused weight-only kernels read it); in other dtypes it is dequantized into one scratch pair, reused by every
expert (the layer computes with one expert at a time), whose bytes are paid from the cache budget.
Views are made once per (slot, bits) and stay valid whatever expert the slot holds later."""
from __future__ import annotations

import torch

from ferry.experts.layout import StoreIndex
from ferry.models.layers.mlp import Weight

Weights = tuple[Weight, Weight]  # (gate_up [2I, D], down [D, I])


class SlotLayout:
    def __init__(self, index: StoreIndex, dtype: torch.dtype) -> None:
        self.layout = index.layout
        quantized = any(r.bits for recs in index.experts.values() for r in recs)
        # bfloat16 runs quantized experts in place (fused kernels); other dtypes dequantize them into one
        # scratch pair
        self.fused = dtype == torch.bfloat16
        self.scratch = (torch.empty(self.layout.gate_up_shape, dtype=dtype),
                        torch.empty(self.layout.down_shape, dtype=dtype)) if quantized and not self.fused else None
        self._views: dict[tuple[int, int], Weights] = {}  # (slot, bits) -> the weights over that slot's bytes

    @property
    def scratch_nbytes(self) -> int:
        """RAM beside the slots: the dequantization scratch pair (0 when there is none)."""
        return sum(t.nbytes for t in self.scratch) if self.scratch is not None else 0

    def weights(self, slot: int, mem: torch.Tensor, bits: int) -> Weights:
        """(gate_up, down) of the record of `bits` (0: dense) read into slot number `slot`, whose bytes are
        mem (uint8): views into it (dense), fused-kernel linears over it (quantized, bfloat16), or the scratch
        pair dequantized from it (quantized, other dtypes: valid until the next call)."""
        if bits and not self.fused:
            return self.layout.record_format(bits).unpack(mem, *self.scratch)
        if (slot, bits) not in self._views:
            self._views[(slot, bits)] = self.layout.record_format(bits).weights(mem) if bits else \
                self.layout.views(mem)
        return self._views[(slot, bits)]

    def clear(self) -> None:
        """Drop the views (they keep the cache slab alive)."""
        self._views.clear()
