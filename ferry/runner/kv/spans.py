"""`spans`: resident blocks (sinks, local window) plus the top-k host spans picked through a min/max key index.

A block that goes cold (the scheduler half, ferry/kvcache/policies/spans.py, says which) is copied to a host block by the runner's
swap_out; that copy also writes its index entry: the per-channel min and max of its keys, per layer and kv head
(Quest). A query bounds its score on each host span by sum_d max(q_d min_d, q_d max_d) >= q . k for every key k in
it, estimates its attention mass per span by a softmax over those bounds (summed over heads), and reads the top-k
spans from the host tier together with its resident blocks (the flow, shared with `shadow`, is in tiered.py).
Legend: L layers, Nh host blocks, bs block size, K kv heads, Dh head dim, B queries, n spans.
"""
from __future__ import annotations

from typing import Any

import torch

from ferry.runner.kv.base import gather_blocks, register_policy_kv
from ferry.runner.kv.storage import BlockLayout
from ferry.runner.kv.tiered import TieredKV, TieredLayer, attend_batch, span_mass

__all__ = ["SpansKV", "SpansLayer", "attend_batch", "span_mass"]


class SpansLayer(TieredLayer):
    def block_scores(self, q: torch.Tensor, host_ids: torch.Tensor, valid: torch.Tensor, top_k: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, None]:
        index = self.owner.index[self.layer]
        lo, hi = index[0, host_ids].float(), index[1, host_ids].float()  # [B, n, K, Dh]
        return span_mass(q, lo, hi, scale), None

    def host_kv(self, host_ids: torch.Tensor, logical: torch.Tensor, exact: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        host = self.owner.storage.host
        return (gather_blocks(host[self.layer, 0], host_ids).to(device),
                gather_blocks(host[self.layer, 1], host_ids).to(device))


@register_policy_kv("spans")
class SpansKV(TieredKV):
    def __init__(self, policy: Any, layout: BlockLayout) -> None:
        super().__init__(policy, layout)
        # [L, 2, Nh, K, Dh]: per host block and layer, the min (0) and max (1) of its keys per channel
        self.index = self.blocks.fast["index"]
        self.layers = [SpansLayer(self, l) for l in range(layout.model.num_layers)]

    def before_swap_out(self, dev: torch.Tensor, host: torch.Tensor) -> None:
        keys = self.storage.kv[:, 0, dev.to(self.storage.kv.device)]  # [L, n, bs, K, Dh], exact in the KV dtype
        self.index[:, 0, host] = keys.amin(dim=2)
        self.index[:, 1, host] = keys.amax(dim=2)
