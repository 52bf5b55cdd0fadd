"""Each bad input is a 4xx in OpenAI's error shape, with a message that says what is wrong."""
from __future__ import annotations

import httpx
import pytest

COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
OK_CHAT = [{"role": "user", "content": "hi"}]

# (name, path, raw body or dict, expected status, words the message must contain, expected param or None)
CASES = [
    ("malformed json", COMPLETIONS, b'{"prompt": "hi", "max_tokens": ', 400, ["not valid JSON", "line 1"], None),
    ("trailing garbage", COMPLETIONS, b'{"prompt": "hi"} x', 400, ["not valid JSON"], None),
    ("invalid utf-8", COMPLETIONS, b'{"prompt": "caf\xe9 \xff"}', 400, ["not valid UTF-8", "offset"], None),
    ("lone surrogate", COMPLETIONS, b'{"prompt": "a\\ud800b"}', 400, ["prompt", "unicode", "position 1"], "prompt"),
    ("lone surrogate in a list", COMPLETIONS, b'{"prompt": ["ok", "a\\udc00"]}', 400, ["prompt.1", "position 1"],
     "prompt.1"),
    ("json null", COMPLETIONS, b"null", 400, ["JSON object", "got a JSON null"], None),
    ("json string", COMPLETIONS, b'"hi"', 400, ["got a JSON string"], None),
    ("empty body", COMPLETIONS, b"", 400, ["empty"], None),
    ("json array", COMPLETIONS, b"[1, 2]", 400, ["JSON object", "list"], None),
    ("NaN", COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}', 400, ["NaN"], None),
    ("missing prompt", COMPLETIONS, {"max_tokens": 3}, 400, ["prompt", "required"], "prompt"),
    ("prompt wrong type", COMPLETIONS, {"prompt": 5}, 400, ["prompt"], "prompt"),
    ("max_tokens wrong type", COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, 400, ["max_tokens", "integer"],
     "max_tokens"),
    ("negative max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": -1}, 400, ["max_tokens"], "max_tokens"),
    ("zero max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, ["max_tokens"], "max_tokens"),
    ("huge max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": 100000}, 400,
     ["maximum context length", "max_tokens"], None),
    ("enormous max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": 10 ** 40}, 400, ["max_tokens"], "max_tokens"),
    ("prompt longer than context", COMPLETIONS, {"prompt": "Lily and Tom " * 400, "max_tokens": 1}, 400,
     ["maximum context length", "prompt"], None),
    ("token prompt longer than context", COMPLETIONS, {"prompt": [5] * 600}, 400, ["maximum context length"], None),
    ("token id outside vocab", COMPLETIONS, {"prompt": [1, 10 ** 6]}, 400, ["vocabulary"], "prompt"),
    ("negative token id", COMPLETIONS, {"prompt": [1, -3]}, 400, ["prompt"], "prompt"),
    ("unknown model", COMPLETIONS, {"model": "gpt-17", "prompt": "hi"}, 404, ["gpt-17", "does not exist"], "model"),
    ("temperature negative", COMPLETIONS, {"prompt": "hi", "temperature": -1}, 400, ["temperature"], "temperature"),
    ("temperature above OpenAI's range", COMPLETIONS, {"prompt": "hi", "temperature": 1000}, 400, ["temperature", "2"],
     "temperature"),
    ("stop_token_ids outside vocab", COMPLETIONS, {"prompt": "hi", "stop_token_ids": [10 ** 6]}, 400,
     ["stop_token_ids", "vocabulary"], "stop_token_ids"),
    ("stream as a string", COMPLETIONS, {"prompt": "hi", "stream": "yes"}, 400, ["stream", "boolean"], "stream"),
    ("n as a float", COMPLETIONS, {"prompt": "hi", "n": 2.0}, 400, ["n", "integer"], "n"),
    ("max_tokens as a float", COMPLETIONS, {"prompt": "hi", "max_tokens": 5.0}, 400, ["max_tokens"], "max_tokens"),
    ("chat logprobs as a string", CHAT, {"messages": OK_CHAT, "logprobs": "true"}, 400, ["logprobs"], "logprobs"),
    ("top_p too big", COMPLETIONS, {"prompt": "hi", "top_p": 5}, 400, ["top_p"], "top_p"),
    ("n too big", COMPLETIONS, {"prompt": "hi", "n": 1000}, 400, ["n"], "n"),
    ("logprobs too many", COMPLETIONS, {"prompt": "hi", "logprobs": 1000}, 400, ["logprobs"], "logprobs"),
    ("too many stop strings", COMPLETIONS, {"prompt": "hi", "stop": ["a"] * 100}, 400, ["stop"], "stop"),
    ("empty stop string", COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400, ["stop"], "stop"),
    ("seed too big", COMPLETIONS, {"prompt": "hi", "seed": 2 ** 80}, 400, ["seed"], "seed"),
    ("echo unsupported", COMPLETIONS, {"prompt": "hi", "echo": True}, 400, ["echo", "not supported"], None),
    ("logit_bias unsupported", COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 1}}, 400, ["logit_bias"], None),
    ("kv_budget zero", COMPLETIONS, {"prompt": "hi", "kv_budget": 0}, 400, ["kv_budget", "> 0"], None),
    ("kv_budget on full attention", COMPLETIONS, {"prompt": "hi", "kv_budget": 0.5}, 400, ["kv_budget", "--kv-policy"],
     None),
    ("empty messages", CHAT, {"messages": []}, 400, ["messages", "at least 1"], "messages"),
    ("messages wrong type", CHAT, {"messages": "hi"}, 400, ["messages"], "messages"),
    ("bad role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, ["role"], "messages.0.role"),
    ("image part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400,
     ["messages"], None),
    ("top_logprobs without logprobs", CHAT, {"messages": OK_CHAT, "top_logprobs": 2}, 400, ["logprobs"], None),
    ("chat max_tokens huge", CHAT, {"messages": OK_CHAT, "max_completion_tokens": 99999}, 400,
     ["maximum context length"], None),
    ("tools unsupported", CHAT, {"messages": OK_CHAT, "tools": [{"type": "function"}]}, 400, ["tools"], None),
    ("detokenize outside vocab", "/detokenize", {"tokens": [10 ** 6]}, 400, ["vocabulary"], "tokens"),
    ("tokenize nothing", "/tokenize", {}, 400, ["prompt", "messages"], None),
]


@pytest.mark.parametrize("name,path,body,status,words,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, name, path, body, status, words, param):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for word in words:
        assert word.lower() in err["message"].lower(), err["message"]
    if param is not None:
        assert err["param"] == param, err
    assert err["type"] == ("invalid_request_error" if status in (400, 404) else err["type"])


def test_context_length_has_its_code(server):
    r = httpx.post(server.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 100000}, timeout=30)
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_body_too_large_is_413(server):
    r = httpx.post(server.url + COMPLETIONS, content=b'{"prompt": "' + b"a" * (9 << 20) + b'"}',
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]


def test_form_encoded_json_is_accepted(server):
    """curl -d sends application/x-www-form-urlencoded; a JSON body is still read as JSON."""
    r = httpx.post(server.url + COMPLETIONS, content=b'{"prompt": "hi", "max_tokens": 2}',
                   headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 200, r.text


def test_unknown_route_and_method(server):
    r = httpx.get(server.url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + COMPLETIONS, timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(server.url + "/v1/models/gpt-17", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_server_still_serves_after_bad_inputs(server):
    r = httpx.post(server.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    assert server.wait_idle()["ferry_kv_blocks_used"] == 0


def test_huge_integer_says_digits_not_python_internals(server):
    """Python's own 'Exceeds the limit (4300 digits) ... sys.set_int_max_str_digits()' must not reach clients."""
    for digits in (4500, 50000):
        body = b'{"prompt": "hi", "max_tokens": 1' + b"0" * digits + b"}"
        r = httpx.post(server.url + COMPLETIONS, content=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "digits" in message and "set_int_max_str_digits" not in message and "4300" not in message, message


def test_missing_model_means_the_served_one(server):
    """Decision (README, "API"): OpenAI requires `model`; ferry, like vLLM, serves one model and takes a missing
    `model` as that one. A wrong name is still a 404 (see CASES)."""
    r = httpx.post(server.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 1}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "tiny-llama", r.text
