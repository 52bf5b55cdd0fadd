"""The committed in-house models (ferry/assets/, made by modelkit/): they load in ferry and in transformers and
agree token for token, and ferry-tiny retrieves a passkey from 512- and 4096-token contexts at least 10 times in 12."""
from __future__ import annotations

import random

import pytest

from ferry import LLM, SamplingParams
from ferry.default_model import ASSETS, INHOUSE, inhouse_path
from ferry.eval.tasks import Haystack, is_correct, make_sample
from tests.checkpoints import hf_greedy


def _heldout_ids(llm: LLM, chars: int = 20000) -> list[int]:
    return llm.tokenizer.encode((ASSETS / "heldout.txt").read_text()[:chars], add_special_tokens=False)


@pytest.mark.parametrize("name", INHOUSE)
def test_inhouse_model_matches_transformers(name):
    path = inhouse_path(name)
    with LLM(str(path), dtype="float32") as llm:
        ids = _heldout_ids(llm)
        prompts = [ids[i * 300:i * 300 + n] for i, n in enumerate([5, 17, 40, 64, 100, 130])]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    ref, _ = hf_greedy(path, prompts, 12)
    assert [o.outputs[0].token_ids for o in outs] == ref


@pytest.mark.parametrize("length", [512, 4096])
def test_ferry_tiny_retrieves_a_passkey(length):
    with LLM(str(inhouse_path("ferry-tiny")), dtype="float32") as llm:
        enc = type("Enc", (), {"encode": lambda self, s: llm.tokenizer.encode(s, add_special_tokens=False)})()
        hay = Haystack(_heldout_ids(llm, 60000))
        rng = random.Random(7)
        samples = [make_sample("passkey", enc, hay, rng, length, d) for d in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) * 2]
        outs = llm.generate([{"prompt_token_ids": s.prompt_ids} for s in samples],
                            SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    correct = sum(is_correct(s, o.outputs[0].text) for s, o in zip(samples, outs))
    assert correct >= 10, [o.outputs[0].text for o in outs]  # measured by ferry eval: 97.5-100% at 4096 tokens
