"""`layer-budget`: per-layer KV budgets from one global prefix configuration (PrefixKV), over a base policy.

Each layer ranks its context tokens by importance (the attention they have received, accumulated) and keeps the
shortest prefix of that ranking whose share of the layer's attention mass reaches p; p is one number for the
whole model, found by binary search so that the kept tokens of all layers together meet --kv-budget (a fraction
of the context, or tokens, per layer on average). A layer whose attention is concentrated keeps few tokens, a
diffuse one many. The first --kv-sink-tokens and the last --kv-window-tokens are always kept. Evicted tokens
are masked out of what a decode query reads (prefill reads everything: PrefixKV compresses after the prompt).

It wraps a base storage: `layer-budget` is over `full`, `layer-budget+int8` over `int8`, `layer-budget+merge`
over `merge` (the base decides the bytes of a kept token; this policy only decides what is read).

Memory: the base's block bytes plus 4 bytes per (layer, token) of importance. Evicted tokens are NOT freed:
a block holds every layer's KV of its tokens, and a token evicted in one layer is almost always kept in another,
so no block empties; freeing needs per-layer compaction (see the README of issue 7's report). What this policy
buys today is a smaller read (read_tokens) and the quality measurement of per-layer budgets.
"""
from __future__ import annotations

from ferry.config import KVPolicyConfig
from ferry.kvcache.policies.base import KVPolicy, KVShape, resolve_budget
from ferry.kvcache.policies.full import FullPolicy

IMPORTANCE_BYTES = 4  # float32 accumulated attention per (layer, token)


class LayerBudgetPolicy(KVPolicy):
    base_cls: type[KVPolicy] = FullPolicy
    per_request_budget = True

    def __init__(self, cfg: KVPolicyConfig, shape: KVShape) -> None:
        super().__init__(cfg, shape)
        self.base = self.base_cls(cfg, shape)

    def device_bytes_per_block(self) -> int:
        s = self.shape
        return self.base.device_bytes_per_block() + s.num_layers * s.block_size * IMPORTANCE_BYTES

    def read_tokens(self, ctx_len: int) -> int:
        """Tokens a layer reads on average (each layer's own count comes from the prefix search)."""
        return resolve_budget(self.cfg.budget, ctx_len)


def layer_budget_over(base: type[KVPolicy]) -> type[LayerBudgetPolicy]:
    """The layer-budget policy over base storage: `layer-budget` over full, `layer-budget+NAME` otherwise."""
    name = "layer-budget" if base is FullPolicy else f"layer-budget+{base.name}"
    options = base.options | {"budget", "sink_tokens", "window_tokens"}
    return type(f"LayerBudget{base.__name__}", (LayerBudgetPolicy,), {"name": name, "base_cls": base, "options": options})
