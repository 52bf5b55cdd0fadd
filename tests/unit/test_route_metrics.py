"""Route mode's (R2R) token counts reach /metrics, beside the speculative counters."""
from __future__ import annotations

from ferry.engine.stats import EngineStats
from ferry.server.metrics import ServerMetrics
from ferry.speculative.route import RouteStats


def test_route_counts_are_exported():
    stats = RouteStats(num_small_tokens=30, num_large_tokens=10).as_dict()
    text = ServerMetrics(lambda: EngineStats(speculative={"method": "route", **stats}), "m").render().decode()
    for line in ('ferry_route_small_tokens_total{model_name="m"} 30.0',
                 'ferry_route_large_tokens_total{model_name="m"} 10.0',
                 'ferry_route_large_fraction{model_name="m"} 0.25'):
        assert line in text
    plain = ServerMetrics(lambda: EngineStats(speculative={"method": "ngram", "num_draft_tokens": 4,
                                                            "num_accepted_tokens": 2, "acceptance_rate": 0.5,
                                                            "mean_accepted_length": 2.0}), "m").render().decode()
    assert "ferry_route" not in plain and "ferry_spec_decode_acceptance_rate" in plain
