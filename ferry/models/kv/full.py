"""`full`: the plain paged KV cache (ferry/kvcache/storage.py) read in full: today's path, unchanged."""
from __future__ import annotations

import torch

from ferry.kvcache.storage import KVStorage
from ferry.models.kv.base import LayerKV, StorageKV
from ferry.models.layers.attention import AttnMetadata, paged_attention, write_kv


class PagedLayer(LayerKV):
    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache  # [num_blocks, bs, K, Dh] each

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata, scale: float,
               window: int | None) -> torch.Tensor:
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return paged_attention(q, k, v, self.k_cache, self.v_cache, meta, scale, window)


class FullKV(StorageKV):
    def __init__(self, storage: KVStorage) -> None:
        self.storage = storage
        self.layers = [PagedLayer(k, v) for k, v in storage.layers]
