"""`int8`: K and V quantized to int8 per (token, kv head) with a float32 scale each (symmetric, absmax / 127).

Every token is kept and read, so nothing is retrieved or pruned: the baseline every lossy method is compared
to. A block costs Dh + 4 bytes per (token, head, K or V) instead of 2 Dh (bfloat16) or 4 Dh (float32), so the
same --kv-cache-memory holds ~1.9x (bf16) or ~3.8x (f32) more blocks at head_dim 64."""
from __future__ import annotations

from ferry.kvcache.policies.base import KVPolicy, register_kv_policy
from ferry.plan import BlockTensor


@register_kv_policy
class Int8Policy(KVPolicy):
    name = "int8"
    summary = "int8 (quantized K/V, ~2x blocks per byte in bf16)"
    supports_rollback = True

    def block_tensors(self) -> list[BlockTensor]:
        s = self.shape
        return [BlockTensor("data", (s.num_layers, 2), (s.block_size, s.num_kv_heads, s.head_dim), "int8"),
                BlockTensor("scales", (s.num_layers, 2), (s.block_size, s.num_kv_heads), "float32")]
