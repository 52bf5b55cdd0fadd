"""Live migration between two engines in one process (no Ray): a request moved in the middle of its decoding, in
stages (full blocks while it keeps decoding, then a stop-and-copy of the rest), gives the output it would have had
without moving (greedy, seeded sampling with penalties, logprobs; dense and MoE), while the source batches it with
another request; a migration called off at any stage leaves the request running on the source with the same
output, and no KV block is left behind on either side."""
from __future__ import annotations

from pathlib import Path

import pytest

from ferry import LLM, SamplingParams
from ferry.engine.migration import MigrationFailed

ASSETS = Path(__file__).resolve().parents[2] / "ferry" / "assets"
PROMPT = "Lily and Tom went to the park. They saw a big dog. The dog was brown and it ran to them. Lily was"
OTHER = "Once upon a time there was a little girl"
PARAMS = [
    SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.9, top_k=50, presence_penalty=0.4, frequency_penalty=0.2, seed=7, max_tokens=40,
                   ignore_eos=True, min_tokens=30),
    SamplingParams(temperature=0.8, seed=11, max_tokens=36, logprobs=2, ignore_eos=True),
]
IDS = ["greedy", "seeded-penalties", "seeded-logprobs"]


def _pair(model: str) -> tuple[LLM, LLM]:
    return tuple(LLM(str(ASSETS / model), dtype="float32", kv_cache_memory="16M", threads=1) for _ in range(2))


@pytest.fixture(scope="module")
def dense():
    return _pair("ferry-tiny")


def _steps(llm: LLM, n: int, finals: dict) -> None:
    for _ in range(n):
        for out in llm.engine.step():
            if out.finished:
                finals[out.request_id] = out


def _finish(llm: LLM, finals: dict) -> None:
    while llm.engine.has_unfinished():
        _steps(llm, 1, finals)


def _start(llm: LLM, finals: dict, params: SamplingParams) -> None:
    eng = llm.engine
    eng.add_processed("moving", eng.inputs.process(PROMPT, params))
    eng.add_processed("staying", eng.inputs.process(OTHER, SamplingParams(temperature=0, max_tokens=50,
                                                                           ignore_eos=True)))
    _steps(llm, 3, finals)  # the prompt and a couple of tokens


def _check_same(out, full) -> None:
    assert out.token_ids == full.token_ids
    assert out.text == full.text
    if full.logprobs is not None:
        assert [(l.token_id, round(l.logprob, 4)) for l in out.logprobs] == \
               [(l.token_id, round(l.logprob, 4)) for l in full.logprobs]


def _migrate(src: LLM, dst: LLM, finals: dict) -> None:
    """Two stages while the source decodes, then the stop-and-copy."""
    first = dst.engine.migration.receive("moving", src.engine.migration.export_full("moving", 0))
    _steps(src, 12, finals)
    held = dst.engine.migration.receive("moving", src.engine.migration.export_full("moving", first))
    assert 0 < first < held  # each stage copied full blocks (38 prompt tokens, blocks of 16)
    _steps(src, 2, finals)
    dst.engine.migration.adopt("moving", src.engine.migration.suspend("moving", held))
    src.engine.migration.release("moving")


@pytest.mark.parametrize("params", PARAMS, ids=IDS)
def test_migrated_output_is_the_unmigrated_output(dense, params):
    src, dst = dense
    full = src.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    finals: dict = {}
    _start(src, finals, params)
    _migrate(src, dst, finals)
    assert "moving" not in finals and [r.req_id for r in dst.view().running] == ["moving"]
    _finish(dst, finals)
    _finish(src, finals)
    _check_same(finals["moving"].outputs[0], full)
    assert finals["staying"].outputs[0].token_ids == src.generate(
        OTHER, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert src.view().num_kv_blocks_used == 0 and dst.view().num_kv_blocks_used == 0


def test_moe_migrates_exactly():
    src, dst = _pair("ferry-tiny-moe")
    params = PARAMS[1]
    full = src.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    finals: dict = {}
    _start(src, finals, params)
    _migrate(src, dst, finals)
    _finish(dst, finals)
    _finish(src, finals)
    _check_same(finals["moving"].outputs[0], full)
    assert src.view().num_kv_blocks_used == 0 and dst.view().num_kv_blocks_used == 0


class _Broken(RuntimeError):
    pass


@pytest.mark.parametrize("fail_at", ["stage", "stop-and-copy"])
def test_a_failing_destination_leaves_the_request_on_the_source(dense, monkeypatch, fail_at):
    src, dst = dense
    params = PARAMS[1]
    full = src.generate(PROMPT, params, use_tqdm=False)[0].outputs[0]
    finals: dict = {}
    _start(src, finals, params)
    held = dst.engine.migration.receive("moving", src.engine.migration.export_full("moving", 0))
    assert held > 0 and dst.view().num_kv_blocks_used == held  # reserved before the first write
    _steps(src, 4, finals)

    def broken(*args, **kwargs):
        raise _Broken("injected failure on the destination")

    if fail_at == "stage":
        with monkeypatch.context() as m:
            m.setattr(dst.engine.migration, "receive", broken)
            with pytest.raises(_Broken):
                dst.engine.migration.receive("moving", src.engine.migration.export_full("moving", held))
    else:
        handover = src.engine.migration.suspend("moving", held)
        _steps(src, 2, finals)  # the suspended request does not move meanwhile
        assert "moving" not in [r.req_id for r in src.view().running]
        with monkeypatch.context() as m:
            m.setattr(dst.engine.migration, "_adopt", broken)
            with pytest.raises(_Broken):
                dst.engine.migration.adopt("moving", handover)
        assert src.engine.migration.unsuspend("moving")
    dst.engine.migration.cancel("moving")  # what the front end does on any failure
    assert dst.view().num_kv_blocks_used == 0
    _finish(src, finals)
    _check_same(finals["moving"].outputs[0], full)
    assert src.view().num_kv_blocks_used == 0 and not dst.engine.has_unfinished()


def test_what_cannot_migrate_is_refused(dense):
    src, dst = dense
    eng = src.engine
    with pytest.raises(MigrationFailed, match="not running"):
        eng.migration.export_full("nobody", 0)
    eng.add_processed("two", eng.inputs.process(PROMPT, SamplingParams(n=2, temperature=0.5, max_tokens=8)))
    _steps(src, 2, {})
    with pytest.raises(MigrationFailed, match="n=1"):
        eng.migration.export_full("two#0", 0)
    _finish(src, {})
    # a destination without room refuses before writing anything
    eng.add_processed("big", eng.inputs.process(PROMPT, SamplingParams(temperature=0, max_tokens=8)))
    _steps(src, 2, {})
    blocks = eng.migration.export_full("big", 0)
    num_free = dst.view().num_kv_blocks - dst.view().num_kv_blocks_used
    hog = dst.engine.migration.receive("hog", type(blocks)(0, num_free - blocks.num_blocks + 1, {
        k: v[..., :1, :, :, :].expand(*v.shape[:-4], num_free - blocks.num_blocks + 1, *v.shape[-3:]).clone()
        for k, v in blocks.data.items()}))
    with pytest.raises(MigrationFailed, match="free KV blocks"):
        dst.engine.migration.receive("big", blocks)
    dst.engine.migration.cancel("hog")
    dst.engine.migration.cancel("big")
    assert hog > 0 and dst.view().num_kv_blocks_used == 0
    _finish(src, {})
    assert src.view().num_kv_blocks_used == 0
