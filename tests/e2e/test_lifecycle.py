"""API key, request timeout, default bind address, SIGTERM drain."""
from __future__ import annotations

import argparse
import inspect
import json
import signal
import threading
import time

import httpx
import openai
import pytest

KEY = "sekret-key"


@pytest.fixture(scope="module")
def keyed_server(start_server):
    return start_server("--api-key", KEY, "--request-timeout", "0.5")


def test_api_key_required(keyed_server):
    url = keyed_server.url
    body = {"prompt": "hi", "max_tokens": 2}
    r = httpx.post(url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "Authorization: Bearer" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
    assert httpx.post(url + "/tokenize", json={"prompt": "x"}, timeout=30).status_code == 401
    # a big body without the key is refused before it is read
    r = httpx.post(url + "/v1/completions", content=b"x" * (1 << 20), timeout=30)
    assert r.status_code == 401
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 200
    assert httpx.get(url + "/health", timeout=30).status_code == 200  # probes need no key


INTROSPECTION = ("/metrics", "/docs", "/openapi.json")


def test_introspection_is_open_by_default(keyed_server):
    """Documented (README, "Security"): with --api-key alone, /health /metrics /docs /openapi.json answer without it."""
    for path in ("/health", *INTROSPECTION):
        assert httpx.get(keyed_server.url + path, timeout=30).status_code == 200, path


def test_metrics_require_key(start_server):
    server = start_server("--api-key", KEY, "--metrics-require-key")
    auth = {"Authorization": f"Bearer {KEY}"}
    for path in INTROSPECTION:
        assert httpx.get(server.url + path, timeout=30).status_code == 401, path
        assert httpx.get(server.url + path, headers=auth, timeout=30).status_code == 200, path
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200  # probes need no key


def test_api_key_with_openai_client(keyed_server):
    bad = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model=keyed_server.model, prompt="hi", max_tokens=2).choices[0].text is not None


def test_request_timeout(keyed_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"prompt": "Once", "max_tokens": 500, "n": 16, "ignore_eos": True, "temperature": 0}  # ~8000 tokens
    t = time.monotonic()
    r = httpx.post(keyed_server.url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 408, r.text
    assert "--request-timeout" in r.json()["error"]["message"] and time.monotonic() - t < 10
    with httpx.stream("POST", keyed_server.url + "/v1/completions", json={**body, "stream": True}, headers=headers,
                      timeout=60) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[-2][6:])["error"]["code"] == "request_timeout" and events[-1] == "data: [DONE]"
    assert keyed_server.wait_idle()["ferry_kv_blocks_used"] == 0


def test_default_bind_is_loopback():
    from ferry.server.app import add_server_arguments, run_server

    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    assert parser.parse_args([]).host == "127.0.0.1"
    assert inspect.signature(run_server).parameters["host"].default == "127.0.0.1"


def test_sigterm_drains_in_flight_requests(start_server):
    server = start_server(host_flag=False)  # no --host: the default
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in server.log()
    body = {"prompt": "The storm", "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    result: dict = {}
    started = threading.Event()

    def client() -> None:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
            finish, last = None, None
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    started.set()
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        finish = chunk["choices"][0]["finish_reason"] or finish
                    else:
                        result["tokens"] = chunk["usage"]["completion_tokens"]
                last = line or last
            result.update(status=r.status_code, finish=finish, last=last)

    t = threading.Thread(target=client)
    t.start()
    assert started.wait(60)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.ConnectError):  # no new connections while draining
        httpx.get(server.url + "/health", timeout=5)
    t.join(60)
    assert result == {"status": 200, "finish": "length", "last": "data: [DONE]", "tokens": 400}
    server.proc.wait(30)
    assert server.proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in server.log()
