"""/metrics parses with prometheus_client's parser, holds the engine and latency families, and its counters move."""
from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

FAMILIES = {
    "ferry_num_requests_running": "gauge", "ferry_num_requests_waiting": "gauge", "ferry_kv_blocks_used": "gauge",
    "ferry_kv_blocks_total": "gauge", "ferry_kv_cache_usage_ratio": "gauge", "ferry_prefix_cache_hit_rate": "gauge",
    "ferry_kv_cache_bytes": "gauge", "ferry_kv_host_bytes": "gauge", "ferry_decode_weight_bytes_per_second": "gauge",
    "ferry_num_preemptions": "counter", "ferry_prompt_tokens": "counter", "ferry_generation_tokens": "counter",
    "ferry_time_to_first_token_seconds": "histogram", "ferry_time_per_output_token_seconds": "histogram",
    "ferry_e2e_request_latency_seconds": "histogram", "ferry_request_success": "counter",
}


def test_metrics_parse_with_the_right_types(server):
    r = httpx.get(server.url + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    types = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, (name, types.get(name))
    assert server.metrics()["ferry_kv_blocks_total"] > 0


def test_counters_move_as_requests_complete(server):
    before = server.wait_idle()
    r = httpx.post(server.url + "/v1/completions", timeout=60,
                   json={"prompt": "The quick brown fox", "max_tokens": 5, "ignore_eos": True, "n": 2})
    assert r.status_code == 200
    usage = r.json()["usage"]
    after = server.wait_idle()

    def moved(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert moved("ferry_generation_tokens_total") == usage["completion_tokens"] == 10
    assert moved("ferry_prompt_tokens_total") == 2 * usage["prompt_tokens"]  # each of the n sequences
    assert moved("ferry_request_success_total{finished_reason=length}") == 2
    for hist in ("ferry_time_to_first_token_seconds", "ferry_e2e_request_latency_seconds",
                 "ferry_time_per_output_token_seconds"):
        assert moved(f"{hist}_count") == 1, hist
        assert moved(f"{hist}_sum") > 0, hist
    assert moved("ferry_http_responses_total{status=200}") >= 1
    assert after["ferry_num_requests_running"] == 0 and after["ferry_kv_blocks_used"] == 0
    assert after["ferry_decode_weight_bytes_per_second"] > 0  # 5 tokens: decode steps ran
    # the same prompt again is served partly from the prefix cache
    httpx.post(server.url + "/v1/completions", json={"prompt": "The quick brown fox", "max_tokens": 1}, timeout=60)
    assert server.wait_idle()["ferry_prefix_cache_queries_total"] > after["ferry_prefix_cache_queries_total"]
