"""The server's engine (AsyncLLM) with an expert store: tokens as offline, expert stats in its snapshot, and
shutdown closes the store (reader threads stopped, cache memory released)."""
from __future__ import annotations

import asyncio

import pytest

from ferry import LLM, SamplingParams
from ferry.engine.async_engine import AsyncLLM
from tests.expert_stores import make_store


def test_async_engine_serves_from_the_store_and_closes_it(tmp_ckpt_dir):
    ckpt, folder = make_store("olmoe", tmp_ckpt_dir)
    options = dict(dtype="float32", kv_cache_memory="4M", expert_store=str(folder), expert_cache_memory="60K",
                   expert_prefetch="pregate")
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    with LLM(str(ckpt), dtype="float32", kv_cache_memory="4M") as llm:
        want = llm.generate([[1, 7, 30, 12]], params, use_tqdm=False)[0].outputs[0].token_ids

    async def run() -> tuple[list[int], AsyncLLM]:
        engine = AsyncLLM.from_options(str(ckpt), **options)
        last = None
        async for out in engine.generate({"prompt_token_ids": [1, 7, 30, 12]}, params, "r1"):
            last = out
        await asyncio.sleep(0.6)  # one more engine-loop turn, so the stats snapshot includes the request
        assert engine.stats().experts is not None and engine.stats().experts.lookups > 0
        await engine.shutdown()
        return last.outputs[0].token_ids, engine

    got, engine = asyncio.run(run())
    assert got == want
    store = engine.engine.parts.experts
    assert store.cache.slab is None and store.reads.pending() == 0
    with pytest.raises(RuntimeError, match="closed"):  # its reader threads are stopped
        store.reads.pool.submit(0, 0, 0, 0, True, False)
