"""`lazy`: dynamic token pruning in prefill and decode (LazyLLM). Scheduler side: the pruning schedule and what a
block costs.

Layer by layer, a step stops computing the prompt tokens its last queries attend to least (at that layer): at layer
l a request keeps the `keep_fraction(l)` most attended of its scheduled tokens (100% in the first layers, then shrinking
geometrically to --kv-budget at the deepest layer a token can be pruned at). A pruned token's hidden state is kept
(in its own KV slots of the layers it skips, ferry/runner/kv/lazy.py) so a later step whose query attends to it
again computes its remaining layers from there (revival) instead of from the start.

Memory: pruned tokens keep their blocks (the slots of the layers they skip hold their hidden state), so a block
costs what `full` costs plus one byte per token (the number of layers each token has KV for). Pruning buys
prefill compute, not KV memory.
Prefix caching: blocks of a request that may hold pruned tokens are not shared (a revival rewrites them, and the
pruning was chosen for that request's queries); with --kv-budget 1 nothing is pruned and blocks are shared."""
from __future__ import annotations

from dataclasses import dataclass

from ferry.config import KVOptions
from ferry.errors import InvalidRequest
from ferry.kvcache.policies.base import KVPolicy, KVShape, flag, plain_kv, register_kv_policy
from ferry.plan import BlockTensor
DEFAULT_BUDGET = 0.5


@dataclass(frozen=True)
class LazyOptions(KVOptions):
    budget: float | None = flag(None, float, "fraction of a step's tokens computed at the deepest layers (default "
                                             "0.5)")
    # 0.5: on 4-layer ferry-tiny, layer 1's attention does not point at what the last layer copies (one-off `ferry
    # eval`, 30 passkey prompts at budget 0.25 on the ferry-tiny of commit 5b8376c: 70% starting at layer 1, 93% at 2)
    lazy_start: float = flag(0.5, float, "fraction of the layers (at least one) that compute every token before "
                                         "pruning starts; later is more accurate, earlier is faster")

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget <= 0:
            raise InvalidRequest(f"kv_budget must be > 0 (a fraction of the context <= 1, or tokens), got {self.budget}")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise InvalidRequest(f"--kv-policy lazy: kv_budget is the fraction of a step's tokens kept at the deepest "
                                 f"layer (0 < budget <= 1), got {self.budget}")
        if not 0 <= self.lazy_start < 1:
            raise InvalidRequest(f"kv_lazy_start must be in [0, 1), got {self.lazy_start}")


@register_kv_policy
class LazyPolicy(KVPolicy):
    name = "lazy"
    summary = ("lazy (prefill and decode skip the tokens the last query attends to least, layer by layer; pruned "
               "tokens can be revived)")
    Options = LazyOptions
    # LazyLLM ranks the prompt by its last token's attention; a middle chunk's last tokens are just where the chunk
    # ends (passkey at budget 0.5, one-off `ferry eval` of 30 prompts on ferry-tiny as of commit ee30440: 67% right
    # in 512-token chunks, 80% in one)
    default_step_tokens = 4096
    # and batched prompts too: `ferry eval` submits all at once, and a prompt cut at a step's end was ranked, in its
    # first chunk, by where the cut fell
    whole_prompts = True

    def __init__(self, options: LazyOptions, shape: KVShape) -> None:
        super().__init__(options, shape)
        if shape.num_layers > 255:
            raise InvalidRequest("--kv-policy lazy supports at most 255 layers")

    @property
    def budget(self) -> float:
        return DEFAULT_BUDGET if self.options.budget is None else self.options.budget

    def block_tensors(self) -> list[BlockTensor]:
        """K/V as `full`, and per token how many layers hold its KV (uint8)."""
        return [plain_kv(self.shape), BlockTensor("depth", (), (self.shape.block_size,), "uint8")]

    @property
    def shares_prefix_blocks(self) -> bool:
        return self.budget >= 1

    def first_pruned_layer(self) -> int:
        """Layers before it compute every token (--kv-lazy-start of them, at least one: early attention is too
        diffuse to rank tokens by; on a shallow model it may never point at what a later layer copies)."""
        return max(1, round(self.shape.num_layers * self.options.lazy_start))

    def keep_fraction(self, layer: int, last: int) -> float:
        """Fraction of a step's tokens computed at `layer` when tokens can be pruned up to layer `last` (the tensor
        half knows it: a pruned token's hidden state must fit in the KV slots of the layers it skips). Non-increasing
        in layer: budget ** t with t going from 1/n to 1 over the n layers first_pruned_layer()..last."""
        first = self.first_pruned_layer()
        if layer < first or last < first:
            return 1.0
        return self.budget ** ((min(layer, last) - first + 1) / (last - first + 1))
