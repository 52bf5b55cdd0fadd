"""`full`: every token's K/V kept exactly on the device and read by every query (the default)."""
from __future__ import annotations

from ferry.config import KVOptions
from ferry.kvcache.policies.base import KVPolicy, KVShape, register_kv_policy


@register_kv_policy
class FullPolicy(KVPolicy):
    name = "full"
    summary = "full (exact)"
    supports_rollback = True

    @classmethod
    def for_blocks(cls, block_size: int) -> FullPolicy:
        """Full attention where only the block size matters (a KV cache manager built without a model)."""
        return cls(KVOptions(), KVShape(num_layers=1, num_kv_heads=1, head_dim=1, block_size=block_size,
                                        dtype_bytes=1))
