"""Sampling defaults from the checkpoint's generation_config.json (issue 24): a request that leaves a sampling
value unset takes the checkpoint's; an explicit value always wins; both the server and `ferry chat` do it."""
from __future__ import annotations

import argparse
import json
import pathlib

import pytest

from ferry.engine.inputs import load_sampling_defaults, sampling_params
from ferry.errors import InvalidRequest
from ferry.server.protocol import ChatCompletionRequest, CompletionRequest

ASSETS = pathlib.Path(__file__).resolve().parents[2] / "ferry" / "assets"
DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.1}


def _folder(tmp_path: pathlib.Path, config: object) -> pathlib.Path:
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return tmp_path


def test_reads_only_the_sampling_numbers(tmp_path):
    folder = _folder(tmp_path, {"eos_token_id": 2, "temperature": 0.6, "top_k": 20.0, "top_p": "high",
                                "repetition_penalty": True, "do_sample": True})
    assert load_sampling_defaults(folder) == {"temperature": 0.6, "top_k": 20}
    assert load_sampling_defaults(tmp_path / "missing") == {}
    assert load_sampling_defaults(None) == {}
    assert load_sampling_defaults(_folder(tmp_path, [1, 2])) == {}
    (tmp_path / "generation_config.json").write_text("{not json")
    assert load_sampling_defaults(tmp_path) == {}


def test_in_house_chat_models_ship_defaults_that_sample():
    for name in ("ferry-tiny", "ferry-tiny-moe"):
        d = load_sampling_defaults(ASSETS / name)
        assert set(d) == set(DEFAULTS) and d["temperature"] > 0 and d["repetition_penalty"] > 1, name


@pytest.mark.parametrize("body_type,extra", [(ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi"}]}),
                                             (CompletionRequest, {"prompt": "hi"})])
def test_api_unset_takes_the_checkpoint_and_explicit_wins(body_type, extra):
    unset = body_type(**extra).sampling_params(16, None, DEFAULTS)
    assert (unset.temperature, unset.top_p, unset.top_k, unset.repetition_penalty) == (0.7, 0.9, 40, 1.1)
    explicit = body_type(**extra, temperature=0, top_p=1.0, top_k=-1, repetition_penalty=1.0).sampling_params(
        16, None, DEFAULTS)
    assert (explicit.temperature, explicit.top_p, explicit.top_k, explicit.repetition_penalty) == (0, 1.0, 0, 1.0)
    partial = body_type(**extra, temperature=0.2).sampling_params(16, None, DEFAULTS)
    assert (partial.temperature, partial.top_p, partial.top_k) == (0.2, 0.9, 40)
    plain = body_type(**extra).sampling_params(16, None)  # no defaults: SamplingParams' own (OpenAI's 1.0)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.repetition_penalty) == (1.0, 1.0, 0, 1.0)


def test_merge_keeps_non_sampling_keys_and_checks_ranges():
    p = sampling_params({"max_tokens": None, "temperature": None, "seed": 3}, DEFAULTS)
    assert p.max_tokens is None and p.temperature == 0.7 and p.seed == 3
    with pytest.raises(InvalidRequest):
        sampling_params({}, {"top_p": 0.0})


def test_ferry_chat_uses_the_checkpoint_defaults_and_flags_win():
    from ferry.cli import _sampling_params

    args = argparse.Namespace(**{name: None for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                                           "frequency_penalty", "repetition_penalty", "seed",
                                                           "max_tokens", "n")}, stop=None, default_max_tokens=64)
    from ferry.cli import SAMPLING_FLAGS
    for name, _, _ in SAMPLING_FLAGS:
        setattr(args, name, getattr(args, name, None))
    chat = _sampling_params(args, DEFAULTS)
    assert (chat.temperature, chat.top_p, chat.top_k, chat.repetition_penalty) == (0.7, 0.9, 40, 1.1)
    assert _sampling_params(args).temperature == 0.0  # no checkpoint defaults (and `ferry generate`): greedy
    args.temperature, args.top_k = 0.0, 5
    flags = _sampling_params(args, DEFAULTS)
    assert (flags.temperature, flags.top_k, flags.top_p) == (0.0, 5, 0.9)


def test_llm_without_sampling_params_takes_the_checkpoint_defaults():
    """As vLLM's LLM: generate() with no SamplingParams samples with generation_config.json's values."""
    from ferry import LLM
    from ferry.default_model import default_model_path

    llm = LLM(str(default_model_path()), max_model_len=64)
    want = load_sampling_defaults(default_model_path())
    got = llm.get_default_sampling_params()
    assert want and all(getattr(got, k) == v for k, v in want.items())
    out = llm.generate("Once upon a time", use_tqdm=False)[0].outputs[0]
    assert out.token_ids
