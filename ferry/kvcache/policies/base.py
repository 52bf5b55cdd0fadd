"""The KV policy interface, scheduler side (torch-free), and the registry of policies by name.

A KV policy decides which tokens' KV is kept, in which tier, and what a query reads. It comes in two halves:
- this half (`KVPolicy`), which the KV cache manager and the engine factory consult: its options (a frozen
  `KVOptions` subclass beside it), how many bytes a block costs in each tier (so a budget buys the right number of
  blocks), which of a request's blocks leave the fast tier once computed, and, for every scheduled request of a step,
  the decisions the tensor side executes (`plan_step` -> `ferry.plan.KVStep`: host spans to read, tokens a query
  reads, blocks to compact);
- the tensor half (`ferry/runner/kv/<family>.py`), owned by the runner: the block tensors, how a step's K/V are
  written and how each layer's queries read them. It imports nothing from here: what it needs per step comes in
  the plan.
Neither the scheduler, the model code nor the server knows which policy runs: the scheduler sees block tables
(ferry/plan.py: host entries, HOLE), the model calls `layer_kv.attend(q, k, v, meta, scale, window)`.
A policy registers itself with `@register_kv_policy` beside its class; nothing else names it.
"""
from __future__ import annotations

from abc import ABC
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

from ferry.config import KVOptions
from ferry.errors import InvalidRequest
from ferry.plan import BlockTensor, KVStep

KV_POLICIES: dict[str, type[KVPolicy]] = {}  # name -> policy class, in registration order (--kv-policy's choices)
NO_DECISIONS = KVStep()  # read everything, compact nothing


def register_kv_policy(cls: type[KVPolicy]) -> type[KVPolicy]:
    """Class decorator: `--kv-policy cls.name` runs cls."""
    if cls.name in KV_POLICIES:
        raise ValueError(f"two KV policies named {cls.name!r}")
    KV_POLICIES[cls.name] = cls
    return cls


def flag(default: Any, parse: Callable[[str], Any], help: str) -> Any:
    """An options field that is also the engine option kv_<field> (flag --kv-<field>): its parser and help."""
    return field(default=default, metadata={"parse": parse, "help": help})


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


@dataclass(frozen=True)
class BudgetOptions(KVOptions):
    """What a decode query reads: the budget, attention sinks and the local window (spans, shadow, layer-budget)."""

    budget: float | None = flag(None, float, "tokens a decode query reads, as a fraction of its context (<= 1) or "
                                             "a count (> 1); default: all")
    sink_tokens: int = flag(16, int, "first tokens kept on device and always read (attention sinks)")
    window_tokens: int | None = flag(None, int, "most recent tokens kept on device and always read (default: a "
                                                "quarter of the tokens --kv-budget lets a query read, at most 128)")

    def __post_init__(self) -> None:
        if self.budget is not None and self.budget <= 0:
            raise InvalidRequest(f"kv_budget must be > 0 (a fraction of the context <= 1, or tokens), got {self.budget}")
        if self.sink_tokens < 0 or (self.window_tokens is not None and self.window_tokens < 1):
            raise InvalidRequest("kv_sink_tokens must be >= 0 and kv_window_tokens >= 1")


def plain_kv(shape: KVShape) -> BlockTensor:
    """K and V of every layer for a block, in the model dtype ([L, 2, N, bs, K, Dh]): what `full` stores."""
    return BlockTensor("kv", (shape.num_layers, 2), (shape.block_size, shape.num_kv_heads, shape.head_dim), "model")


class KVPolicy(ABC):
    """Defaults are full attention: every block on the device, every token read."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for --kv-policy's help
    Options: ClassVar[type[KVOptions]] = KVOptions  # its --kv-* options
    family: ClassVar[str | None] = None  # the tensor half that runs it (ferry/runner/kv/), when not its own name
    uses_host_tier: ClassVar[bool] = False  # needs host blocks even without swap preemption
    # its reads do not follow positions (retrieved spans, compacted cells): a sliding window cannot mask them
    needs_full_attention: ClassVar[bool] = False
    # a request may set its own --kv-budget (SamplingParams.kv_budget): for policies whose budget is what a query
    # reads, not how the KV is stored or computed
    per_request_budget: ClassVar[bool] = False
    # the step token budget (--max-num-batched-tokens) when the user sets none: a policy that ranks a chunk's tokens
    # by its last queries wants the prompt's question in the same chunk
    default_step_tokens: ClassVar[int] = 512
    # ... and wants a prompt that fits in a step computed in one (SchedulerConfig.whole_prompts)
    whole_prompts: ClassVar[bool] = False
    # speculative decoding can verify draft tokens under it: a token's KV depends on that token alone, so dropping
    # a rejected draft's slots (KVCacheManager.rollback) leaves nothing of it behind
    supports_rollback: ClassVar[bool] = False

    def __init__(self, options: KVOptions, shape: KVShape) -> None:
        if not isinstance(options, self.Options):
            raise TypeError(f"--kv-policy {self.name} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options
        self.shape = shape
        self._by_budget: dict[float, KVPolicy] = {}

    @property
    def tensor_family(self) -> str:
        return self.family or self.name

    def for_budget(self, budget: float | None) -> KVPolicy:
        """This policy as a request with its own kv_budget sees it (None: the server's)."""
        if budget is None or budget == getattr(self.options, "budget", None):
            return self
        if budget not in self._by_budget:
            self._by_budget[budget] = type(self)(replace(self.options, budget=budget), self.shape)
        return self._by_budget[budget]

    def block_tensors(self) -> list[BlockTensor]:
        """Every tensor a block holds, in each tier (the declaration the tensor side allocates from; the bytes below
        are derived from it). Default: K and V of every layer in the model dtype, swapped to host blocks."""
        return [plain_kv(self.shape)]

    def _bytes(self, keep: Callable[[BlockTensor], bool]) -> int:
        return sum(t.block_bytes(self.shape.dtype_bytes) for t in self.block_tensors() if keep(t))

    def device_bytes_per_block(self) -> int:
        """Fast-tier bytes one block costs (everything a block brings: K, V, scales...)."""
        return self._bytes(lambda t: t.device)

    def host_bytes_per_block(self) -> int:
        """Slow-tier bytes of one host block (swap space and offloaded spans)."""
        return self._bytes(lambda t: t.host == "host")

    def index_bytes_per_host_block(self) -> int:
        """Fast-tier bytes kept per host block so queries can find it without reading it (0: none)."""
        return self._bytes(lambda t: t.host == "fast")

    def cold_blocks(self, num_computed_tokens: int, num_blocks: int) -> range:
        """Logical block indices of a request that belong in the slow tier once num_computed_tokens are computed
        (blocks only ever go cold, never warm again). Default: none."""
        return range(0)

    def compact_blocks(self, past: int) -> range:
        """Logical block indices a request gives back once its first `past` tokens are compacted into fewer blocks
        (in the first step that computes a single token of the request after `past` tokens, if this range is not
        empty: plan_step says so; its table then holds HOLE there). Default: never."""
        return range(0)

    @property
    def shares_prefix_blocks(self) -> bool:
        """Whether full computed blocks may be shared through the prefix cache (not when a block's content depends on
        the request that computed it, as with `lazy` pruning)."""
        return True

    def read_tokens(self, ctx_len: int) -> int:
        """Tokens a decode query with ctx_len tokens of context reads (the budget); default all of them."""
        return ctx_len

    def plan_step(self, start_pos: int, num_new: int, block_ids: list[int]) -> KVStep:
        """The decisions for a request computing num_new tokens from start_pos over block table block_ids (the
        plan's): what the tensor side reads and does for it in this step. Default: nothing to decide."""
        return NO_DECISIONS


def resolve_budget(budget: float | None, ctx_len: int) -> int:
    """--kv-budget as tokens for one context: a fraction (<= 1) of it, or a token count (> 1)."""
    if budget is None:
        return ctx_len
    return min(ctx_len, int(budget * ctx_len) if budget <= 1 else int(budget))


DEFAULT_WINDOW_TOKENS = 128


def window_tokens(options: BudgetOptions, ctx_len: int) -> int:
    """The local window at this context: --kv-window-tokens, or a quarter of the budget's tokens up to 128. It grows
    by at most a token per token of context, so the window's start never moves back (cold blocks stay cold)."""
    if options.window_tokens is not None:
        return options.window_tokens
    return max(1, min(DEFAULT_WINDOW_TOKENS, resolve_budget(options.budget, ctx_len) // 4))


def make_kv_policy(name: str, shape: KVShape, **options: Any) -> KVPolicy:
    """The policy called `name` with these options (its Options' fields; the rest at their defaults)."""
    cls = KV_POLICIES[name]
    return cls(cls.Options(**options), shape)
