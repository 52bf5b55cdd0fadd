"""`--speculative-method route` (R2R, lossy) end to end on the in-house pair (ferry-tiny large, ferry-tiny-draft
small): its two exact endpoints (threshold 0: the large model's greedy output; 1: the small model's), at batch 1
and 4, with chunked prefill and forced preemption; that a token the router sends to the large model is the large
model's greedy token; that each request routes on its own in a batch; that both models' KV is given back; and that
bad settings are refused clearly. Exactness holds where ferry's kernels are batch-invariant (see
test_speculative.py)."""
from __future__ import annotations

import json
import pathlib
import re

import pytest

from ferry import LLM, SamplingParams
from ferry.errors import InvalidRequest
from ferry.ops import gemv

TINY = pathlib.Path(__file__).resolve().parents[2] / "ferry" / "assets" / "ferry-tiny"
SMALL = TINY.parent / "ferry-tiny-draft"
TEXT = (TINY.parent / "heldout.txt").read_text()
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)

pytestmark = pytest.mark.skipif(not gemv.available(), reason="exactness is claimed only where ferry/ops/gemv runs")


def prompts(n: int) -> list[str]:
    """Continuation prompts of mixed lengths from held-out text."""
    return [TEXT[i * 331:i * 331 + 120 + (i * 97) % 300] for i in range(n)]


def outputs(llm: LLM, ps: list[str], params: SamplingParams = GREEDY) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(ps, params, use_tqdm=False)]


def route(threshold: float, **kw) -> LLM:
    opts = dict(kv_cache_memory="32M", enable_prefix_caching=False, speculative_method="route",
                speculative_model=str(SMALL), route_threshold=threshold)
    return LLM(str(TINY), **{**opts, **kw})


@pytest.fixture(scope="module")
def large():
    return LLM(str(TINY), kv_cache_memory="32M", enable_prefix_caching=False)


@pytest.fixture(scope="module")
def small():
    return LLM(str(SMALL), kv_cache_memory="32M", enable_prefix_caching=False)


def assert_released(llm: LLM) -> None:
    v = llm.view()
    assert v.num_kv_blocks_used == 0 and not v.running
    assert v.speculative["draft_kv_blocks_used"] == 0 and v.speculative["draft_sequences"] == 0


@pytest.mark.parametrize("batch", [1, 4])
def test_threshold_0_is_the_large_models_greedy_output(large, batch):
    llm = route(0.0)
    assert outputs(llm, prompts(batch)) == outputs(large, prompts(batch))
    s = llm.view().speculative
    assert s["num_small_tokens"] == 0 and s["large_fraction"] == 1.0
    assert_released(llm)


def alone(llm: LLM, ps: list[str]) -> list[list[int]]:
    """Each prompt's output run by itself (the small model computes each prompt alone in route mode)."""
    return [outputs(llm, [p])[0] for p in ps]


@pytest.mark.parametrize("batch", [1, 4])
def test_threshold_1_is_the_small_models_greedy_output(small, batch):
    llm = route(1.0)
    assert outputs(llm, prompts(batch)) == alone(small, prompts(batch))
    s = llm.view().speculative
    assert s["num_large_tokens"] == 0 and s["num_small_tokens"] == batch * GREEDY.max_tokens
    assert_released(llm)


@pytest.mark.parametrize("kw", [dict(max_num_batched_tokens=48),  # chunked prefill
                                dict(kv_cache_memory="320K", block_size=8, max_num_batched_tokens=64),
                                dict(kv_cache_memory="320K", block_size=8, max_num_batched_tokens=64,
                                     preemption_mode="swap", swap_space="4M")])
def test_endpoints_hold_with_chunked_prefill_and_preemption(small, kw):
    """Threshold 0 leaves the large model's schedule as it is: the output of the large model with the same
    options. Threshold 1 gives each request the small model's own output, however the target's steps fell
    (chunked prefill); under a KV budget this tight the small model's own KV (a quarter of it) cannot hold every
    request, and a request it has no room for is routed: its tokens are the large model's, so there only the
    run itself (complete outputs, every block given back) is checked."""
    ps = prompts(4)
    opts = dict(kv_cache_memory="32M", enable_prefix_caching=False)
    large = LLM(str(TINY), **{**opts, **kw})
    llm = route(0.0, **kw)
    assert outputs(llm, ps) == outputs(large, ps)
    assert_released(llm)
    llm = route(1.0, **kw)
    got = outputs(llm, ps)
    if "kv_cache_memory" in kw:
        assert llm.view().num_preemptions > 0 and all(len(o) == GREEDY.max_tokens for o in got)
    else:
        assert got == alone(small, ps)
    assert_released(llm)


def teacher_forced(llm: LLM, prompt_ids: list[int], out: list[int], k: int) -> list:
    """llm's top-k logprobs before each token of out (TokenLogprob per token, its .top best first)."""
    scored = llm.generate([{"prompt_token_ids": prompt_ids + out}],
                          SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k), use_tqdm=False)[0]
    return scored.prompt_logprobs[len(prompt_ids):]


@pytest.mark.parametrize("batch", [1, 4])
def test_a_routed_token_is_the_large_models_greedy_token(large, small, batch):
    """Replays the router on the output: wherever the small model's distribution (teacher-forced on the output)
    scores at least the threshold, the token is the large model's greedy token after that prefix; elsewhere it is
    the small model's (or the large model's, in a step with no room for a small-model run)."""
    from ferry.speculative.route import TOP_K, Router, features
    threshold, router, enc = 0.6, Router(), large.tokenizer.encode
    llm = route(threshold)
    ps = prompts(batch)
    routed = kept = 0
    for p, out in zip(ps, outputs(llm, ps)):
        for token, lp_s, lp_l in zip(out, teacher_forced(small, enc(p), out, TOP_K),
                                     teacher_forced(large, enc(p), out, 1)):
            score = router.score(features([lp for _, lp in lp_s.top]))
            if abs(score - threshold) < 1e-3:  # decode and teacher-forced logits may round apart here
                continue
            if score >= threshold:
                assert token == lp_l.top[0][0]
                routed += 1
            else:
                assert token in (lp_s.top[0][0], lp_l.top[0][0])
                kept += token == lp_s.top[0][0] != lp_l.top[0][0]
    assert routed > 0 and kept > 0  # both models made tokens, and the small model's differ somewhere: lossy
    assert_released(llm)


def test_requests_route_alone_in_a_batch():
    """A request's routing reads only its own tokens: its output in a batch of 4 is its output alone."""
    ps = prompts(4)
    llm = route(0.6)
    together = outputs(llm, ps)
    s = llm.view().speculative
    assert s["num_small_tokens"] > 0 and s["num_large_tokens"] > 0
    assert together == alone(llm, ps)
    assert_released(llm)


def test_sampled_requests_decode_with_the_large_model_alone(large):
    """Route runs only for greedy requests; a seeded sampled one is the large model's own sampled output."""
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=7, ignore_eos=True)
    assert outputs(route(1.0), prompts(2), params) == outputs(large, prompts(2), params)


def test_bad_route_settings_are_refused_clearly(tmp_path):
    cases = [
        (dict(speculative_method="route"), "needs speculative_model"),
        (dict(route_threshold=0.3), "needs speculative_method"),
        (dict(speculative_method="ngram", route_threshold=0.3), "is for speculative_method=route"),
        (dict(speculative_method="route", speculative_model=str(SMALL), route_threshold=1.5), "must be in [0, 1]"),
        (dict(speculative_method="route", speculative_model=str(SMALL), prompt_lookup_max=7), "ngram or phrase"),
        (dict(speculative_method="route", speculative_model=str(SMALL), kv_policy="lazy"), "cannot take back"),
    ]
    for kw, message in cases:
        with pytest.raises(InvalidRequest, match=re.escape(message)):
            LLM(str(TINY), kv_cache_memory="32M", **kw)
    bad = tmp_path / "router.json"
    bad.write_text(json.dumps({"kind": "logistic", "weights": [1.0], "bias": 0.0, "mean": [0.0], "std": [1.0]}))
    with pytest.raises(InvalidRequest, match="is not a router file"):
        route(0.5, route_router=str(bad))
    with pytest.raises(InvalidRequest, match="cannot read route_router"):
        route(0.5, route_router=str(tmp_path / "missing.json"))
