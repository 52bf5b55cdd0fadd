"""The committed in-house models (ferry/assets/, trained by modelkit/): they load in ferry and in transformers
and agree token for token; ferry-tiny retrieves; the training loop runs (a 20-step smoke run, not training)."""
from __future__ import annotations

import random

import pytest

from ferry import LLM, SamplingParams
from ferry.default_model import ASSETS, INHOUSE, inhouse_path
from ferry.eval.tasks import Haystack, is_correct, make_sample
from tests.checkpoints import hf_greedy


def _prompts(llm: LLM, lengths: list[int]) -> list[list[int]]:
    ids = llm.tokenizer.encode((ASSETS / "heldout.txt").read_text()[:20000], add_special_tokens=False)
    return [ids[i * 300:i * 300 + n] for i, n in enumerate(lengths)]


@pytest.mark.parametrize("name", INHOUSE)
def test_inhouse_model_matches_transformers(name):
    path = inhouse_path(name)
    with LLM(str(path), dtype="float32") as llm:
        prompts = _prompts(llm, [5, 17, 40, 64, 100, 130])
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    ref, _ = hf_greedy(path, prompts, 12)
    assert [o.outputs[0].token_ids for o in outs] == ref


def test_ferry_tiny_retrieves_a_passkey_at_2k():
    with LLM(str(inhouse_path("ferry-tiny"))) as llm:
        enc = type("Enc", (), {"encode": lambda self, s: llm.tokenizer.encode(s, add_special_tokens=False)})()
        hay = Haystack(_prompts(llm, [5000])[0])
        rng = random.Random(7)
        samples = [make_sample("passkey", enc, hay, rng, 2048, d) for d in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]
        outs = llm.generate([{"prompt_token_ids": s.prompt_ids} for s in samples],
                            SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    correct = sum(is_correct(s, o.outputs[0].text) for s, o in zip(samples, outs))
    assert correct >= 5, [o.outputs[0].text for o in outs]


@pytest.mark.parametrize("name", ["ferry-tiny-moe", "ferry-tiny-draft"])
def test_training_loop_smoke(name, tmp_path):
    from modelkit.train import train

    summary = train(name, tmp_path / name, smoke=True, threads=1)
    assert summary["steps"] == 20 and summary["log"][-1]["step"] == 20
    assert summary["log"][-1]["text_loss"] < summary["log"][0]["text_loss"] + 0.5  # not diverging
    with LLM(str(tmp_path / name), dtype="float32") as llm:
        prompts = _prompts(llm, [9, 30])
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    ref, _ = hf_greedy(tmp_path / name, prompts, 5)
    assert [o.outputs[0].token_ids for o in outs] == ref
