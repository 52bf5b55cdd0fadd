"""`shadow` (ShadowKV): the attention sinks and a local window stay in device blocks like `spans`; an older block
goes cold to a host block (exact K and V) and leaves in the fast tier only its keys in low-rank form (rank r
coefficients per token over a per-layer key basis), a landmark (its mean post-RoPE key, per kv head) and an
outlier score. A query scores the landmarks, picks the top-k blocks, rebuilds their keys from the coefficients
(RoPE applied at their positions), reads their values from host, and attends over sinks + window + picked.

Scheduler side: the same tiering and budget as spans (which blocks go cold, how many a query reads); only the
bytes differ. A device block also holds its tokens' coefficients (computed when a token is written: its position
is known then, and the block is final for whoever shares it through the prefix cache or swaps it)."""
from __future__ import annotations

from ferry.kvcache.policies.spans import SpansPolicy

OUTLIER_BYTES = 4  # float32 outlier score per (host block, layer)


class ShadowPolicy(SpansPolicy):
    name = "shadow"
    options = SpansPolicy.options | {"rank"}

    @property
    def rank(self) -> int:
        """Coefficients per token and layer (--kv-rank; default an eighth of the key's kv heads x head dim)."""
        dims = self.shape.num_kv_heads * self.shape.head_dim
        return min(dims, self.cfg.rank or max(1, dims // 8))

    def coeff_bytes_per_block(self) -> int:
        s = self.shape
        return s.num_layers * s.block_size * self.rank * s.dtype_bytes

    def device_bytes_per_block(self) -> int:
        return self.shape.plain_block_bytes + self.coeff_bytes_per_block()

    def host_bytes_per_block(self) -> int:
        return self.shape.plain_block_bytes  # exact K and V (swap-in and outlier blocks read the exact keys)

    def index_bytes_per_host_block(self) -> int:
        s = self.shape
        landmarks = s.num_layers * s.num_kv_heads * s.head_dim * s.dtype_bytes
        return self.coeff_bytes_per_block() + landmarks + s.num_layers * OUTLIER_BYTES
