"""Speculative decoding with sampling, end to end on the in-house pair (ferry-tiny, drafted for by ferry-tiny-draft):
seeded requests give the same tokens with every method at both dtypes, and unseeded requests keep the target's
distribution (chi-square over many samples, against the target's own next-token probabilities, with a power check
against the draft's distribution that a wrong acceptance rule would drift to)."""
from __future__ import annotations

import collections
import math

import pytest

from ferry import LLM, SamplingParams
from ferry.ops import gemv
from tests.engine.test_speculative import DRAFT, TEXT, TINY, grounded_prompts

pytestmark = pytest.mark.skipif(not gemv.available(), reason="exactness is claimed only where ferry/ops/gemv runs")

METHODS = {"ngram": {}, "phrase": {}, "draft": {"speculative_model": str(DRAFT)}}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_seeded_sampling_gives_the_same_tokens_with_every_method(dtype):
    prompts = grounded_prompts(4)
    params = [SamplingParams(max_tokens=12 + 9 * i, temperature=0.6, top_p=0.95, top_k=50, seed=10 + i,
                             ignore_eos=True) for i in range(4)]
    plain = LLM(str(TINY), dtype=dtype, kv_cache_memory="32M", enable_prefix_caching=False)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    for method, extra in METHODS.items():
        spec = LLM(str(TINY), dtype=dtype, kv_cache_memory="32M", enable_prefix_caching=False,
                   speculative_method=method, num_speculative_tokens=3, **extra)
        got = [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)]
        assert got == want, method
        stats = spec.view().speculative
        assert stats["num_draft_tokens"] > 0 and stats["num_accepted_tokens"] > 0, (method, stats)


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """The chi-square quantile at 1 - 0.001 (z: the normal quantile), Wilson-Hilferty: within 1% for dof >= 3."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def next_token_probs(llm: LLM, prompt_ids: list[int], top: int = 20) -> dict[int, float]:
    """The model's next-token probabilities after prompt_ids (its `top` likeliest tokens; raw logprobs)."""
    out = llm.generate({"prompt_token_ids": prompt_ids}, SamplingParams(max_tokens=1, temperature=0, logprobs=top),
                       use_tqdm=False)[0].outputs[0]
    return {t: math.exp(lp) for t, lp in out.logprobs[0].top}


def chi_square_by_context(samples: dict[int, collections.Counter], probs: dict[int, dict[int, float]]
                          ) -> tuple[float, int]:
    """Pearson's statistic summed over contexts (the token before), and its degrees of freedom: tokens expected at
    least 5 times get a bin each, the rest share one."""
    stat, dof = 0.0, 0
    for ctx, counts in samples.items():
        n = sum(counts.values())
        p = probs[ctx]
        bins = [t for t in p if p[t] * n >= 5]
        rest = 1.0 - sum(p[t] for t in bins)
        observed = [counts[t] for t in bins] + [n - sum(counts[t] for t in bins)]
        expected = [p[t] * n for t in bins] + [rest * n]
        stat += sum((o - e) ** 2 / e for o, e in zip(observed, expected) if e > 0)
        dof += len(bins)  # len(bins) + 1 cells, one constraint
    return stat, dof


def test_unseeded_sampling_keeps_the_targets_distribution():
    """Many unseeded requests of 3 tokens: the 2nd token is drafted for (the draft model's greedy guess) and then
    verified, so its distribution given the 1st must be the target's own (rejection sampling); a fixed engine seed
    makes the draws, and so the test, deterministic."""
    prompt = TEXT[1000:1200]
    spec = LLM(str(TINY), dtype="float32", kv_cache_memory="32M", seed=7, max_num_seqs=8,
               speculative_method="draft", speculative_model=str(DRAFT), num_speculative_tokens=1)
    params = SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True)
    outs = spec.generate([prompt] * 3000, params, use_tqdm=False)
    prompt_ids = outs[0].prompt_token_ids
    by_first = collections.defaultdict(collections.Counter)
    for o in outs:
        first, second = o.outputs[0].token_ids[:2]
        by_first[first][second] += 1
    stats = spec.view().speculative
    rejected = stats["num_draft_tokens"] - stats["num_accepted_tokens"]
    assert stats["num_accepted_tokens"] >= 200 and rejected >= 200, stats  # both paths of the rule ran many times
    common = {t: c for t, c in by_first.items() if sum(c.values()) >= 200}  # contexts with enough samples
    assert sum(sum(c.values()) for c in common.values()) >= 1500, {t: sum(c.values()) for t, c in by_first.items()}
    target = LLM(str(TINY), dtype="float32", kv_cache_memory="32M")
    want = {t: next_token_probs(target, prompt_ids + [t]) for t in common}
    stat, dof = chi_square_by_context(common, want)
    assert stat < chi2_critical(dof), (stat, dof)
    # the test can tell: the draft's distribution (where a rule that trusts drafts would drift) is rejected
    draft = LLM(str(DRAFT), dtype="float32", kv_cache_memory="32M")
    wrong = {t: next_token_probs(draft, prompt_ids + [t]) for t in common}
    wrong_stat, wrong_dof = chi_square_by_context(common, wrong)
    assert wrong_stat > 4 * chi2_critical(wrong_dof), (wrong_stat, wrong_dof)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_requests_with_logprobs_are_drafted_for_and_get_the_logprobs_without_speculation(dtype):
    """Each verified row's logprobs are the ones its one-token decode step gives (the same logits, bit for bit):
    the accepted tokens' logprobs, top ones included, equal those without speculation."""
    prompts = grounded_prompts(4)
    params = [SamplingParams(max_tokens=14 + 8 * i, temperature=0, logprobs=3, ignore_eos=True) for i in range(2)] + \
        [SamplingParams(max_tokens=20 + 8 * i, temperature=0.6, seed=5 + i, logprobs=2, ignore_eos=True)
         for i in range(2)]
    plain = LLM(str(TINY), dtype=dtype, kv_cache_memory="32M", enable_prefix_caching=False)
    want = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in plain.generate(prompts, params, use_tqdm=False)]
    for method, extra in METHODS.items():
        spec = LLM(str(TINY), dtype=dtype, kv_cache_memory="32M", enable_prefix_caching=False,
                   speculative_method=method, num_speculative_tokens=3, **extra)
        got = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in spec.generate(prompts, params, use_tqdm=False)]
        assert all(len(lps) == len(ids) for ids, lps in got), method
        assert got == want, method
        assert spec.view().speculative["num_accepted_tokens"] > 0, method
