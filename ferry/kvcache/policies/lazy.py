"""`lazy`: dynamic token pruning in prefill and decode (LazyLLM). Scheduler side: the pruning schedule and what a
block costs.

Layer by layer, a step stops computing the prompt tokens its last queries attend to least (at that layer): at layer
l a request keeps the `keep_fraction(l)` most attended of its scheduled tokens (100% in the first layers, then shrinking
geometrically to --kv-budget at the deepest layer a token can be pruned at). A pruned token's hidden state is kept
(in its own KV slots of the layers it skips, ferry/models/kv/lazy.py) so a later step whose query attends to it
again computes its remaining layers from there (revival) instead of from the start.

Memory: pruned tokens keep their blocks (the slots of the layers they skip hold their hidden state), so a block
costs what `full` costs plus one byte per token (the number of layers each token has KV for). Pruning buys
prefill compute, not KV memory.
Prefix caching: blocks of a request that may hold pruned tokens are not shared (a revival rewrites them, and the
pruning was chosen for that request's queries); with --kv-budget 1 nothing is pruned and blocks are shared."""
from __future__ import annotations

from ferry.config import KVPolicyConfig
from ferry.errors import InvalidRequest
from ferry.kvcache.policies.base import KVPolicy, KVShape

DEPTH_BYTES = 1  # per token: how many layers hold its KV (uint8)
DEFAULT_BUDGET = 0.5


class LazyPolicy(KVPolicy):
    name = "lazy"
    options = frozenset({"budget", "lazy_start"})
    # LazyLLM ranks the prompt by its last token's attention; a middle chunk's last tokens are just where the chunk
    # ends (passkey at budget 0.5, one-off `ferry eval` of 30 prompts on ferry-tiny as of commit ee30440: 67% right
    # in 512-token chunks, 80% in one)
    default_step_tokens = 4096
    # and batched prompts too: `ferry eval` submits all at once, and a prompt cut at a step's end was ranked, in its
    # first chunk, by where the cut fell
    whole_prompts = True

    def __init__(self, cfg: KVPolicyConfig, shape: KVShape) -> None:
        super().__init__(cfg, shape)
        if cfg.budget is not None and not 0 < cfg.budget <= 1:
            raise InvalidRequest(f"--kv-policy lazy: kv_budget is the fraction of a step's tokens kept at the deepest "
                                 f"layer (0 < budget <= 1), got {cfg.budget}")
        if shape.num_layers > 255:
            raise InvalidRequest("--kv-policy lazy supports at most 255 layers")

    @property
    def budget(self) -> float:
        return DEFAULT_BUDGET if self.cfg.budget is None else self.cfg.budget

    def device_bytes_per_block(self) -> int:
        return self.shape.plain_block_bytes + self.shape.block_size * DEPTH_BYTES

    @property
    def shares_prefix_blocks(self) -> bool:
        return self.budget >= 1

    def first_pruned_layer(self) -> int:
        """Layers before it compute every token (--kv-lazy-start of them, at least one: early attention is too
        diffuse to rank tokens by; on a shallow model it may never point at what a later layer copies)."""
        return max(1, round(self.shape.num_layers * self.cfg.lazy_start))

    def keep_fraction(self, layer: int, last: int) -> float:
        """Fraction of a step's tokens computed at `layer` when tokens can be pruned up to layer `last` (the tensor
        half knows it: a pruned token's hidden state must fit in the KV slots of the layers it skips). Non-increasing
        in layer: budget ** t with t going from 1/n to 1 over the n layers first_pruned_layer()..last."""
        first = self.first_pruned_layer()
        if layer < first or last < first:
            return 1.0
        return self.budget ** ((min(layer, last) - first + 1) / (last - first + 1))
