"""The official openai package as the client: completions and chat, streamed and not, n > 1, stop strings,
logprobs, usage; plus /v1/models, /tokenize and /detokenize."""
from __future__ import annotations

import httpx
import openai
import pytest

MODEL = "tiny-llama"
PROMPT = "Once upon a time, in a small village"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _greedy(client: openai.OpenAI, **kw) -> openai.types.Completion:
    return client.completions.create(model=MODEL, prompt=PROMPT, **{"temperature": 0, **kw})


def test_models_lists_the_served_name(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_matches_offline_llm(client, offline_llm):
    from ferry import SamplingParams

    r = _greedy(client, max_tokens=12)
    expected = offline_llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == expected.outputs[0].text
    assert r.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_completion_equals_non_streamed(client):
    full = _greedy(client, max_tokens=12)
    chunks = list(_greedy(client, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_ends_with_done(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_chat_stream_and_not(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about Lily."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_prompt_is_the_chat_template(server, client, offline_llm):
    messages = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=1)
    tok = httpx.post(server.url + "/tokenize", json={"messages": messages}, timeout=30).json()
    assert tok["tokens"] == offline_llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert r.usage.prompt_tokens == tok["count"]
    text = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}, timeout=30).json()["prompt"]
    assert text.count("<|im_start|>") == 2 and "hello<|im_end|>" in text  # special tokens are kept


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                       max_completion_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_n_choices_with_seed(client):
    kw = dict(max_tokens=8, temperature=1.0, n=3, seed=1234, extra_body={"ignore_eos": True})
    a = _greedy(client, **kw)
    b = _greedy(client, **kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert len({c.text for c in a.choices}) > 1  # but the choices differ from each other
    assert a.usage.completion_tokens == 24


def test_n_choices_streamed(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                                 temperature=0.8, seed=7, max_tokens=6, stream=True))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert set(finished) == {0, 1}


def test_multiple_prompts(client):
    r = client.completions.create(model=MODEL, prompt=["The sea", "The storm"], temperature=0, max_tokens=4, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    # greedy: both choices of one prompt agree
    by_index = {c.index: c.text for c in r.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]


def test_stop_string(client):
    plain = _greedy(client, max_tokens=24, extra_body={"ignore_eos": True}).choices[0].text
    cut = next(i for i in range(3, len(plain)) if not plain[i].isspace() and plain[i] != "\ufffd")
    stop = plain[cut]
    expected = plain[:plain.index(stop)]
    r = _greedy(client, max_tokens=24, stop=[stop, "never-appears"], extra_body={"ignore_eos": True})
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in _greedy(client, max_tokens=24, stop=stop, stream=True,
                                                          extra_body={"ignore_eos": True}))
    assert streamed == expected


def test_completion_logprobs(client):
    r = _greedy(client, max_tokens=6, logprobs=3, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()), abs=1e-4)  # greedy picks the best
    streamed = [c.choices[0].logprobs for c in _greedy(client, max_tokens=6, logprobs=3, stream=True,
                                                       extra_body={"ignore_eos": True}) if c.choices[0].logprobs]
    assert sum(len(x.tokens) for x in streamed) == 6
    assert [v for x in streamed for v in x.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                       max_tokens=5, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-4)
        assert item.bytes == list(item.token.encode("utf-8"))


def test_tokenize_detokenize_roundtrip(server):
    tok = httpx.post(server.url + "/tokenize", json={"prompt": "The quick brown fox"}, timeout=30).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0
    text = httpx.post(server.url + "/detokenize", json={"tokens": tok["tokens"]}, timeout=30).json()["prompt"]
    assert "The quick brown fox" in text
