"""The training kit (modelkit/): a 20-step smoke run of the training loop (not training) whose exported
checkpoint loads in ferry and in transformers and gives the same greedy tokens."""
from __future__ import annotations

import pytest

from ferry import LLM, SamplingParams
from tests.checkpoints import hf_greedy


@pytest.mark.parametrize("name", ["ferry-tiny", "ferry-tiny-moe", "ferry-tiny-draft"])
def test_training_loop_smoke(name, tmp_path):
    from modelkit.train import train

    summary = train(name, tmp_path / name, smoke=True, threads=1)
    assert summary["steps"] == 20 and [r["step"] for r in summary["log"]] == [10, 20]
    assert all(r["loss"] == r["loss"] for r in summary["log"])  # no NaN
    with LLM(str(tmp_path / name), dtype="float32") as llm:
        text = "The os module provides a portable way of using operating system dependent functionality."
        prompts = [llm.tokenizer.encode(text, add_special_tokens=False)[:n] for n in (3, 12)]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    ref, _ = hf_greedy(tmp_path / name, prompts, 5)
    assert [o.outputs[0].token_ids for o in outs] == ref
