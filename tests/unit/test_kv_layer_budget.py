"""`layer-budget` (PrefixKV): the global prefix search on hand-made importances, keep sets (sinks, window,
per-layer prefixes), masked reads, bytes, and whole engines over full / int8 / merge storage under batching,
chunked prefill, prefix caching and preemption."""
from __future__ import annotations

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.engine.options import engine_config
from ferry.errors import InvalidRequest
from ferry.kvcache.policies import KVShape, make_kv_policy
from ferry.models.layers.attention import AttnMetadata
from ferry.plan import HOLE
from ferry.runner.kv import build_policy_kv
from ferry.runner.kv.layer_budget import keep_mask, prefix_counts
from ferry.runner.kv.storage import BlockLayout
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


def test_bytes_are_the_base_bytes_plus_importance_and_owner_tags():
    shape = KVShape(4, 2, 8, 4, 4)
    for base in ("full", "int8", "merge"):
        name = "layer-budget" if base == "full" else f"layer-budget+{base}"
        p = make_kv_policy(name, shape, budget=0.5)
        base_bytes = make_kv_policy(base, shape).device_bytes_per_block()
        tags = 1 if base == "full" else 0  # a uint8 owner per cell where cells are compacted
        assert p.device_bytes_per_block() == base_bytes + 4 * 4 * (4 + tags)  # float32 importance per cell
        assert p.read_tokens(1000) == 500


def test_compaction_gives_back_the_region_blocks_beyond_the_budget():
    p = make_kv_policy("layer-budget", KVShape(4, 2, 8, 4, 4), budget=0.25)
    # 102 tokens before the step: the region is blocks 0..24 (100 tokens), read 25 - 2 (the tail) = 23 of them:
    # 23 per layer on average fit in 6 blocks of every plane; blocks 6..24 go back
    assert p.region_tokens(102) == 23 and p.compact_blocks(102) == range(6, 25)
    assert p.compact_blocks(8) == range(1, 2)
    assert p.compact_blocks(3) == range(0) and p.for_budget(1.0).compact_blocks(102) == range(0)
    assert not p.shares_prefix_blocks  # a compacted block holds one request's cells
    name = "layer-budget+int8"
    over_int8 = make_kv_policy(name, KVShape(4, 2, 8, 4, 4), budget=0.25)
    assert over_int8.compact_blocks(102) == range(0) and over_int8.shares_prefix_blocks


def test_compacted_reads_are_the_kept_tokens_and_the_tail():
    """At the first single-token step of a long request, each layer's kept region tokens are packed into the
    region's first blocks; a query then gets the attention over exactly those tokens and the tail, as computed
    from the KV before packing."""
    torch.manual_seed(0)
    L, K, Dh, bs, N, H = 3, 2, 8, 4, 40, 4
    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": H * Dh, "vocab_size": 8,
                                 "num_attention_heads": H, "num_key_value_heads": K, "num_hidden_layers": L})
    name = "layer-budget"
    policy = make_kv_policy(name, KVShape(L, K, Dh, bs, 4), budget=0.25, sink_tokens=2, window_tokens=4)
    kv = build_policy_kv(policy, BlockLayout(cfg, N, 0, bs, torch.float32, torch.device("cpu")))
    past = 61  # tokens before the step: region = blocks 0..14 (60 tokens), tail = token 60 and the new token 61
    table = torch.randperm(N)[:past // bs + 1]
    storage = kv.base.storage.kv  # [L, 2, N, bs, K, Dh]
    storage.normal_()
    kv.importance[:, table] = torch.rand(L, len(table), bs) ** 4  # each layer attends to its own tokens
    before = storage.clone()
    # what the compaction keeps: 15 - 1 (the tail's token 60) = 14 per layer, the 2 sinks, 4 - 1 of the window
    region_keep = kv._keep(table, 60, policy.region_tokens(past), 2, 3)
    kept_blocks = -(-policy.region_tokens(past) // bs)
    assert policy.compact_blocks(past) == range(kept_blocks, 15)
    meta = AttnMetadata(positions=torch.tensor([past]), slot_mapping=table[-1:] * bs + past % bs, block_size=bs,
                        num_decodes=1, decode_block_tables=table[None], decode_ctx_lens=torch.tensor([past + 1]),
                        decode_kv=[policy.plan_step(past, 1, table.tolist())])  # the plan says: compact
    q, k, v = torch.randn(1, H, Dh), torch.randn(1, K, Dh), torch.randn(1, K, Dh)
    kv.compact(table.tolist(), meta.decode_kv[0].compaction)  # as the plan says (the runner's prepare)
    meta.kv_state = kv.begin_step(meta)
    got = [kv.layers[l].attend(q, k, v, meta, 0.5, None) for l in range(L)]
    assert meta.kv_state.packed is not None
    # later steps read the same cells through the table with its HOLEs, as the manager leaves it
    holed = table.clone()
    holed[kept_blocks:15] = HOLE
    meta2 = AttnMetadata(positions=torch.tensor([past]), slot_mapping=meta.slot_mapping, block_size=bs,
                         num_decodes=1, decode_block_tables=holed[None], decode_ctx_lens=torch.tensor([past + 1]),
                         decode_kv=[policy.plan_step(past, 1, holed.tolist())])
    meta2.kv_state = kv.begin_step(meta2)
    again = [kv.layers[l].attend(q, k, v, meta2, 0.5, None) for l in range(L)]
    for l in range(L):
        pos = torch.cat([region_keep[l].nonzero()[:, 0], torch.tensor([60])])
        keys = before[l, 0, table[pos // bs], pos % bs]  # [n, K, Dh] as they were
        values = before[l, 1, table[pos // bs], pos % bs]
        keys, values = torch.cat([keys, k]), torch.cat([values, v])  # and this step's token
        scores = torch.einsum("kgd,nkd->kgn", q.view(K, H // K, Dh), keys) * 0.5
        want = torch.einsum("kgn,nkd->kgd", scores.softmax(-1), values).reshape(1, H * Dh)
        torch.testing.assert_close(got[l], want)
        torch.testing.assert_close(again[l], want)
    assert len(set(region_keep.sum(1).tolist())) > 1  # the layers kept different numbers of tokens


@pytest.mark.parametrize("name", ["layer-budget", "spans", "shadow"])
def test_policies_that_move_tokens_refuse_sliding_window_models(tmp_ckpt_dir, name):
    """Their reads do not follow positions (compacted cells, retrieved spans), so a window cannot mask them."""
    mistral = make_checkpoint("mistral", tmp_ckpt_dir)  # sliding_window=48
    with pytest.raises(InvalidRequest, match=f"kv-policy {name} needs full-attention layers"):
        LLM(str(mistral), dtype="float32", kv_policy=name, kv_budget=0.5)


def test_layer_budget_options():
    assert engine_config("m", kv_policy="layer-budget", kv_budget=0.25).kv_options.budget == 0.25
    assert engine_config("m", kv_policy="layer-budget+int8", kv_window_tokens=32).kv_options.window_tokens == 32
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
    return num_blocks * make_kv_policy(name, shape).device_bytes_per_block()


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


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_evicting_budget_runs_under_preemption_with_per_layer_counts(llama, prompts, mode):
    """Compacted requests (their tables with HOLEs) are swapped out and in, or recomputed, and keep their
    tokens."""
    name = "layer-budget"
    roomy, _ = _run(llama, prompts, kv_cache_memory="1M", kv_policy=name, kv_budget=0.5, kv_sink_tokens=4,
                    kv_window_tokens=8)
    with LLM(str(llama), dtype="float32", max_num_batched_tokens=48, max_num_seqs=4, block_size=4,
             kv_cache_memory=_budget_bytes(llama, name, 40), preemption_mode=mode, swap_space="1M",
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


def test_compaction_frees_blocks_while_decoding_and_every_block_comes_back(llama, prompts):
    """Two 100-token prompts at budget 0.25: once decoding, each holds the region's first 7 blocks (25 tokens per
    layer on average) and its tail (blocks 25-26), not 27 blocks; the blocks come back when they finish."""
    long = [prompts[3], prompts[3][::-1]]  # 100 tokens each
    with LLM(str(llama), dtype="float32", max_num_batched_tokens=48, max_num_seqs=4, block_size=4,
             kv_cache_memory="1M", kv_policy="layer-budget", kv_budget=0.25, kv_sink_tokens=4,
             kv_window_tokens=8) as llm:
        eng, kv = llm.engine, llm.engine.kv
        for i, p in enumerate(long):
            eng.add_request(str(i), {"prompt_token_ids": p}, SamplingParams(max_tokens=8, ignore_eos=True))
        decoding = []
        while eng.has_unfinished():
            eng.step()
            running = eng.scheduler.running
            if len(running) == 2 and all(r.num_output_tokens > 1 for r in running):
                decoding.append(kv.pool.num_used)
                assert all(HOLE in kv.block_table(r) for r in running)
        assert kv.all_free
    assert decoding and max(decoding) <= 2 * (7 + 2) < 2 * 27


def test_over_merge_storage_runs(llama, prompts):
    got, engine = _run(llama, prompts[:3], kv_cache_memory="1M", kv_policy="layer-budget+merge", kv_budget=0.5,
                       kv_sink_tokens=4, kv_window_tokens=8)
    assert all(len(g) == 10 for g in got)
    assert engine.stats().kv_cache_bytes == engine.parts.storage.nbytes <= 1 << 20
