"""A request that fails inside the engine (or hits a bug in the server) ends with an error of its own — a 500 in
OpenAI's shape, or an error event in a started stream — and everyone else is served as usual.

The engine here is a stand-in with AsyncLLM's interface (its input processor is the real one), behind a real
uvicorn server on loopback; tests/engine/test_failure_isolation.py fails requests inside the real engine."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import uvicorn

from ferry.engine.inputs import InputLimits, InputProcessor, ProcessedPrompt
from ferry.engine.stats import EngineStats
from ferry.request import CompletionOutput, RequestOutput, SamplingParams
from ferry.server.app import build_app

from tests.e2e.conftest import free_port


class FakeTokenizer:
    has_chat_template = True
    eos_token_ids = frozenset()

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 256 for c in text] or [0]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.encode("".join(m["content"] for m in messages))


class FakeModelConfig:
    path = "fake"
    vocab_size = 256


class FakeEngine:
    """Echoes the prompt one character per step; 'FAIL' in the prompt fails it the way the engine does
    (finish_reason 'error'), 'CRASH' raises an unexpected exception after the first output."""

    tokenizer = FakeTokenizer()
    model_config = FakeModelConfig()
    max_model_len = 1000
    inputs = InputProcessor(tokenizer, InputLimits(max_model_len, FakeModelConfig.vocab_size, "full", ()))
    num_unfinished = 0

    def is_alive(self) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(num_kv_blocks_total=10)

    async def process(self, prompt, params: SamplingParams | None = None, fit_max_tokens: bool = False) -> ProcessedPrompt:
        return self.inputs.process(prompt, params, fit_max_tokens)

    async def generate(self, processed: ProcessedPrompt, params: None, request_id: str, priority: int = 0):
        prompt, params = processed.prompt_token_ids, processed.params
        text = "".join(chr(i) for i in prompt)
        ids: list[int] = []
        for i, t in enumerate(prompt[: params.max_tokens]):
            await asyncio.sleep(0.002)
            ids.append(t)
            if "CRASH" in text and i == 1:
                raise RuntimeError("kaboom")
            failed = "FAIL" in text and i == 2
            last = failed or len(ids) == min(len(prompt), params.max_tokens)
            reason = "error" if failed else ("length" if last else None)
            out = CompletionOutput(0, "".join(chr(x) for x in ids), list(ids), reason)
            yield RequestOutput(request_id, None, prompt, [out], last, error="boom: the step failed" if failed else None)
            if last:
                return

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        pass


@pytest.fixture(scope="module")
def fake_url():
    app = build_app(FakeEngine(), served_model_name="fake")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def _post(url: str, prompt: str, stream: bool) -> tuple[int, list[dict] | dict]:
    body = {"prompt": prompt, "max_tokens": 50, "stream": stream}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        r.read()
        if not stream or r.status_code != 200:
            return r.status_code, r.json()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        return r.status_code, [json.loads(e) for e in events[:-1]]


def test_engine_failure_is_a_500_in_openai_shape(fake_url):
    status, body = _post(fake_url, "please FAIL now", stream=False)
    assert status == 500
    assert body["error"]["type"] == "server_error" and "boom" in body["error"]["message"]


def test_engine_failure_mid_stream_is_an_error_event(fake_url):
    status, events = _post(fake_url, "please FAIL now", stream=True)
    assert status == 200
    assert "boom" in events[-1]["error"]["message"]
    assert events[0]["choices"][0]["text"]  # what was generated before the failure was streamed


def test_server_bug_fails_only_that_request(fake_url):
    status, body = _post(fake_url, "CRASH", stream=False)
    assert status == 500 and "kaboom" in body["error"]["message"]
    status, events = _post(fake_url, "CRASH", stream=True)
    assert status == 200 and "kaboom" in events[-1]["error"]["message"]


def test_others_are_served_while_some_fail(fake_url):
    prompts = ["hello there", "please FAIL now", "CRASH", "general kenobi"] * 4

    async def run():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(*(client.post(fake_url + "/v1/completions", json={"prompt": p, "max_tokens": 50})
                                          for p in prompts))

    for prompt, r in zip(prompts, asyncio.run(run())):
        if "FAIL" in prompt or "CRASH" in prompt:
            assert r.status_code == 500
        else:
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == prompt
    assert httpx.get(fake_url + "/health", timeout=30).status_code == 200
