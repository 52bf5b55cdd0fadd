"""`layer-budget` (PrefixKV): the global prefix search on hand-made importances, keep sets (sinks, window,
per-layer prefixes), masked reads, bytes, and whole engines over full / int8 / merge storage under batching,
chunked prefill, prefix caching and preemption."""
from __future__ import annotations

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.config import KVPolicyConfig, ModelConfig
from ferry.engine.options import engine_config
from ferry.errors import InvalidRequest
from ferry.kvcache.policies import KV_POLICIES, KVShape
from ferry.models.kv.layer_budget import keep_mask, prefix_counts
from tests.checkpoints import make_checkpoint, random_prompts


def test_prefix_search_gives_concentrated_layers_few_tokens_and_diffuse_ones_many():
    imp = torch.tensor([[0.7, 0.1, 0.1, 0.1],  # layer 0: one token holds 70% of the attention
                        [0.25, 0.25, 0.25, 0.25]])  # layer 1: flat
    # p in [0.7, 0.75): layer 0 needs 1 token, layer 1 needs 3 (total 4); p >= 0.75 needs 2 + 3 = 5
    assert prefix_counts(imp, 4).tolist() == [1, 3]
    assert prefix_counts(imp, 5).tolist() == [2, 3]  # p in [0.75, 0.8)
    assert prefix_counts(imp, 3).tolist() == [1, 2]  # p in (0.25, 0.5]
    assert prefix_counts(imp, 8).tolist() == [4, 4]  # everything fits
    assert prefix_counts(imp, 1).tolist() == [0, 0]  # less than a token per layer


def test_prefix_search_on_three_layers_meets_the_budget_with_one_p():
    torch.manual_seed(0)
    imp = torch.rand(3, 50) ** torch.tensor([[8.0], [1.0], [3.0]])  # concentrated, diffuse, in between
    n = prefix_counts(imp, 60)
    assert int(n.sum()) <= 60 and n[0] < n[2] < n[1]
    # one p explains every count: each layer's prefix is the shortest reaching the same share of its mass
    share = [float(imp[l].sort(descending=True).values[:n[l]].sum() / imp[l].sum()) for l in range(3)]
    below = [float(imp[l].sort(descending=True).values[:n[l] - 1].sum() / imp[l].sum()) for l in range(3)]
    assert max(below) < min(share)


def test_keep_mask_keeps_sinks_window_and_each_layers_top_tokens():
    imp = torch.zeros(2, 12)
    imp[0, 5] = 10.0  # layer 0: all attention on token 5
    imp[1, 3:9] = 1.0  # layer 1: spread over tokens 3..8
    keep = keep_mask(imp, budget=6, sink=2, window=2)  # 4 forced per layer, 2 * (6 - 4) = 4 tokens to share
    assert keep[:, :2].all() and keep[:, -2:].all()
    assert keep[0, 2:10].nonzero()[:, 0].add(2).tolist() == [5]  # one token reaches all of layer 0's mass
    assert int(keep[1, 2:10].sum()) == 3  # layer 1 gets the rest, among its attended tokens
    assert set(keep[1, 2:10].nonzero()[:, 0].add(2).tolist()) <= set(range(3, 9))
    assert keep_mask(imp, budget=12, sink=2, window=2).all()


def test_bytes_are_the_base_bytes_plus_importance():
    shape = KVShape(4, 2, 8, 4, 4)
    for base in ("full", "int8", "merge"):
        name = "layer-budget" if base == "full" else f"layer-budget+{base}"
        p = KV_POLICIES[name](KVPolicyConfig(name, budget=0.5), shape)
        base_bytes = KV_POLICIES[base](KVPolicyConfig(base), shape).device_bytes_per_block()
        assert p.device_bytes_per_block() == base_bytes + 4 * 4 * 4  # float32 importance per (layer, token)
        assert p.read_tokens(1000) == 500


def test_layer_budget_options():
    assert engine_config("m", kv_policy="layer-budget", kv_budget=0.25).kv_policy.budget == 0.25
    assert engine_config("m", kv_policy="layer-budget+int8", kv_window_tokens=32).kv_policy.window_tokens == 32
    with pytest.raises(InvalidRequest, match="kv_policy must be one of"):
        engine_config("m", kv_policy="layer-budget+spans")


# -- whole engines -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_ckpt_dir):
    return make_checkpoint("llama", tmp_ckpt_dir)


def _run(path, prompts, **kw):
    with LLM(str(path), dtype="float32", max_num_batched_tokens=48, max_num_seqs=4, block_size=4, **kw) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        assert llm.engine.kv.all_free and not llm.engine.scheduler.has_unfinished
        return [o.outputs[0].token_ids for o in outs], llm.engine


def _budget_bytes(path, name: str, num_blocks: int) -> int:
    m = ModelConfig.from_hf(path)
    shape = KVShape(m.num_layers, m.num_kv_heads, m.head_dim, 4, 4)
    return num_blocks * KV_POLICIES[name](KVPolicyConfig(name), shape).device_bytes_per_block()


@pytest.fixture(scope="module")
def prompts(llama):
    vocab = ModelConfig.from_hf(llama).vocab_size
    p = random_prompts(6, [60, 90, 75, 100, 64, 80], vocab, seed=3)
    p[4] = p[1][:64]  # a prefix hit
    return p


@pytest.mark.parametrize("base,mode", [("full", "recompute"), ("full", "swap"), ("int8", "swap")])
def test_whole_budget_reads_everything_like_its_base(llama, prompts, base, mode):
    """With a budget of the whole context nothing is evicted: outputs equal the base policy's, through chunked
    prefill, prefix hits and preemption (importance and masks travel with the blocks)."""
    name = "layer-budget" if base == "full" else f"layer-budget+{base}"
    want, _ = _run(llama, prompts, kv_cache_memory="1M", kv_policy=base)
    got, engine = _run(llama, prompts, kv_cache_memory=_budget_bytes(llama, name, 40), preemption_mode=mode,
                       swap_space="1M", kv_policy=name, kv_budget=1.0)
    assert engine.scheduler.num_preemptions > 0
    assert got == want


def test_evicting_budget_runs_under_preemption_with_per_layer_counts(llama, prompts):
    name = "layer-budget"
    roomy, _ = _run(llama, prompts, kv_cache_memory="1M", kv_policy=name, kv_budget=0.5, kv_sink_tokens=4,
                    kv_window_tokens=8)
    with LLM(str(llama), dtype="float32", max_num_batched_tokens=48, max_num_seqs=4, block_size=4,
             kv_cache_memory=_budget_bytes(llama, name, 40), preemption_mode="swap", swap_space="1M",
             kv_policy=name, kv_budget=0.5, kv_sink_tokens=4, kv_window_tokens=8) as llm:
        storage = llm.engine.parts.storage
        storage.record = []
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        assert llm.engine.kv.all_free and llm.engine.scheduler.num_preemptions > 0
    got = [o.outputs[0].token_ids for o in outs]
    counts = [c for c in storage.record if sum(c) < len(c) * 60]  # keep sets that evicted
    assert counts and any(len(set(c)) > 1 for c in counts)  # layers got different budgets
    # chunking changes which prefill queries add to the importance; the prefix hit shares its blocks' importance
    assert sum(a[:3] == b[:3] for a, b in zip(got, roomy)) >= 4


def test_over_merge_storage_runs(llama, prompts):
    got, engine = _run(llama, prompts[:3], kv_cache_memory="1M", kv_policy="layer-budget+merge", kv_budget=0.5,
                       kv_sink_tokens=4, kv_window_tokens=8)
    assert all(len(g) == 10 for g in got)
    assert engine.stats().kv_cache_bytes == engine.parts.storage.nbytes <= 1 << 20
