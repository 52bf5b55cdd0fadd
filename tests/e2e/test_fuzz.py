"""Fuzzing: schemathesis turns the OpenAPI schema FastAPI publishes into hypothesis strategies, valid and invalid
bodies alike; plus raw JSON values and raw bytes. No request may get a 5xx or hang.

The server's context is capped (--max-model-len 64) so a generated request cannot ask for long generations."""
from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

try:
    import schemathesis
    from schemathesis import GenerationMode
except ImportError:  # the schema fuzz needs it; the raw JSON / bytes fuzz below does not
    schemathesis = None

HANG_SECONDS = 60
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=False)
POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]


@pytest.fixture(scope="module")
def fuzz_server(start_server):
    return start_server("--max-model-len", "64", "--max-waiting", "64", "--request-timeout", "30")


_REFUSED = ("model", "best_of", "echo", "suffix", "logit_bias", "tools", "response_format")


def _mostly_valid(case):
    """Schema-valid bodies are mostly refused for reasons the schema cannot say (context length, unsupported
    options, token ids past the vocabulary); trim those so that random sampling settings reach the engine."""
    body = case.body
    if isinstance(body, dict):
        for key in _REFUSED:
            body.pop(key, None)
        for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
            if isinstance(body.get(key), int):
                body[key] = min(body[key], 6)
        if isinstance(body.get("prompt"), str):
            body["prompt"] = body["prompt"][:20]
        elif isinstance(body.get("prompt"), list):
            body["prompt"] = [p[:20] if isinstance(p, (str, list)) else p % 400 if isinstance(p, int) else p
                              for p in body["prompt"][:3]]
            body["prompt"] = [[t % 400 if isinstance(t, int) else t for t in p] if isinstance(p, list) else p
                              for p in body["prompt"]]
        if isinstance(body.get("messages"), list):
            body["messages"] = body["messages"][:2]
            for m in body["messages"]:
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    m["content"] = m["content"][:20]
        if isinstance(body.get("tokens"), list):
            body["tokens"] = [t % 400 if isinstance(t, int) else t for t in body["tokens"]]
    return case


@pytest.fixture(scope="module")
def strategy(fuzz_server):
    if schemathesis is None:
        pytest.skip("schemathesis is not installed (pip install schemathesis)")
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    positive = schema.as_strategy(GenerationMode.POSITIVE)
    return st.one_of(positive, positive.map(_mostly_valid), schema.as_strategy(GenerationMode.NEGATIVE))


@pytest.fixture(scope="module")
def session():
    import requests  # schemathesis' transport

    with requests.Session() as s:
        yield s


@pytest.fixture(scope="module")
def client(fuzz_server):
    with httpx.Client(base_url=fuzz_server.url, timeout=HANG_SECONDS) as c:
        yield c


def _check(status: int, text: str, what: str) -> None:
    assert status < 500, f"{status} for {what}: {text[:500]}"


@settings(max_examples=300, **SETTINGS)
@given(data=st.data())
def test_schema_fuzz(fuzz_server, strategy, session, data):
    case = data.draw(strategy)
    r = case.call(base_url=fuzz_server.url, session=session, timeout=HANG_SECONDS)
    _check(r.status_code, r.text, f"{case.method} {case.path} {case.body!r}"[:500])
    if r.status_code >= 400:
        assert set(json.loads(r.content)["error"]) == {"message", "type", "param", "code"}


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)
_keys = st.sampled_from(["prompt", "messages", "max_tokens", "n", "stop", "logprobs", "top_logprobs", "stream",
                         "temperature", "seed", "stream_options", "model", "tokens", "top_k", "max_completion_tokens"])
_bodies = st.dictionaries(_keys, _json, max_size=6)


@settings(max_examples=100, **SETTINGS)
@given(path=st.sampled_from(POST_ROUTES), body=_bodies)
def test_json_body_fuzz(client, path, body):
    r = client.post(path, content=json.dumps(body))
    _check(r.status_code, r.text, f"{path} {body!r}")


@settings(max_examples=40, **SETTINGS)
@given(path=st.sampled_from(POST_ROUTES), raw=st.binary(max_size=64))
def test_raw_bytes_fuzz(client, path, raw):
    r = client.post(path, content=raw)
    assert 400 <= r.status_code < 500, (r.status_code, raw)


def test_server_is_healthy_and_idle_after_fuzzing(fuzz_server):
    assert httpx.get(fuzz_server.url + "/health", timeout=30).status_code == 200
    m = fuzz_server.wait_idle(timeout=30)
    assert m["ferry_kv_blocks_used"] == 0 and m["ferry_num_requests_running"] == 0
    assert not [k for k in m if k.startswith("ferry_http_responses_total{status=5")]
    assert "Traceback" not in fuzz_server.log()  # no unexpected exception, even one that ended in a 4xx
