"""How a cache slot's bytes become the weights a MoE layer computes with.

A slot holds one expert record (layout.py). A dense record is used in place: gate_up and down are views into
the slot. A quantized record (int8/int4, quant.py) is used in place too, in any engine dtype: its linears
(ferry.ops.quant.prepare) read the stored codes and scales from the slot, the same code path as dense models'
quantized weights. Views are made once per (slot, record format) and stay valid whatever expert the slot holds later."""
from __future__ import annotations

import torch

from ferry.experts.layout import ExpertRecord, StoreIndex
from ferry.models.layers.mlp import Weight

Weights = tuple[Weight, Weight]  # (gate_up [2I, D], down [D, I])


class SlotLayout:
    def __init__(self, index: StoreIndex, dtype: torch.dtype) -> None:
        self.layout = index.layout
        self.dtype = dtype
        self.scratch = None  # no dequantized copy: quantized experts are read in place by the kernels
        self._views: dict[tuple, Weights] = {}  # (slot, bits, group) -> the weights over that slot's bytes

    @property
    def scratch_nbytes(self) -> int:
        """RAM beside the slots (none: every record is used in place)."""
        return 0

    def weights(self, slot: int, mem: torch.Tensor, record: ExpertRecord) -> Weights:
        """(gate_up, down) of `record` (dense, or int8/int4 at its group) read into slot number `slot`, whose
        bytes are mem (uint8): views into it (dense), or quantized linears over it (int8/int4)."""
        key = (slot, record.bits, record.group)
        if key not in self._views:
            self._views[key] = self.layout.format_of(record).weights(mem) if record.bits else self.layout.views(mem)
        return self._views[key]

    def clear(self) -> None:
        """Drop the views (they keep the cache slab alive)."""
        self._views.clear()
