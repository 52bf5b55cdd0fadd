"""Counters the engine keeps for /metrics and benchmarks. Plain data."""
from __future__ import annotations

from dataclasses import dataclass

from ferry.experts.stats import ExpertStats


@dataclass(frozen=True)
class InstanceLoad:
    index: int
    alive: bool
    in_flight: int
    restarts: int


@dataclass
class EngineStats:
    num_running: int = 0  # requests holding KV blocks
    num_waiting: int = 0  # requests queued (new or preempted)
    num_kv_blocks_total: int = 0
    num_kv_blocks_used: int = 0
    kv_cache_bytes: int = 0  # fast-tier bytes the KV policy's tensors hold (blocks, scales, index): <= --kv-cache-memory
    kv_host_bytes: int = 0  # slow-tier bytes (swap space, offloaded spans)
    num_kv_blocks_offloaded: int = 0  # cumulative blocks a KV policy moved to the slow tier
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found
    num_preemptions: int = 0  # cumulative
    num_fair_preemptions: int = 0  # cumulative, of which to give a waiting client its share (--scheduling-policy fair)
    client_token_shares: dict[str, float] | None = None  # fair: share of the window's tokens per client (top 8 + other)
    num_prompt_tokens: int = 0  # cumulative, of finished and running requests
    num_generation_tokens: int = 0  # cumulative
    num_steps: int = 0
    experts: ExpertStats | None = None  # MoE expert store counters (with --expert-store)
    speculative: dict | None = None  # with --speculative-method: method, acceptance (SpecStats.as_dict)
    decode_weight_bytes_per_s: float = 0.0  # weight bytes a decode step reads / its forward time (moving average)
    # with ferry serve --instances N: per instance (index, alive, requests in flight from the front end, restarts)
    instances: list[InstanceLoad] | None = None

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
