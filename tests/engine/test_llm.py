"""The Python API end to end: real checkpoints, sampling features, bad input, streaming, asyncio."""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.engine.async_engine import AsyncLLM
from ferry.errors import ContextLengthExceeded, InvalidRequest, ModelLoadError
from tests.checkpoints import hf_greedy, random_prompts


def greedy(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, **kw)


def test_stories260k_reproduces_reference_text(real_models):
    """A real trained checkpoint: greedy output equals the reference recorded with transformers."""
    llm = LLM(str(real_models / "stories260k-hf"))
    out = llm.generate("Once upon a time", greedy(max_tokens=64), use_tqdm=False)[0]
    ref = (real_models / "stories260k-verification.txt").read_text().split("===\n")[1]
    assert out.prompt_token_ids == [1, 403, 407, 261, 378]
    assert "Once upon a time" + out.outputs[0].text == ref.rstrip("\n")


def test_accepts_text_token_ids_and_dicts(llm):
    ids = llm.tokenizer.encode("Lily walked to the harbor")
    outs = llm.generate(["Lily walked to the harbor", {"prompt_token_ids": ids}, {"prompt": "Lily walked to the harbor"}],
                        greedy(max_tokens=6), use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert outs[0].outputs[0].text == llm.tokenizer.decode(outs[0].outputs[0].token_ids) or \
        outs[0].outputs[0].text.strip() == llm.tokenizer.decode(outs[0].outputs[0].token_ids).strip()


def test_seeded_sampling_is_independent_of_batch(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12)
    alone = llm.generate(["the sea"], p, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=n) for n in (3, 20, 7)]
    batch = llm.generate(["a storm came", "the sea", "Tom and Lily", "boats"], [others[0], p, others[1], others[2]],
                         use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    reordered = llm.generate(["boats", "the sea"], [others[2], p], use_tqdm=False)
    assert reordered[1].outputs[0].token_ids == alone


def test_n_completions_and_logprobs(llm):
    out = llm.generate("the old fisherman", SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, logprobs=3),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # children sample differently
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids) == 8
        for tok, lp in zip(c.token_ids, c.logprobs):
            assert lp.token_id == tok and len(lp.top) == 3
            assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= lp.top[0][1] + 1e-6


def test_greedy_logprob_matches_transformers(llm, llama):
    prompt = random_prompts(1, [12], 400, seed=9)[0]
    out = llm.generate({"prompt_token_ids": prompt}, greedy(max_tokens=4, logprobs=1, ignore_eos=True), use_tqdm=False)[0]
    tokens, logits = hf_greedy(llama, [prompt], 4)
    assert out.outputs[0].token_ids == tokens[0]
    want = torch.log_softmax(logits[0], -1).max(-1).values
    got = torch.tensor([lp.logprob for lp in out.outputs[0].logprobs])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_stop_strings_and_stop_token_ids(llm):
    base = llm.generate("Lily", greedy(max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(base.text) > 4
    stop = base.text[2:4]
    cut = llm.generate("Lily", greedy(max_tokens=20, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == base.text[:base.text.index(stop)]
    kept = llm.generate("Lily", greedy(max_tokens=20, ignore_eos=True, stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == base.text[:base.text.index(stop) + len(stop)]
    tok = base.token_ids[3]
    by_id = llm.generate("Lily", greedy(max_tokens=20, ignore_eos=True, stop_token_ids=[tok]), use_tqdm=False)[0].outputs[0]
    assert by_id.token_ids == base.token_ids[:base.token_ids.index(tok) + 1] and by_id.stop_reason == tok
    assert llm.view().kv_all_free


def test_max_tokens_finish_reason_length(llm):
    out = llm.generate("x", greedy(max_tokens=5, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_streaming_is_cumulative_and_abortable(llm):
    seen = []
    for out in llm.stream("Tom gave her a shell", greedy(max_tokens=10, ignore_eos=True)):
        seen.append(list(out.outputs[0].token_ids))
    assert [len(s) for s in seen] == list(range(1, 11)) and seen[-1][:5] == seen[4]
    it = llm.stream(["one", "two"], greedy(max_tokens=50, ignore_eos=True))
    next(it)
    it.close()  # leaving early aborts what is still running
    assert not llm.engine.has_unfinished() and llm.view().kv_all_free


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-5), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n must"), (dict(logprobs=100), "logprobs"),
    (dict(min_p=2), "min_p"), (dict(presence_penalty=5), "presence_penalty"), (dict(repetition_penalty=0), "repetition"),
    (dict(stop=[""]), "stop"), (dict(seed="x"), "seed"), (dict(temperature=float("nan")), "temperature"),
])
def test_invalid_sampling_values(bad, message):
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**bad)


def test_bad_prompts_are_refused_and_others_keep_running(llm):
    for bad, err, text in [("", InvalidRequest, "empty"), ([], InvalidRequest, "empty"),
                           ([10**9], InvalidRequest, "outside the vocabulary"), (3.5, InvalidRequest, "string or a list"),
                           ({"x": 1}, InvalidRequest, "prompt_token_ids"),
                           ([5] * 5000, ContextLengthExceeded, "context holds")]:
        with pytest.raises(err, match=text):
            llm.engine.add_request("bad", bad, greedy())
    llm.engine.add_request("good", "Lily", greedy(max_tokens=3))
    with pytest.raises(InvalidRequest, match="already in use"):
        llm.engine.add_request("good", "Tom", greedy())
    outs = []
    while llm.engine.has_unfinished():
        outs += llm.engine.step()
    assert outs[-1].request_id == "good" and outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3


def test_load_errors_say_what_is_wrong(tmp_path, llama):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    folder = tmp_path / "m"
    shutil.copytree(llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*LlamaForCausalLM"):
        LLM(str(folder))
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        LLM(str(folder))
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{bad")  # truncated header
    with pytest.raises(ModelLoadError, match="not valid safetensors"):
        LLM(str(folder))


def test_bfloat16_runs_close_to_float32(llama):
    prompts = random_prompts(4, [8, 30], 400, seed=11)
    f32 = LLM(str(llama), dtype="float32").generate([{"prompt_token_ids": p} for p in prompts],
                                                   greedy(max_tokens=6, ignore_eos=True), use_tqdm=False)
    bf16 = LLM(str(llama), dtype="bfloat16").generate([{"prompt_token_ids": p} for p in prompts],
                                                     greedy(max_tokens=6, ignore_eos=True), use_tqdm=False)
    agree = sum(a == b for x, y in zip(f32, bf16) for a, b in zip(x.outputs[0].token_ids, y.outputs[0].token_ids))
    assert agree >= 0.6 * 24  # bf16 is lossy; first tokens agree, later ones may drift


def test_async_engine_streams_and_aborts(llama):
    async def main():
        engine = AsyncLLM.from_options(str(llama), dtype="float32")
        outs = [o async for o in engine.generate("Lily", greedy(max_tokens=5, ignore_eos=True), "a")]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
        gen = engine.generate("Tom", greedy(max_tokens=500, ignore_eos=True), "b")
        await gen.__anext__()
        await gen.aclose()  # the client went away
        for _ in range(100):
            await asyncio.sleep(0.02)
            if engine.stats().num_running == 0 and engine.stats().num_kv_blocks_used == 0:
                break
        assert engine.stats().num_running == 0 and engine.stats().num_kv_blocks_used == 0
        with pytest.raises(InvalidRequest):
            async for _ in engine.generate("", greedy(), "c"):
                pass
        await engine.shutdown()
    asyncio.run(main())


def test_prompt_logprobs_match_transformers(llama):
    """prompt_logprobs scores every prompt token (through chunked prefill and a shared prefix) as transformers does."""
    from tests.checkpoints import hf_logits

    llm = LLM(str(llama), dtype="float32", kv_cache_memory="4M", max_num_batched_tokens=16)
    prompts = random_prompts(3, [40, 23, 7], vocab_size=300, seed=3)
    prompts[1] = prompts[0][:20] + prompts[1][:3]  # shares a cached prefix with prompt 0: must still be scored
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        greedy(max_tokens=2, prompt_logprobs=3), use_tqdm=False)
    for p, out in zip(prompts, outs):
        ref = torch.log_softmax(hf_logits(llama, p), dim=-1)
        lps = out.prompt_logprobs
        assert lps[0] is None and len(lps) == len(p)
        for i in range(1, len(p)):
            assert lps[i].token_id == p[i]
            assert lps[i].logprob == pytest.approx(ref[i - 1, p[i]].item(), abs=1e-4)
            assert [t for t, _ in lps[i].top] == ref[i - 1].topk(3).indices.tolist()
    assert llm.view().num_kv_blocks_used == 0


def test_prompt_logprobs_rejects_bad_values():
    with pytest.raises(ValueError, match="prompt_logprobs must be an integer"):
        SamplingParams(prompt_logprobs=-1)
