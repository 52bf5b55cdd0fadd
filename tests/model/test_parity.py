"""ferry's greedy tokens equal transformers' (float32) for every supported family, with prompts of different
lengths submitted together — plain, with chunked prefill, under forced preemption (recompute and swap) and
with prefix-cache hits. After each run no KV block is held and the budget was never exceeded."""
from __future__ import annotations

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.kvcache.policies import KVShape, make_kv_policy
from ferry.models.loader import load_model
from ferry.plan import ScheduledReq, StepPlan
from ferry.runner.inputs import build_inputs
from ferry.runner.kv.full import FullKV
from ferry.runner.kv.storage import BlockLayout
from tests.checkpoints import FAMILIES, hf_greedy, hf_logits, make_checkpoint, random_prompts

LENGTHS = [1, 5, 17, 33, 64, 100]
MAX_NEW = 8


@pytest.fixture(scope="module")
def refs(tmp_ckpt_dir):
    """family -> (folder, prompts, shared-prefix prompts, reference tokens for both)."""
    cache = {}

    def get(family: str):
        if family not in cache:
            path = make_checkpoint(family, tmp_ckpt_dir)
            vocab = ModelConfig.from_hf(path).vocab_size
            prompts = random_prompts(6, LENGTHS, vocab, seed=1)
            base = random_prompts(1, [40], vocab, seed=2)[0]
            shared = [base + tail for tail in random_prompts(4, [3, 9, 20, 1], vocab, seed=3)]
            cache[family] = (path, prompts, shared,
                             hf_greedy(path, prompts, MAX_NEW)[0], hf_greedy(path, shared, MAX_NEW)[0])
        return cache[family]
    return get


SCENARIOS = {
    "plain": dict(),
    "chunked": dict(max_num_batched_tokens=16),
    "recompute": dict(kv_cache_blocks=14, max_num_batched_tokens=64),
    "swap": dict(kv_cache_blocks=14, max_num_batched_tokens=64, preemption_mode="swap"),
}


def _run(path, prompts, *, kv_cache_blocks: int | None = None, **options):
    cfg = ModelConfig.from_hf(path)
    if kv_cache_blocks:
        options["kv_cache_memory"] = kv_cache_blocks * KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16,
                                                                  4).plain_block_bytes  # float32
    llm = LLM(str(path), dtype="float32", **options)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True), use_tqdm=False)
    engine = llm.engine
    assert engine.kv.all_free, "KV blocks leaked"
    assert engine.kv.max_blocks_used <= engine.kv.pool.num_blocks
    assert engine.parts.storage.nbytes <= engine.config.cache.kv_cache_memory
    return [o.outputs[0].token_ids for o in outs], engine


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers(refs, family, scenario):
    path, prompts, _, want, _ = refs(family)
    got, engine = _run(path, prompts, **SCENARIOS[scenario])
    assert got == want
    if scenario in ("recompute", "swap"):
        assert engine.scheduler.num_preemptions > 0, "the tiny KV budget did not force a preemption"


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hits_match_transformers(refs, family):
    path, _, shared, _, want = refs(family)
    got, engine = _run(path, shared, max_num_seqs=1)  # one at a time: later prompts hit the first's blocks
    assert got == want
    assert engine.scheduler.prefix_hits >= 3 * 32  # 2 full blocks of the 40-token prefix, for 3 later prompts


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tmp_ckpt_dir, family):
    """Model-level float32 logits through the paged cache: two prefill chunks, then one decode step."""
    path = make_checkpoint(family, tmp_ckpt_dir)
    cfg = ModelConfig.from_hf(path)
    model = load_model(cfg, torch.float32, torch.device("cpu"), 512)
    full = make_kv_policy("full", KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 16, 4))
    storage = FullKV(full, BlockLayout(cfg, 8, 0, 16, torch.float32, torch.device("cpu")))
    prompt = random_prompts(1, [70], cfg.vocab_size, seed=4)[0]
    blocks = [7, 2, 5, 0, 3]  # scattered on purpose
    got = []
    for start, n in [(0, 40), (40, 29), (69, 1)]:
        req = ScheduledReq("r", prompt[start:start + n], start, blocks, True, SamplingParams(), prompt, 70)
        inputs = build_inputs(StepPlan([req]), 16, torch.device("cpu"))
        got.append(model(inputs.input_ids, inputs.meta, storage.layers, inputs.logits_indices))
    want = hf_logits(path, prompt)[[39, 68, 69]]
    torch.testing.assert_close(torch.cat(got), want, atol=1e-4, rtol=0)


def test_sharded_checkpoint_loads(tmp_ckpt_dir):
    path = make_checkpoint("llama", tmp_ckpt_dir, shard=True)
    assert (path / "model.safetensors.index.json").is_file()
    prompts = random_prompts(2, [9, 30], ModelConfig.from_hf(path).vocab_size, seed=5)
    got, _ = _run(path, prompts)
    assert got == hf_greedy(path, prompts, MAX_NEW)[0]
