"""Counters of the expert store and its prefetcher, for engine stats, /metrics and benchmarks. Plain data,
cumulative. The demand path (store.py) keeps ExpertStats; the prefetcher (prefetch.py) keeps PrefetchStats,
which the store's stats() reports inside its ExpertStats."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExpertStats:
    lookups: int = 0  # experts a forward needed (per layer call, each distinct expert once)
    hits: int = 0  # of which already in the cache or being read by a prefetch
    bytes_read: int = 0  # from disk, demand and prefetch
    num_reads: int = 0
    read_seconds: float = 0.0  # time in reads (reader threads)
    stall_seconds: float = 0.0  # time the forward waited for expert reads
    num_prefetches: int = 0  # reads started by a prediction
    num_prefetches_used: int = 0  # of which used by a forward before eviction
    num_predicted: int = 0  # experts predicted for a layer
    num_predicted_used: int = 0  # of which the layer routed to
    num_needed: int = 0  # experts routed to at layers a prediction was due for
    num_evictions: int = 0
    num_slots: int = 0
    max_slots_used: int = 0
    cache_nbytes: int = 0  # RAM held for experts (never above the budget)
    budget_nbytes: int = 0
    io_mode: str = ""  # direct (O_DIRECT) or fadvise (page cache dropped after each read)
    offload_setting: str = ""  # eviction+prefetch in force (the engine's tuner: chosen online with auto)
    num_offload_switches: int = 0  # times auto changed it

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Predicted experts the layer then used / predicted experts."""
        return self.num_predicted_used / self.num_predicted if self.num_predicted else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Used experts that had been predicted / used experts (at layers with a prediction due)."""
        return self.num_predicted_used / self.num_needed if self.num_needed else 0.0


@dataclass
class PrefetchStats:
    """The prefetcher's share of ExpertStats (same names, same meaning)."""

    num_prefetches: int = 0
    num_predicted: int = 0
    num_predicted_used: int = 0
    num_needed: int = 0
