"""ferry/engine/inputs.py: every prompt rule in one place (no model needed: a character tokenizer stands in)."""
from __future__ import annotations

import pytest

from ferry.engine.inputs import InputLimits, InputProcessor
from ferry.errors import ContextLengthExceeded, InvalidRequest
from ferry.request import SamplingParams


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) % 100 for c in text]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if any(m.get("role") == "wizard" for m in messages):
            raise InvalidRequest("the chat template rejected the messages: no wizards")
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + ("<a>" if add_generation_prompt else ""))


@pytest.fixture
def inputs() -> InputProcessor:
    return InputProcessor(CharTokenizer(), InputLimits(max_model_len=20, vocab_size=100, kv_policy="full",
                                                       kv_budget_policies=("spans", "shadow")))


def test_every_prompt_form_gives_the_same_ids(inputs):
    ids = CharTokenizer().encode("hello")
    for prompt in ("hello", ids, {"prompt": "hello"}, {"prompt_token_ids": ids, "prompt": "hello"}):
        p = inputs.process(prompt, SamplingParams(max_tokens=3))
        assert p.prompt_token_ids == ids and p.params.max_tokens == 3
    assert inputs.process("hello").prompt == "hello" and inputs.process(ids).prompt is None


def test_chat_messages_are_rendered_once_through_the_template(inputs):
    p = inputs.process({"messages": [{"role": "user", "content": "hi"}]})
    assert p.prompt_token_ids == CharTokenizer().encode("<user>hi<a>")
    with pytest.raises(InvalidRequest, match="no wizards"):
        inputs.process({"messages": [{"role": "wizard", "content": "hi"}]})


@pytest.mark.parametrize("bad, text", [("", "empty"), ([], "empty"), ([100], "outside the vocabulary"),
                                       ([-1], "outside the vocabulary"), (3.5, "string or a list"),
                                       ([True], "string or a list"), ({"x": 1}, "prompt_token_ids")])
def test_bad_prompts(inputs, bad, text):
    with pytest.raises(InvalidRequest, match=text):
        inputs.process(bad)


def test_the_context_rule_is_one_rule(inputs):
    with pytest.raises(ContextLengthExceeded, match="maximum context length is 20 tokens.*context holds"):
        inputs.process([5] * 20)
    # the offline API lets generation stop at the context; the server's (OpenAI's) rule asks max_tokens to fit
    assert inputs.process([5] * 19, SamplingParams(max_tokens=50)).params.max_tokens == 50
    assert inputs.process([5] * 15, SamplingParams(max_tokens=None), fit_max_tokens=True).params.max_tokens == 5
    assert inputs.process([5] * 15, SamplingParams(max_tokens=5), fit_max_tokens=True).params.max_tokens == 5
    with pytest.raises(ContextLengthExceeded, match="lower max_tokens to at most 5"):
        inputs.process([5] * 15, SamplingParams(max_tokens=6), fit_max_tokens=True)
    with pytest.raises(InvalidRequest, match="min_tokens"):  # the fitted params are validated again
        inputs.process([5] * 15, SamplingParams(max_tokens=None, min_tokens=9), fit_max_tokens=True)


def test_params_against_this_engine(inputs):
    with pytest.raises(InvalidRequest, match="kv_budget applies to servers run with --kv-policy spans, shadow"):
        inputs.process("hi", SamplingParams(kv_budget=0.5))
    spans = InputProcessor(CharTokenizer(), InputLimits(20, 100, "spans", ("spans",)))
    assert spans.process("hi", SamplingParams(kv_budget=0.5)).params.kv_budget == 0.5
    small = InputProcessor(CharTokenizer(), InputLimits(20, 10, "full", ()))
    with pytest.raises(InvalidRequest, match="logprobs=15 exceeds the vocabulary size 10"):
        small.process([1], SamplingParams(logprobs=15))
