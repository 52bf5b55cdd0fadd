"""A request resumed from the tokens it produced elsewhere (Resume: an instance died, or handed it over) gives the
output an uninterrupted run gives: the same tokens, text and logprobs, greedy and seeded sampling with penalties,
wherever it was cut; bad carry-overs are refused; no KV block is left behind."""
from __future__ import annotations

from pathlib import Path

import pytest

from ferry import LLM, SamplingParams
from ferry.engine.resume import Resume
from ferry.errors import InvalidRequest

TINY = Path(__file__).resolve().parents[2] / "ferry" / "assets" / "ferry-tiny"
PROMPT = "Lily and Tom went to the park. They saw a big dog"


@pytest.fixture(scope="module")
def tiny():
    return LLM(str(TINY), dtype="float32", kv_cache_memory="16M", threads=1)


def _run_resumed(llm: LLM, rid: str, params: SamplingParams, resume: Resume):
    eng = llm.engine
    eng.add_processed(rid, eng.inputs.process(PROMPT, params), resume=resume)
    final = None
    while final is None:
        final = next((o for o in eng.step() if o.request_id == rid and o.finished), None)
    return final.outputs[0]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=50, presence_penalty=0.4, frequency_penalty=0.2, seed=7, max_tokens=24,
                   ignore_eos=True, min_tokens=20),
    SamplingParams(temperature=0.8, seed=11, max_tokens=20, logprobs=2, ignore_eos=True),
], ids=["greedy", "seeded-penalties", "seeded-logprobs"])
def test_resumed_output_is_the_uninterrupted_output(tiny, params):
    full = tiny.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    assert len(full.token_ids) == params.max_tokens
    for cut in (1, len(full.token_ids) // 2, len(full.token_ids) - 1):
        carried = Resume(list(full.token_ids[:cut]), full.logprobs[:cut] if full.logprobs is not None else None)
        out = _run_resumed(tiny, f"resume-{cut}", params, carried)
        assert out.token_ids == full.token_ids, cut
        assert out.text == full.text, cut
        if full.logprobs is not None:
            assert [(l.token_id, round(l.logprob, 4)) for l in out.logprobs] == \
                   [(l.token_id, round(l.logprob, 4)) for l in full.logprobs]
    assert tiny.view().num_kv_blocks_used == 0


def test_a_stop_string_past_the_cut_still_stops(tiny):
    params = SamplingParams(temperature=0, max_tokens=40)
    full = tiny.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    stop = full.text[len(full.text) // 2:][:6]
    stopped = tiny.generate(PROMPT, SamplingParams(temperature=0, max_tokens=40, stop=[stop]), use_tqdm=False)[0]
    ref = stopped.outputs[0]
    out = _run_resumed(tiny, "resume-stop", SamplingParams(temperature=0, max_tokens=40, stop=[stop]),
                       Resume(list(ref.token_ids[:2])))
    assert (out.text, out.finish_reason, out.stop_reason) == (ref.text, "stop", stop)


def test_carry_overs_that_cannot_continue_are_refused(tiny):
    eng = tiny.engine
    cases = [(SamplingParams(n=2, temperature=0.5, max_tokens=4), Resume([5]), "n=1"),
             (SamplingParams(max_tokens=3), Resume([5, 6, 7]), "nothing is left"),
             (SamplingParams(max_tokens=8, logprobs=1), Resume([5, 6]), "one per output token")]
    for i, (params, resume, message) in enumerate(cases):
        with pytest.raises(InvalidRequest, match=message):
            eng.add_processed(f"bad-{i}", eng.inputs.process(PROMPT, params), resume=resume)
    assert tiny.view().num_kv_blocks_used == 0 and not tiny.view().running
