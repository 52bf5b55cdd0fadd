"""The expert store's counters reach /metrics (and are absent without a store)."""
from __future__ import annotations

from ferry.engine.stats import EngineStats
from ferry.experts.stats import ExpertStats
from ferry.server.metrics import ServerMetrics


def test_expert_metrics_are_exported():
    experts = ExpertStats(lookups=8, hits=6, bytes_read=4000, stall_seconds=0.5, num_predicted=4,
                          num_predicted_used=3, num_needed=6, cache_nbytes=1 << 20, offload_setting="lru+pregate",
                          num_offload_switches=3)
    text = ServerMetrics(lambda: EngineStats(num_generation_tokens=10, experts=experts), "m").render().decode()
    for line in ('ferry_expert_cache_hit_rate{model_name="m"} 0.75', 'ferry_expert_bytes_read_total{model_name="m"} 4000.0',
                 'ferry_expert_bytes_read_per_token{model_name="m"} 400.0',
                 'ferry_expert_prefetch_precision{model_name="m"} 0.75', 'ferry_expert_prefetch_recall{model_name="m"} 0.5',
                 'ferry_expert_io_stall_seconds_per_token{model_name="m"} 0.05',
                 'ferry_expert_offload_switches_total{model_name="m"} 3.0',
                 'ferry_expert_offload_setting_info{model_name="m",setting="lru+pregate"} 1.0'):
        assert line in text
    assert "ferry_expert" not in ServerMetrics(lambda: EngineStats(), "m").render().decode()
