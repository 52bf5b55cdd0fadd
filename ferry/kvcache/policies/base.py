"""The KV policy interface, scheduler side (torch-free).

A KV policy decides which tokens' KV is kept, in which tier, and what a query reads. It comes in two halves:
- this half (`KVPolicy`), which the KV cache manager and the engine factory consult: how many bytes a block
  costs in each tier (so a budget buys the right number of blocks), and which of a request's blocks leave the
  fast tier for the slow one once computed;
- the tensor half (`ferry/models/kv/<name>.py`, `PolicyKV`), owned by the runner: the block tensors, how a step's
  K/V are written and how each layer's queries read them.
Neither the scheduler, the model code nor the server knows which policy runs: the scheduler sees block tables
(a negative entry `-1 - h` is host block h), the model calls `layer_kv.attend(q, k, v, meta, scale, window)`.

Each policy names the KVPolicyConfig fields it reads (`options`); setting any other kv option is an error.
Built: full, int8, spans, shadow, lazy, merge, layer-budget[+base] (docs/architecture.md, "KV policies").
"""
from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, replace
from typing import ClassVar

from ferry.config import KVPolicyConfig


@dataclass(frozen=True)
class KVShape:
    """The model facts a policy sizes blocks with (no torch: dtype as its byte width)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype_bytes: int  # of the model's KV dtype (2 for bfloat16, 4 for float32)

    @property
    def plain_block_bytes(self) -> int:
        """K and V of every layer for one block, in the model dtype: what `full` stores."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype_bytes


class KVPolicy(ABC):
    """Defaults are full attention: every block on the device, every token read."""

    name: ClassVar[str]
    options: ClassVar[frozenset[str]] = frozenset()  # the KVPolicyConfig fields it reads (besides name)
    uses_host_tier: ClassVar[bool] = False  # needs host blocks even without swap preemption
    # a request may set its own --kv-budget (SamplingParams.kv_budget): for policies whose budget is what a query
    # reads, not how the KV is stored or computed
    per_request_budget: ClassVar[bool] = False
    # the step token budget (--max-num-batched-tokens) when the user sets none: a policy that ranks a chunk's tokens
    # by its last queries wants the prompt's question in the same chunk
    default_step_tokens: ClassVar[int] = 512
    # ... and wants a prompt that fits in a step computed in one (SchedulerConfig.whole_prompts)
    whole_prompts: ClassVar[bool] = False

    def __init__(self, cfg: KVPolicyConfig, shape: KVShape) -> None:
        self.cfg = cfg
        self.shape = shape
        self._by_budget: dict[float, KVPolicy] = {}

    def for_budget(self, budget: float | None) -> KVPolicy:
        """This policy as a request with its own kv_budget sees it (None: the server's)."""
        if budget is None or budget == self.cfg.budget:
            return self
        if budget not in self._by_budget:
            self._by_budget[budget] = type(self)(replace(self.cfg, budget=budget), self.shape)
        return self._by_budget[budget]

    def device_bytes_per_block(self) -> int:
        """Fast-tier bytes one block costs (everything a block brings: K, V, scales...)."""
        return self.shape.plain_block_bytes

    def host_bytes_per_block(self) -> int:
        """Slow-tier bytes of one host block (swap space and offloaded spans)."""
        return self.device_bytes_per_block()

    def index_bytes_per_host_block(self) -> int:
        """Fast-tier bytes kept per host block so queries can find it without reading it (0: none)."""
        return 0

    def cold_blocks(self, num_computed_tokens: int, num_blocks: int) -> range:
        """Logical block indices of a request that belong in the slow tier once num_computed_tokens are computed
        (blocks only ever go cold, never warm again). Default: none."""
        return range(0)

    def compact_blocks(self, past: int) -> range:
        """Logical block indices a request gives back once its first `past` tokens are compacted into fewer blocks
        (the tensor side does it in the first step that computes a single token of the request after `past`
        tokens, if this range is not empty; its table then holds HOLE there). Default: never."""
        return range(0)

    @property
    def shares_prefix_blocks(self) -> bool:
        """Whether full computed blocks may be shared through the prefix cache (not when a block's content depends on
        the request that computed it, as with `lazy` pruning)."""
        return True

    def read_tokens(self, ctx_len: int) -> int:
        """Tokens a decode query with ctx_len tokens of context reads (the budget); default all of them."""
        return ctx_len


def resolve_budget(budget: float | None, ctx_len: int) -> int:
    """--kv-budget as tokens for one context: a fraction (<= 1) of it, or a token count (> 1)."""
    if budget is None:
        return ctx_len
    return min(ctx_len, int(budget * ctx_len) if budget <= 1 else int(budget))


DEFAULT_WINDOW_TOKENS = 128


def window_tokens(cfg: KVPolicyConfig, ctx_len: int) -> int:
    """The local window at this context: --kv-window-tokens, or a quarter of the budget's tokens up to 128. It grows
    by at most a token per token of context, so the window's start never moves back (cold blocks stay cold)."""
    if cfg.window_tokens is not None:
        return cfg.window_tokens
    return max(1, min(DEFAULT_WINDOW_TOKENS, resolve_budget(cfg.budget, ctx_len) // 4))
