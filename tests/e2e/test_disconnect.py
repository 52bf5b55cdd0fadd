"""Clients that go away mid-request leave no running request and no used KV block behind."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx

LONG = {"model": "tiny-llama", "prompt": "The old fisherman", "max_tokens": 400, "temperature": 0, "ignore_eos": True}


def _raw_request(url: str, body: dict) -> socket.socket:
    """Send a POST on a raw socket (so the test controls exactly when the connection closes)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _wait_running(server, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while server.metrics()["ferry_num_requests_running"] < n:
        assert time.monotonic() < deadline, "requests never started running"
        time.sleep(0.02)


def test_streaming_clients_that_drop_free_everything(server):
    async def drop_after_two_chunks() -> int:
        async with httpx.AsyncClient(timeout=60) as client:
            async with client.stream("POST", server.url + "/v1/completions", json={**LONG, "stream": True}) as r:
                assert r.status_code == 200
                seen = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        seen += 1
                        if seen == 2:
                            return seen  # leaving the block closes the connection mid-stream
        return seen

    async def run() -> list[int]:
        return await asyncio.gather(*(drop_after_two_chunks() for _ in range(4)))

    before = server.metrics()
    assert asyncio.run(run()) == [2] * 4
    after = server.wait_idle(timeout=10)
    assert after["ferry_num_requests_running"] == 0
    assert after["ferry_kv_blocks_used"] == 0
    # the 4 requests were aborted long before their 400 tokens
    assert after["ferry_generation_tokens_total"] - before["ferry_generation_tokens_total"] < 4 * 300
    assert after['ferry_request_success_total{finished_reason=abort}'] >= 4


def test_non_streaming_client_that_drops_frees_everything(server):
    sock = _raw_request(server.url, LONG)
    _wait_running(server, 1)
    sock.close()
    after = server.wait_idle(timeout=10)
    assert after["ferry_num_requests_running"] == 0 and after["ferry_kv_blocks_used"] == 0


def test_stream_dropped_before_first_token(server):
    """A client that leaves while its request is still queued or prefilling also aborts it."""
    socks = [_raw_request(server.url, {**LONG, "stream": True, "n": 4}) for _ in range(3)]
    time.sleep(0.05)
    for s in socks:
        s.close()
    after = server.wait_idle(timeout=10)
    assert after["ferry_num_requests_running"] == 0 and after["ferry_kv_blocks_used"] == 0
    # and the server still serves
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_abort_counter_counts_choices(server):
    """finished_reason=abort counts choices, like the other finish reasons: a dropped n=2 request is 2 aborts
    (it was 1). Disconnects after the last token, or before the prompt reached the engine, abort nothing."""
    key = "ferry_request_success_total{finished_reason=abort}"
    before = server.metrics().get(key, 0)
    sock = _raw_request(server.url, {**LONG, "n": 2})
    _wait_running(server, 1)
    sock.close()
    after = server.wait_idle(timeout=10)
    assert after["ferry_kv_blocks_used"] == 0
    deadline = time.monotonic() + 10
    while server.metrics().get(key, 0) - before < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metrics().get(key, 0) - before == 2
