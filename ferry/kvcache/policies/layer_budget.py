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

from dataclasses import dataclass

from ferry.config import KVOptions
from ferry.kvcache.policies.base import (NO_DECISIONS, BudgetOptions, KVPolicy, KVShape, register_kv_policy,
                                         resolve_budget, window_tokens)
from ferry.kvcache.policies.full import FullPolicy
from ferry.kvcache.policies.int8 import Int8Policy
from ferry.kvcache.policies.merge import MergePolicy
from ferry.plan import HOLE, BlockTensor, Compaction, KVStep

EMPTY = 255  # the owner tag of a compacted region's cell that holds no kept token (others: their layer's id)


class LayerBudgetPolicy(KVPolicy):
    base_cls: type[KVPolicy] = FullPolicy
    family = "layer-budget"
    Options = BudgetOptions
    per_request_budget = True

    def __init__(self, options: BudgetOptions, shape: KVShape) -> None:
        super().__init__(options, shape)
        # the base reads the options it knows (merge's angle, retention) from the same object
        self.base = self.base_cls(options, shape) if isinstance(options, self.base_cls.Options) else \
            self.base_cls(self.base_cls.Options(), shape)

    @property
    def compacts(self) -> bool:
        return self.base_cls is FullPolicy

    def block_tensors(self) -> list[BlockTensor]:
        """The base's, the float32 accumulated attention per (layer, token), and, when it compacts, the uint8 owner
        of each (layer, token) cell (which layer's token it holds once compacted)."""
        s = self.shape
        own = [BlockTensor("importance", (s.num_layers,), (s.block_size,), "float32")]
        if self.compacts:
            own.append(BlockTensor("tags", (s.num_layers,), (s.block_size,), "uint8", fill=EMPTY))
        return self.base.block_tensors() + own

    def read_tokens(self, ctx_len: int) -> int:
        """Tokens a layer reads on average (each layer's own count comes from the prefix search)."""
        return resolve_budget(self.options.budget, ctx_len)

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


    def plan_step(self, start_pos: int, num_new: int, block_ids: list[int]) -> KVStep:
        """A decode query reads each layer's keep set of the tokens before it (read_tokens on average, with sinks and
        window); at a request's first single-token step over `full`, its region is compacted instead (once: a
        table with HOLE is compacted already, and its decode queries read the packed cells)."""
        if num_new != 1 or HOLE in block_ids[:start_pos // self.shape.block_size + 1]:
            return NO_DECISIONS
        past, o = start_pos, self.options
        dropped = self.compact_blocks(past)
        if dropped:
            start = past // self.shape.block_size * self.shape.block_size
            budget = self.region_tokens(past)
            sink = min(o.sink_tokens, budget)
            window = min(max(0, window_tokens(o, past) - (past - start)), budget - sink)  # the tail is read anyway
            return KVStep(compaction=Compaction(dropped.stop, dropped.start, budget, sink, window))
        return KVStep(read_tokens=self.read_tokens(past), sink_tokens=o.sink_tokens,
                      window_tokens=window_tokens(o, past))


def layer_budget_over(base: type[KVPolicy]) -> type[LayerBudgetPolicy]:
    """The layer-budget policy over base storage: `layer-budget` over full, `layer-budget+NAME` otherwise (its
    options: the budget's and the base's)."""
    name = "layer-budget" if base is FullPolicy else f"layer-budget+{base.name}"
    options = BudgetOptions if base.Options is KVOptions else \
        dataclass(frozen=True)(type(f"LayerBudget{base.Options.__name__}", (BudgetOptions, base.Options), {
            "__post_init__": lambda self: (BudgetOptions.__post_init__(self), base.Options.__post_init__(self))}))
    summary = ("layer-budget (per-layer budgets by a global prefix search, PrefixKV)" if base is FullPolicy else
               f"{name} (layer-budget over {base.name}'s storage)")
    return register_kv_policy(type(f"LayerBudget{base.__name__}", (LayerBudgetPolicy,), {
        "name": name, "base_cls": base, "Options": options, "summary": summary,
        "needs_full_attention": base is FullPolicy}))


LayerBudgetFullPolicy = layer_budget_over(FullPolicy)
LayerBudgetInt8Policy = layer_budget_over(Int8Policy)
LayerBudgetMergePolicy = layer_budget_over(MergePolicy)
