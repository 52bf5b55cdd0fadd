"""`layer-budget`: per-layer KV budgets from one global prefix configuration (PrefixKV), over a base policy.

Each layer ranks its context tokens by importance (the attention they have received, accumulated) and keeps the
shortest prefix of that ranking whose share of the layer's attention mass reaches p; p is one number for the
whole model, found by binary search so that the kept tokens of all layers together meet --kv-budget (a fraction
of the context, or tokens, per layer on average). A layer whose attention is concentrated keeps few tokens, a
diffuse one many. The first --kv-sink-tokens and the last --kv-window-tokens are always kept. Evicted tokens
are masked out of what a decode query reads (prefill reads everything: PrefixKV compresses after the prompt).

It wraps a base storage: `layer-budget` is over `full`, `layer-budget+int8` over `int8`, `layer-budget+merge`
over `merge` (the base decides the bytes of a kept token; this policy only decides what is read).

Memory (over `full`): as PrefixKV, the context is compressed once the prompt is in. At a request's first
single-token step, the tokens of its whole blocks before that step (the region) are compacted: each layer keeps
its prefix-search share of the region's budget, and the kept (layer, token) cells of all layers are packed into
the region's first blocks (a cell of any layer's plane can hold any layer's K and V: same shape), so that
ceil(budget / block_size) blocks hold them all; the rest of the region's blocks go back to the pool
(`compact_blocks`) and its table holds HOLE there. The block being filled and later ones stay as they are (the
recent window). Each cell's owner (the layer whose token it holds) is a byte per cell. Compacted blocks hold
request-specific content, so prefix caching is off. Over int8 and merge (cells of one layer's format, or shared
by two layers) nothing is compacted: those read less, and store what their base stores.
"""
from __future__ import annotations

from ferry.config import KVPolicyConfig
from ferry.kvcache.policies.base import KVPolicy, KVShape, resolve_budget
from ferry.kvcache.policies.full import FullPolicy

IMPORTANCE_BYTES = 4  # float32 accumulated attention per (layer, token)
OWNER_BYTES = 1  # uint8 per (layer, token) cell: which layer's token it holds once compacted


class LayerBudgetPolicy(KVPolicy):
    base_cls: type[KVPolicy] = FullPolicy
    per_request_budget = True

    def __init__(self, cfg: KVPolicyConfig, shape: KVShape) -> None:
        super().__init__(cfg, shape)
        self.base = self.base_cls(cfg, shape)

    @property
    def compacts(self) -> bool:
        return self.base_cls is FullPolicy

    def device_bytes_per_block(self) -> int:
        s = self.shape
        per_cell = IMPORTANCE_BYTES + (OWNER_BYTES if self.compacts else 0)
        return self.base.device_bytes_per_block() + s.num_layers * s.block_size * per_cell

    def read_tokens(self, ctx_len: int) -> int:
        """Tokens a layer reads on average (each layer's own count comes from the prefix search)."""
        return resolve_budget(self.cfg.budget, ctx_len)

    def region_tokens(self, past: int) -> int:
        """Tokens a layer keeps on average of the region (the whole blocks before token `past`), so that with the
        tokens after it the layer reads read_tokens(past)."""
        start = past // self.shape.block_size * self.shape.block_size
        return max(0, min(start, self.read_tokens(past) - (past - start)))

    def compact_blocks(self, past: int) -> range:
        if not self.compacts:
            return range(0)
        bs = self.shape.block_size
        kept = -(-self.region_tokens(past) // bs)  # the region's first blocks, which hold every kept cell
        return range(kept, past // bs)

    @property
    def shares_prefix_blocks(self) -> bool:
        return not self.compacts


def layer_budget_over(base: type[KVPolicy]) -> type[LayerBudgetPolicy]:
    """The layer-budget policy over base storage: `layer-budget` over full, `layer-budget+NAME` otherwise."""
    name = "layer-budget" if base is FullPolicy else f"layer-budget+{base.name}"
    options = base.options | {"budget", "sink_tokens", "window_tokens"}
    return type(f"LayerBudget{base.__name__}", (LayerBudgetPolicy,), {"name": name, "base_cls": base, "options": options})
