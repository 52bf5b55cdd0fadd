"""Counters the engine keeps for /metrics and benchmarks. Plain data."""
from __future__ import annotations

from dataclasses import dataclass, field

from ferry.experts.stats import ExpertStats


@dataclass(frozen=True)
class InstanceLoad:
    index: int
    alive: bool
    in_flight: int
    restarts: int


DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Durations:
    """A histogram of durations in seconds (plain data: /metrics renders it as a Prometheus histogram)."""

    buckets: tuple[float, ...] = DURATION_BUCKETS  # upper bounds; one more count for +Inf
    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BUCKETS) + 1))
    total: float = 0.0
    num: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[next((i for i, b in enumerate(self.buckets) if seconds <= b), len(self.buckets))] += 1
        self.total += seconds
        self.num += 1


@dataclass
class MigrationStats:
    """Live migrations the front end ran (ferry serve --instances N)."""

    outcomes: dict[str, int] = field(default_factory=dict)  # migrated / aborted_src / aborted_dst -> count
    num_blocks: int = 0  # KV blocks copied by migrations that completed
    pause: Durations = field(default_factory=Durations)  # the source stops the request -> the destination runs it
    downtime: Durations = field(default_factory=Durations)  # the source stops the request -> its first token there

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


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
    migrations: MigrationStats | None = None  # with --instances N: live migrations between the instances

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
