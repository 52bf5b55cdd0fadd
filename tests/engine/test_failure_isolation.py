"""A request whose step raises inside the real engine fails alone: it ends with its own error, every other request
of that step finishes with exactly the tokens it gives alone, and every KV block comes back.

Faults are injected where real ones happen, on one request only: in the forward (after the last layer, when the step's input
holds a poison token id that only the culprit's prompt holds) and in the sampler after
the step's random draws (a culprit asking for 7 logprobs), so the others' seeded draws must be replayed."""
from __future__ import annotations

import asyncio
import contextlib

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.engine.async_engine import AsyncLLM
from ferry.models.decoder import DecoderModel
from ferry.sampling.sampler import Sampler
from tests.checkpoints import random_prompts

POISON = 2  # <unk>: random_prompts never draws it


@contextlib.contextmanager
def poisoned_forward():
    """Any forward whose input ids hold POISON raises after its last layer, as a kernel failing on one request's
    input would: every layer has written its KV (and layer-budget compacted, lazy pruned and revived) by then.
    Hooked where every forward driver passes (the decoder's loop and lazy's): the embedding and the logits."""
    embed, logits, poisoned = DecoderModel.embed_tokens, DecoderModel.logits, [False]

    def embed_tokens(model: DecoderModel, input_ids: torch.Tensor) -> torch.Tensor:
        poisoned[0] = bool((input_ids == POISON).any())
        return embed(model, input_ids)

    def last(model: DecoderModel, x: torch.Tensor) -> torch.Tensor:
        if poisoned[0]:
            raise RuntimeError("poisoned token in the forward")
        return logits(model, x)
    DecoderModel.embed_tokens, DecoderModel.logits = embed_tokens, last
    try:
        yield
    finally:
        DecoderModel.embed_tokens, DecoderModel.logits = embed, logits


def good_requests() -> tuple[list[dict], list[SamplingParams]]:
    prompts = [{"prompt_token_ids": p} for p in random_prompts(4, [7, 19, 12, 30], 400, seed=21)]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=8, ignore_eos=True),  # seeded draws
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.8, seed=3, max_tokens=10, ignore_eos=True)]
    return prompts, params


def alone(llm: LLM, prompts: list[dict], params: list[SamplingParams]) -> list[list[int]]:
    return [llm.generate([p], q, use_tqdm=False)[0].outputs[0].token_ids for p, q in zip(prompts, params)]


def test_a_poisoned_prompt_fails_alone_in_a_shared_step(llm):
    prompts, params = good_requests()
    want = alone(llm, prompts, params)
    bad = {"prompt_token_ids": [1, 50, POISON, 60, 70]}
    worse = {"prompt_token_ids": [1, POISON, POISON]}
    with poisoned_forward():
        outs = llm.generate([prompts[0], bad, prompts[1], prompts[2], worse, prompts[3]],
                            [params[0], SamplingParams(max_tokens=4), params[1], params[2],
                             SamplingParams(max_tokens=4), params[3]], use_tqdm=False)
    got = [outs[i].outputs[0].token_ids for i in (0, 2, 3, 5)]
    assert got == want
    for o in (outs[1], outs[4]):
        assert o.finished and o.outputs[0].finish_reason == "error" and o.outputs[0].token_ids == []
        assert "RuntimeError: poisoned token in the forward" in o.error
    assert all(outs[i].error is None for i in (0, 2, 3, 5))
    assert not llm.engine.has_unfinished() and llm.view().kv_all_free


def test_a_culprit_arriving_mid_decode_fails_alone(llm):
    """The culprit's prefill shares a step with the others' decodes (and an n = 2 culprit fails as a whole)."""
    prompts, params = good_requests()
    want = alone(llm, prompts, params)
    engine = llm.engine
    for i, (p, q) in enumerate(zip(prompts, params)):
        engine.add_request(f"good{i}", p, q)
    outs = engine.step() + engine.step()  # everyone is decoding now
    assert all(r.decoding for r in llm.view().running)
    with poisoned_forward():
        engine.add_request("bad", {"prompt_token_ids": [1, 9, POISON]}, SamplingParams(n=2, max_tokens=3))
        while engine.has_unfinished():
            outs += engine.step()
    final = {o.request_id: o for o in outs if o.finished}
    assert [final[f"good{i}"].outputs[0].token_ids for i in range(4)] == want
    assert [c.finish_reason for c in final["bad"].outputs] == ["error", "error"] and "poisoned" in final["bad"].error
    assert llm.view().kv_all_free


def test_a_sampler_fault_after_the_draws_keeps_the_others_seeded_tokens(llm, monkeypatch):
    """The culprit raises after the step drew its random numbers: the seeded neighbours' draws are replayed, not
    drawn again, so their tokens are still the ones they give alone."""
    prompts, params = good_requests()
    want = alone(llm, prompts, params)
    fill = Sampler._fill_logprobs

    def faulty(raw, rows, reqs, tokens, out):
        if any(reqs[i].params.logprobs == 7 for i in rows):
            raise ValueError("logprobs fault")
        return fill(raw, rows, reqs, tokens, out)

    monkeypatch.setattr(Sampler, "_fill_logprobs", staticmethod(faulty))
    bad = SamplingParams(temperature=1.0, seed=5, max_tokens=6, logprobs=7)
    outs = llm.generate([prompts[1], prompts[0], prompts[3], prompts[0], prompts[2]],
                        [params[1], bad, params[3], params[0], params[2]], use_tqdm=False)
    assert [outs[i].outputs[0].token_ids for i in (3, 0, 4, 2)] == want
    assert outs[1].outputs[0].finish_reason == "error" and "ValueError: logprobs fault" in outs[1].error
    assert llm.view().kv_all_free


def test_the_async_engine_tells_the_culprits_client(llama):
    """Through AsyncLLM (the server's engine): the culprit's stream ends with its error, the others complete."""
    prompts, params = good_requests()

    async def run(engine: AsyncLLM, prompt: dict, p: SamplingParams, rid: str):
        return [o async for o in engine.generate(prompt, p, rid)][-1]

    async def main():
        engine = AsyncLLM.from_options(str(llama), dtype="float32", kv_cache_memory="4M")
        want = [(await run(engine, p, q, f"a{i}")).outputs[0].token_ids for i, (p, q) in enumerate(zip(prompts, params))]
        with poisoned_forward():
            outs = await asyncio.gather(run(engine, {"prompt_token_ids": [1, POISON]}, SamplingParams(), "bad"),
                                        *(run(engine, p, q, f"b{i}") for i, (p, q) in enumerate(zip(prompts, params))))
        await engine.shutdown()
        return want, outs

    want, outs = asyncio.run(main())
    assert outs[0].finished and outs[0].outputs[0].finish_reason == "error" and "poisoned" in outs[0].error
    assert [o.outputs[0].token_ids for o in outs[1:]] == want


@pytest.mark.parametrize("policy", ["layer-budget", "lazy"])
def test_kv_policies_that_act_in_the_forward_stay_exact(llama, policy):
    """The failing step is the others' first decode, where layer-budget compacts a request's blocks and lazy
    prunes rows: re-running it for them gives the tokens they give alone."""
    llm = LLM(str(llama), dtype="float32", kv_cache_memory="4M", kv_policy=policy, kv_budget=0.5,
              enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, [40, 70, 33], 400, seed=5)]
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    want = alone(llm, prompts, [p] * 3)
    engine = llm.engine
    for i, x in enumerate(prompts):
        engine.add_request(f"g{i}", x, p)
    outs = engine.step()  # the prompts are in: the next step is everyone's first decode
    assert all(r.decoding and r.num_output_tokens == 1 for r in llm.view().running)
    with poisoned_forward():
        engine.add_request("bad", {"prompt_token_ids": [1, POISON]}, SamplingParams(max_tokens=2))
        while engine.has_unfinished():
            outs += engine.step()
    final = {o.request_id: o for o in outs if o.finished}
    assert [final[f"g{i}"].outputs[0].token_ids for i in range(3)] == want
    assert final["bad"].outputs[0].finish_reason == "error" and llm.view().kv_all_free
