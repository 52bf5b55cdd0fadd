"""EngineView: what code outside the engine (eval, bench, tests) may read about a running engine, as one
read-only snapshot, so that none of it reaches into the scheduler, the KV manager or the output processor.

`LLMEngine.view()` builds it between steps; holding one changes nothing and it never changes after."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ferry.experts.stats import ExpertStats

if TYPE_CHECKING:
    from ferry.config import MoEConfig
    from ferry.kvcache.policies import KVPolicy


@dataclass(frozen=True)
class RequestView:
    """One running sequence's progress (an n > 1 request is n of these)."""

    req_id: str
    num_prompt_tokens: int
    num_computed_tokens: int  # tokens whose KV is in the cache
    num_tokens: int  # prompt + generated
    num_output_tokens: int

    @property
    def decoding(self) -> bool:
        """Its next step computes one token (the prompt is done)."""
        return self.num_computed_tokens == self.num_tokens - 1


@dataclass(frozen=True)
class EngineView:
    # fixed at start
    max_model_len: int  # prompt + generated tokens
    vocab_size: int
    block_size: int  # tokens per KV block
    max_num_batched_tokens: int  # tokens one step computes at most
    kv_cache_memory: int  # the fast-tier KV byte budget (--kv-cache-memory)
    kv_policy: "KVPolicy"  # the scheduler half of the KV policy (torch-free): name, bytes per block, read_tokens()
    moe: "MoEConfig | None"  # None for a dense model
    # KV blocks now, and their high-water marks since start
    num_kv_blocks: int
    num_kv_blocks_used: int
    max_kv_blocks_used: int
    num_host_blocks: int
    num_host_blocks_used: int
    max_host_blocks_used: int
    kv_cache_bytes: int  # fast-tier bytes the policy's tensors hold
    kv_host_bytes: int
    # requests
    running: tuple[RequestView, ...]
    num_waiting: int
    num_preemptions: int
    prefix_cache_hits: int  # prompt tokens found in the prefix cache
    kv_stats: dict[str, int] = field(default_factory=dict)  # the policy's own counters (lazy: token-layers computed)
    experts: ExpertStats | None = None  # with --expert-store
    speculative: dict | None = None  # with --speculative-method: method, draft/accepted tokens, acceptance rate

    @property
    def kv_all_free(self) -> bool:
        """No KV block (device or host) is held: nothing leaked once every request is done."""
        return self.num_kv_blocks_used == 0 and self.num_host_blocks_used == 0

    @property
    def num_running(self) -> int:
        return len(self.running)
