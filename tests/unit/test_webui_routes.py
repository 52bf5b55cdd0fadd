"""The web page's routes without a model (a stand-in engine): served with a CSP that allows only the server,
small, off with webui=False (--no-webui), and the stats feed's payload built from EngineStats."""
from __future__ import annotations

import json
import pathlib
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from ferry.engine.stats import EngineStats
from ferry.experts.stats import ExpertStats
from ferry.server.app import build_app
from ferry.server.webui import CSP, STATIC_DIR, stats_events, stats_payload


def _engine(stats: EngineStats) -> SimpleNamespace:
    return SimpleNamespace(stats=lambda: stats, model_config=SimpleNamespace(path=pathlib.Path("m")), max_model_len=64,
                           tokenizer=None, inputs=SimpleNamespace(limits=SimpleNamespace(kv_policy="int8")),
                           num_unfinished=0, is_alive=lambda: True)


def _client(webui: bool = True, api_key: str | None = None) -> TestClient:
    app = build_app(_engine(EngineStats(num_kv_blocks_total=8)), served_model_name="m", api_key=api_key,
                    webui=webui, shutdown_engine=False)
    return TestClient(app)


def test_page_and_files_carry_the_csp_and_weigh_under_100_kb():
    client = _client()
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-security-policy"] == CSP
    assert "default-src 'self'" in CSP and "http" not in CSP and "unsafe" not in CSP
    total = len(r.content)
    for path in STATIC_DIR.iterdir():
        if path.name == "index.html":
            continue
        f = client.get(f"/webui/{path.name}")
        assert f.status_code == 200 and f.headers["content-security-policy"] == CSP, path.name
        total += len(f.content)
    assert total < 100_000
    assert client.get("/webui/../app.py").status_code == 404
    assert client.get("/webui/nothing.js").status_code == 404


def test_page_names_no_other_host():
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        assert "http://" not in text and "https://" not in text and "//" + "cdn" not in text, path.name
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "eval(" not in text, path.name


def test_no_webui_turns_the_page_and_its_feed_off():
    client = _client(webui=False)
    assert client.get("/").status_code == 404
    assert client.get("/v1/stats/stream").status_code == 404
    assert client.get("/health").status_code == 200


def test_the_feed_needs_the_key_and_the_page_does_not():
    client = _client(api_key="k")
    assert client.get("/").status_code == 200
    assert client.get("/v1/stats/stream").status_code == 401




def test_stats_payload_rates_and_experts():
    before = EngineStats(num_generation_tokens=10, num_prompt_tokens=100)
    now = EngineStats(num_running=2, num_waiting=1, num_kv_blocks_used=3, num_kv_blocks_total=8,
                      prefix_cache_queries=10, prefix_cache_hits=4, num_generation_tokens=30, num_prompt_tokens=100,
                      experts=ExpertStats(lookups=10, hits=5, bytes_read=3000, stall_seconds=0.3))
    p = stats_payload(now, (1.0, before), 3.0, "m", "full")
    assert (p["running"], p["waiting"], p["kv_blocks_used"], p["kv_blocks_total"]) == (2, 1, 3, 8)
    assert p["prefix_cache_hit_rate"] == 0.4 and p["generation_tokens_per_s"] == 10.0 and p["prompt_tokens_per_s"] == 0
    assert p["experts"]["hit_rate"] == 0.5 and p["experts"]["bytes_read_per_token"] == 100.0
    assert p["experts"]["io_stall_per_token"] == pytest.approx(0.01)
    first = stats_payload(EngineStats(), None, 0.0, "m", "full")
    assert first["generation_tokens_per_s"] is None and first["experts"] is None
    json.dumps(first)


def test_stats_events_are_sse_once_per_interval():
    import asyncio

    async def two() -> list[str]:
        gen = stats_events(lambda: EngineStats(num_generation_tokens=5), "m", "full", 0.01)
        out = [await gen.__anext__(), await gen.__anext__()]
        await gen.aclose()
        return out

    events = asyncio.run(two())
    assert all(e.startswith("data: {") and e.endswith("\n\n") for e in events)
    assert json.loads(events[1][6:])["generation_tokens_per_s"] == 0.0


def test_stats_events_end_when_the_server_stops():
    import asyncio

    async def drain() -> list[str]:
        calls = iter([False, False, True])
        return [e async for e in stats_events(EngineStats, "m", "full", 0.0, lambda: next(calls))]

    assert len(asyncio.run(drain())) == 2


def test_no_webui_flag_reaches_run_server():
    import argparse

    from ferry.server.app import add_server_arguments, server_kwargs

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert server_kwargs(parser.parse_args([]))["webui"] is True
    assert server_kwargs(parser.parse_args(["--no-webui"]))["webui"] is False
