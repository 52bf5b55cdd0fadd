"""Experts read from an expert store under any RAM budget, eviction policy and prefetcher give exactly the
greedy tokens of the all-in-memory run, for every MoE family; the budget holds and no slot leaks."""
from __future__ import annotations

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.experts.layout import StoreIndex
from tests.checkpoints import MOE_FAMILIES, random_prompts
from tests.expert_stores import check_store_clean, make_store

MAX_NEW = 8
LENGTHS = [1, 6, 23, 40]

CASES = {  # name -> (budget: fraction of all experts' bytes, or "one" expert; engine options)
    "all": (1.0, {}),
    "quarter": (0.25, {}),
    "one-expert": ("one", {}),
    "quarter-correlation": (0.25, dict(expert_eviction="correlation", expert_prefetch="correlation")),
    "quarter-pregate": (0.25, dict(expert_prefetch="pregate")),
    "one-expert-pregate-chunked": ("one", dict(expert_prefetch="pregate", expert_eviction="correlation",
                                               max_num_batched_tokens=16)),
}


@pytest.fixture(scope="module")
def refs(tmp_ckpt_dir):
    cache = {}

    def get(family: str, dtype: str = "float32", bits: str = "none"):
        """The reference: every expert in memory (quantized stores: the whole store in RAM)."""
        if (family, dtype, bits) not in cache:
            ckpt, store = make_store(family, tmp_ckpt_dir, dtype, bits)
            prompts = random_prompts(4, LENGTHS, ModelConfig.from_hf(ckpt).vocab_size, seed=7)
            store_opts = {} if bits == "none" else dict(expert_store=str(store))
            want, _ = _run(ckpt, prompts, dtype=dtype, **store_opts)
            cache[(family, dtype, bits)] = ckpt, store, prompts, want
        return cache[(family, dtype, bits)]
    return get


def _run(ckpt, prompts, **options):
    with LLM(str(ckpt), kv_cache_memory="4M", **options) as llm:  # a small KV cache: fast to allocate
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
        experts = llm.engine.parts.experts
        if experts is not None:
            check_store_clean(experts, experts.stats().budget_nbytes)
        stats = llm.engine.stats().experts
    if experts is not None:
        assert experts.cache.slab is None, "close() kept the expert cache"
    return [o.outputs[0].token_ids for o in outs], stats


def _budget(store, budget) -> int:
    slot = StoreIndex.load(store).slot_nbytes
    total = slot * sum(len(r) for r in StoreIndex.load(store).experts.values())
    return slot if budget == "one" else int(total * budget)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_offloaded_greedy_matches_resident(refs, family, case):
    ckpt, store, prompts, want = refs(family)
    budget, options = CASES[case]
    got, stats = _run(ckpt, prompts, dtype="float32", expert_store=str(store),
                      expert_cache_memory=_budget(store, budget), **options)
    assert got == want
    assert stats.bytes_read >= stats.num_reads * StoreIndex.load(store).layout.record_nbytes > 0
    if budget != 1.0:
        assert stats.num_evictions > 0, "the budget was meant to force evictions"
    if options.get("expert_prefetch", "none") != "none":
        assert stats.num_predicted > 0 and stats.num_needed > 0


def test_bfloat16_store_matches_resident_bfloat16(refs):
    ckpt, store, prompts, want = refs("qwen3_moe", "bfloat16")
    got, _ = _run(ckpt, prompts, dtype="bfloat16", expert_store=str(store), expert_cache_memory=_budget(store, 0.25))
    assert got == want


QUANT_CASES = ["quarter", "one-expert", "quarter-pregate", "one-expert-pregate-chunked"]


@pytest.mark.parametrize("case", QUANT_CASES)
@pytest.mark.parametrize("family,bits", [(f, "4") for f in MOE_FAMILIES] + [("qwen3_moe", "8"), ("mixtral", "auto")])
def test_quantized_offload_matches_quantized_in_memory(refs, family, bits, case):
    """int8/int4 experts run through the quantized kernels, in place in their cache slots: offloaded at any
    budget, with any prefetcher, it gives exactly the tokens of the same store with every expert in RAM."""
    ckpt, store, prompts, want = refs(family, "bfloat16", bits)
    budget, options = CASES[case]
    got, stats = _run(ckpt, prompts, dtype="bfloat16", expert_store=str(store),
                      expert_cache_memory=_budget(store, budget), **options)
    assert got == want
    assert stats.num_evictions > 0 and stats.cache_nbytes <= _budget(store, budget)


def test_int4_experts_run_in_the_quantized_kernel(refs, monkeypatch):
    """No dequantized copy: every expert matmul goes through the quantized linears over the slots, no scratch."""
    from ferry.ops import quant
    calls = []
    real = quant.KernelLinear.__call__
    monkeypatch.setattr(quant.KernelLinear, "__call__", lambda self, x: calls.append(x.dtype) or real(self, x))
    ckpt, store, prompts, _ = refs("qwen3_moe", "bfloat16", "4")
    with LLM(str(ckpt), kv_cache_memory="4M", dtype="bfloat16", expert_store=str(store)) as llm:
        llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        assert llm.engine.parts.experts.slots.scratch is None
    assert calls and set(calls) == {torch.bfloat16}
