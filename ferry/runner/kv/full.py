"""`full`: the plain paged KV cache (storage.py) read in full."""
from __future__ import annotations

from typing import Any

import torch

from ferry.models.layers.attention import AttnMetadata, LayerKV, paged_attention, write_kv
from ferry.runner.kv.base import StorageKV, register_policy_kv
from ferry.runner.kv.storage import BlockLayout, BlockTensors


class PagedLayer(LayerKV):
    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache  # [num_blocks, bs, K, Dh] each

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata, scale: float,
               window: int | None) -> torch.Tensor:
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return paged_attention(q, k, v, self.k_cache, self.v_cache, meta, scale, window)


@register_policy_kv("full")
class FullKV(StorageKV):
    def __init__(self, policy: Any, layout: BlockLayout, blocks: BlockTensors | None = None) -> None:
        super().__init__(policy, layout, blocks)
        self.layers = [PagedLayer(k, v) for k, v in self.storage.layers]
