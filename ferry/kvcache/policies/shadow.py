"""`shadow` (ShadowKV): the attention sinks and a local window stay in device blocks like `spans`; an older block
goes cold to a host block (exact K and V) and leaves in the fast tier only its keys in low-rank form (rank r
coefficients per token over a per-layer key basis), a landmark (its mean post-RoPE key, per kv head) and an
outlier score. A query scores the landmarks, picks the top-k blocks, rebuilds their keys from the coefficients
(RoPE applied at their positions), reads their values from host, and attends over sinks + window + picked.

Scheduler side: the same tiering and budget as spans (which blocks go cold, how many a query reads); only the
bytes differ. A device block also holds its tokens' coefficients (computed when a token is written: its position
is known then, and the block is final for whoever shares it through the prefix cache or swaps it)."""
from __future__ import annotations

from dataclasses import dataclass

from ferry.errors import InvalidRequest
from ferry.kvcache.policies.base import BudgetOptions, flag, plain_kv, register_kv_policy
from ferry.kvcache.policies.spans import SpansPolicy
from ferry.plan import BlockTensor


@dataclass(frozen=True)
class ShadowOptions(BudgetOptions):
    rank: int | None = flag(None, int, "rank of the low-rank keys kept in the fast tier (default: kv heads x head "
                                       "dim / 8)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank is not None and self.rank < 1:
            raise InvalidRequest(f"kv_rank must be >= 1, got {self.rank}")


@register_kv_policy
class ShadowPolicy(SpansPolicy):
    name = "shadow"
    summary = "shadow (as spans, with low-rank keys and landmarks in the fast tier)"
    Options = ShadowOptions

    @property
    def rank(self) -> int:
        """Coefficients per token and layer (--kv-rank; default an eighth of the key's kv heads x head dim)."""
        dims = self.shape.num_kv_heads * self.shape.head_dim
        return min(dims, self.options.rank or max(1, dims // 8))

    def block_tensors(self) -> list[BlockTensor]:
        """K/V (exact, swapped to host: swap-in and outlier blocks read the exact keys); beside each device block its
        tokens' key coefficients, which a cold block keeps in the fast tier with its landmark (mean post-RoPE key per
        layer and kv head) and outlier score (float32 per layer)."""
        s = self.shape
        return [plain_kv(s),
                BlockTensor("coeffs", (s.num_layers,), (s.block_size, self.rank), "model", host="fast"),
                BlockTensor("landmarks", (s.num_layers,), (s.num_kv_heads, s.head_dim), "model", device=False,
                            host="fast"),
                BlockTensor("outlier", (s.num_layers,), (), "float32", device=False, host="fast")]
