"""Speculative decoding end to end, the cases outside the matrix: stop strings, the int8 KV policy, `auto` draft
length, a draft model on open-ended text, random target/draft pairs, the expert store under a budget, and bad
settings refused clearly. The matrix (every method x float32/bfloat16 x batches 1/4/16, chunked prefill, both
preemption modes, prefix hits, MoE) is test_speculative_matrix.py; sampling (seeded, unseeded distribution,
logprobs) is test_speculative_sampling.py.

These run where the CPU kernels are batch-invariant (ferry/ops/gemv for <= 16 rows, and the paged
decode attention): there each verification row computes the bits of a one-row decode step. Where the kernel
cannot be built (no compiler) exactness is not claimed: bench/speculative.py measures the agreement rate."""
from __future__ import annotations

import pathlib

import pytest

from ferry import LLM, SamplingParams
from ferry.errors import InvalidRequest
from ferry.ops import gemv
from tests.checkpoints import make_checkpoint

TINY = pathlib.Path(__file__).resolve().parents[2] / "ferry" / "assets" / "ferry-tiny"
DRAFT = TINY.parent / "ferry-tiny-draft"
TEXT = (TINY.parent / "heldout.txt").read_text()

pytestmark = pytest.mark.skipif(not gemv.available(), reason="exactness is claimed only where ferry/ops/gemv runs "
                                "(AVX-512); bench/speculative.py measures the agreement rate elsewhere")


def grounded_prompts(n: int, length: int = 500) -> list[str]:
    """Input-grounded prompts of mixed lengths: a passage, then its start again (the continuation repeats it)."""
    out = []
    for i in range(n):
        size = length // 2 + (i * 97) % length
        passage = TEXT[i * 211:i * 211 + size]
        out.append(passage + "\n\n" + passage[:size // 3])
    return out


def outputs(llm: LLM, prompts: list[str], params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def base():
    """The reference without speculation. No prefix cache: a prompt seen by an earlier test would start from cached
    KV, a different (equally valid) computation of its first tokens than the fresh engines compared with it."""
    return LLM(str(TINY), kv_cache_memory="32M", enable_prefix_caching=False)


GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


def test_stop_strings_end_the_output_where_they_would_without_speculation(base):
    prompts = grounded_prompts(2)
    full = base.generate(prompts, GREEDY, use_tqdm=False)
    stops = [o.outputs[0].text[len(o.outputs[0].text) // 2:][:6] for o in full]  # a string from each output
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=stops)
    spec = LLM(str(TINY), kv_cache_memory="32M", speculative_method="ngram", num_speculative_tokens=4)
    want = [(o.outputs[0].text, o.outputs[0].token_ids) for o in base.generate(prompts, params, use_tqdm=False)]
    got = [(o.outputs[0].text, o.outputs[0].token_ids) for o in spec.generate(prompts, params, use_tqdm=False)]
    assert got == want and all(len(ids) < 40 for _, ids in got)


def test_int8_kv_policy_is_token_exact():
    prompts = grounded_prompts(3)
    plain = LLM(str(TINY), kv_cache_memory="32M", kv_policy="int8")
    spec = LLM(str(TINY), kv_cache_memory="32M", kv_policy="int8", speculative_method="ngram",
               num_speculative_tokens=4)
    assert outputs(spec, prompts, GREEDY) == outputs(plain, prompts, GREEDY)
    assert spec.view().speculative["num_accepted_tokens"] > 0


def test_auto_draft_length_is_token_exact(base):
    prompts = grounded_prompts(3)
    spec = LLM(str(TINY), kv_cache_memory="32M", speculative_method="phrase")
    assert outputs(spec, prompts, GREEDY) == outputs(base, prompts, GREEDY)
    assert spec.view().speculative["num_draft_tokens"] > 0


def test_draft_model_is_token_exact(base):
    prompts = [TEXT[i * 300:i * 300 + 200] for i in range(3)]  # open-ended continuation
    spec = LLM(str(TINY), kv_cache_memory="32M", speculative_method="draft", speculative_model=str(DRAFT),
               num_speculative_tokens=3)
    assert outputs(spec, prompts, GREEDY) == outputs(base, prompts, GREEDY)
    stats = spec.view().speculative
    assert stats["method"] == "draft" and stats["num_accepted_tokens"] > 0


def test_random_target_and_random_draft_float32(tmp_ckpt_dir):
    target = make_checkpoint("llama", tmp_ckpt_dir)
    draft = make_checkpoint("llama", tmp_ckpt_dir, seed=1)
    prompts = [[1] + list(range(5 + i, 40 + 3 * i)) for i in range(2)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = LLM(str(target), dtype="float32", kv_cache_memory="4M")
    for d in (draft, target):  # a draft that is the target itself: every draft verified, all rows used
        spec = LLM(str(target), dtype="float32", kv_cache_memory="4M", speculative_method="draft",
                   speculative_model=str(d), num_speculative_tokens=3)
        got = [o.outputs[0].token_ids for o in spec.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                               use_tqdm=False)]
        want = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                 use_tqdm=False)]
        assert got == want
        assert spec.view().num_kv_blocks_used == 0
    assert spec.view().speculative["acceptance_rate"] == 1.0  # the target drafting for itself


def test_moe_with_an_expert_store_under_a_budget_is_token_exact(tmp_ckpt_dir):
    from tests.expert_stores import make_store
    ckpt, store = make_store("qwen2_moe", tmp_ckpt_dir)
    prompts = [{"prompt_token_ids": [1] + list(range(10 + i, 50 + 7 * i))} for i in range(2)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    opts = dict(dtype="float32", kv_cache_memory="4M", expert_store=str(store), expert_cache_memory="64K")
    plain = LLM(str(ckpt), **opts)
    spec = LLM(str(ckpt), speculative_method="draft", speculative_model=str(ckpt), num_speculative_tokens=3, **opts)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)] == \
        [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert spec.view().speculative["num_accepted_tokens"] > 0


def test_bad_settings_are_refused_with_what_to_do(tmp_ckpt_dir):
    with pytest.raises(InvalidRequest, match="kv-policy lazy cannot take back"):
        LLM(str(TINY), kv_policy="lazy", speculative_method="ngram")
    with pytest.raises(InvalidRequest, match="needs speculative_model"):
        LLM(str(TINY), speculative_method="draft")
    with pytest.raises(InvalidRequest, match="needs speculative_method"):
        LLM(str(TINY), num_speculative_tokens=3)
    with pytest.raises(InvalidRequest, match="auto or 1..16"):
        LLM(str(TINY), speculative_method="ngram", num_speculative_tokens=0)
    other = make_checkpoint("qwen2", tmp_ckpt_dir)  # a byte-level tokenizer: another vocabulary
    with pytest.raises(InvalidRequest, match="different vocabulary"):
        LLM(str(TINY), speculative_method="draft", speculative_model=str(other))
