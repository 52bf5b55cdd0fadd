"""`lazy` KV policy (LazyLLM): the pruning schedule, tokens with low attention pruned at the right layer and masked
after it, a pruned token revived from its saved state when a later query attends to it, the decoder computing
only the kept rows (checked against a plain forward that merely hides the pruned tokens), and whole engines under
continuous batching, chunked prefill, prefix caching and both preemptions (allocators back to empty)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.engine.options import engine_config
from ferry.errors import InvalidRequest
from ferry.kvcache.policies import KVShape, make_kv_policy
from ferry.models.layers.attention import AttnMetadata, PrefillChunk
from ferry.runner.kv.base import LayerKV
from ferry.runner.kv.lazy import POOL, REVIVE_MAX, LazyKV
from ferry.runner.kv.storage import BlockLayout
from tests.checkpoints import make_checkpoint, random_prompts


def lazy(budget: float | None, layers: int = 8, bs: int = 4):
    return make_kv_policy("lazy", KVShape(layers, 2, 8, bs, 4), budget=budget)


# -- scheduler side ------------------------------------------------------------------------------

def test_schedule_shrinks_to_the_budget_and_blocks_cost_full_plus_depth():
    p = lazy(0.25, layers=8)
    keep = [p.keep_fraction(l, last=6) for l in range(8)]
    first = p.first_pruned_layer()
    assert keep[:first] == [1.0] * first and keep[6] == keep[7] == pytest.approx(0.25)
    assert all(a > b for a, b in zip(keep[first - 1:6], keep[first:7]))  # shrinks at every layer up to `last`
    assert p.device_bytes_per_block() == make_kv_policy("full", p.shape).device_bytes_per_block() + 4
    assert not p.shares_prefix_blocks and lazy(1.0).shares_prefix_blocks
    assert [lazy(1.0).keep_fraction(l, 6) for l in range(8)] == [1.0] * 8
    with pytest.raises(InvalidRequest, match="lazy"):
        lazy(2.0)
    late = make_kv_policy("lazy", KVShape(4, 2, 8, 4, 4), budget=0.5, lazy_start=0.75)
    assert [late.keep_fraction(l, last=3) for l in range(4)] == [1.0, 1.0, 1.0, 0.5]  # only the last layer prunes
    with pytest.raises(InvalidRequest, match="kv_lazy_start does not apply to kv_policy=full"):
        engine_config("m", kv_policy="full", kv_lazy_start=0.25)
    assert engine_config("m", kv_policy="lazy", kv_budget=0.25, kv_lazy_start=0.25).kv_options.lazy_start == 0.25
    # the whole prompt (up to 4096 tokens) in one step by default, so the question ranks it; a user's choice wins
    steps = [engine_config("m", **kw).scheduler.max_num_batched_tokens
             for kw in ({}, {"kv_policy": "lazy"}, {"kv_policy": "lazy", "max_num_batched_tokens": 256})]
    assert steps == [512, 4096, 256]
    # ... and a prompt that fits a step is not split between steps (a batched one included)
    assert engine_config("m", kv_policy="lazy").scheduler.whole_prompts
    assert not engine_config("m").scheduler.whole_prompts


# -- tensor side: one layer at a time ------------------------------------------------------------

CFG = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 10})  # Dh 8: r = 1


N = 80  # prompt tokens; the observed last 8 attend to TARGETS, kept with their POOL neighbours each side
TARGETS = [20, 55]
KEEP = (2 * (2 * POOL + 1) - 0.5) / N  # ceil(KEEP * N): the two neighbourhoods (the last token is always kept)


def _store(keep: list[float], blocks: int = 24) -> LazyKV:
    kv = LazyKV(make_kv_policy("lazy", KVShape(3, 2, 8, 4, 4), budget=0.5), BlockLayout(CFG, blocks, 0, 4,
                torch.float32, torch.device("cpu")))
    kv.set_schedule(keep)
    return kv


def _no_peek():
    raise AssertionError("a decode step (nothing scheduled to prune) ranks nothing by the next layer")


def _prefill_meta(n: int) -> AttnMetadata:
    empty = torch.zeros(0, 0, dtype=torch.long)
    return AttnMetadata(torch.arange(n), torch.arange(n), 4, 0, empty, empty.view(0),
                        prefills=[PrefillChunk(0, n, 0, torch.arange(-(-n // 4)))])


def _qkv(n: int, targets: list[int], rows: list[int]):
    """Keys of `targets` point along e0 (the others are 0); queries of `rows` look along e0: they attend to the
    targets and nothing else worth mentioning."""
    q, k, v = torch.zeros(n, 4, 8), torch.zeros(n, 2, 8), torch.randn(n, 2, 8)
    k[targets, :, 0] = 10.0
    q[rows, :, 0] = 10.0
    return q, k, v


def _peek(n: int, targets: list[int]):
    """The pruning layer's own queries and keys, as the decoder's peek gives them: its last 8 rows attend to
    `targets`."""
    q, k, _ = _qkv(n, targets, rows=list(range(n - 8, n)))
    return lambda: (q, k)


@pytest.mark.parametrize("tile", [None, 5])  # 5: the kept rows' attention in several tiles of rows
def test_tokens_with_low_attention_are_pruned_at_the_right_layer_and_masked_after_it(tile, monkeypatch):
    if tile:
        monkeypatch.setattr("ferry.runner.kv.lazy.TILE", tile)
    torch.manual_seed(0)
    kv = _store([1.0, KEEP, KEEP])  # prune before layer 1 (layer 2 is the aux state's layer: nothing pruned there)
    assert kv.pruning_layers == {1} and kv.layers[0].changes_rows and not kv.layers[1].changes_rows
    n = N
    meta = _prefill_meta(n)
    meta.kv_state = kv.begin_step(meta)
    # at layer 0 the last 8 tokens (observed) attend elsewhere; layer 1's own queries and keys point at TARGETS
    q, k, v = _qkv(n, targets=[40, 70], rows=list(range(n - 8, n)))
    kv.layers[0].attend(q, k, v, meta, 1.0, None)
    x = torch.randn(n, 32)
    needed = torch.zeros(n, dtype=torch.bool)
    needed[-1] = True
    change = kv.prune(1, x, meta, needed, _peek(n, TARGETS))
    kept = set(change.keep.tolist())
    # the most attended at layer 1 itself: the targets with their POOL neighbours each side, and the last token
    assert kept == {t + d for t in TARGETS for d in range(-POOL, POOL + 1)} | {n - 1}
    pruned = sorted(set(range(n)) - kept)
    assert kv.depth.flatten()[pruned].tolist() == [1] * len(pruned)  # KV in layer 0 only
    assert kv.depth.flatten()[sorted(kept)].tolist() == [3] * len(kept)
    torch.testing.assert_close(kv._load(1, torch.tensor(pruned)), x[pruned])  # their state, for a revival
    assert change.revived is None or len(change.revived) == 0
    assert change.meta.positions.tolist() == sorted(kept) and change.meta.slot_mapping.tolist() == sorted(kept)
    # layer 1: the kept rows read the kept tokens only
    m = len(kept)
    q1, k1, v1 = torch.randn(m, 4, 8), torch.randn(m, 2, 8), torch.randn(m, 2, 8)
    out = kv.layers[1].attend(q1, k1, v1, change.meta, 0.5, None).view(m, 4, 8)
    pos = change.meta.positions
    want = F.scaled_dot_product_attention(q1.transpose(0, 1)[None], k1.transpose(0, 1)[None], v1.transpose(0, 1)[None],
                                          attn_mask=pos[None, :] <= pos[:, None], scale=0.5, enable_gqa=True)
    torch.testing.assert_close(out, want[0].transpose(0, 1))
    assert kv.stats["pruned"] == len(pruned)


def test_a_pruned_token_is_revived_when_a_later_query_attends_to_it():
    torch.manual_seed(0)
    kv = _store([1.0, KEEP, KEEP])
    n, lost = N, 38  # token 38: pruned (between the targets' neighbourhoods), nobody in the prompt looks along e1
    meta = _prefill_meta(n)
    meta.kv_state = kv.begin_step(meta)
    q, k, v = _qkv(n, targets=TARGETS, rows=list(range(n - 8, n)))
    k[lost, :, 1] = 10.0
    kv.layers[0].attend(q, k, v, meta, 1.0, None)
    x = torch.randn(n, 32)
    kept = kv.prune(1, x, meta, torch.arange(n) == n - 1, _peek(n, TARGETS)).keep.tolist()
    assert kv.depth.flatten()[lost] == 1
    # a decode step at position n whose query looks along e1: at layer 0 it attends to the lost token
    empty = torch.zeros(0, dtype=torch.long)
    nb = n // 4 + 1
    dmeta = AttnMetadata(torch.tensor([n]), torch.tensor([n]), 4, 1, torch.arange(nb)[None], torch.tensor([n + 1]))
    dmeta.kv_state = kv.begin_step(dmeta)
    qd, kd, vd = torch.zeros(1, 4, 8), torch.zeros(1, 2, 8), torch.randn(1, 2, 8)
    qd[0, :, 1] = 10.0
    kv.layers[0].attend(qd, kd, vd, dmeta, 1.0, None)
    change = kv.prune(1, torch.randn(1, 32), dmeta, torch.tensor([True]), _no_peek)
    revived = change.meta.positions[1:].tolist()
    # the lost token and pruned neighbours within POOL, at most REVIVE_MAX of them
    assert lost in revived and all(abs(p - lost) <= POOL for p in revived) and len(revived) <= REVIVE_MAX
    torch.testing.assert_close(change.revived, x[revived])  # from the state saved when it was pruned
    assert change.keep.tolist() == [0] and change.meta.positions[0] == n  # the decode token goes on
    assert kv.depth.flatten()[revived].tolist() == [3] * len(revived)
    # layer 1: the revived rows write their KV there and the decode query sees them (and nothing pruned)
    r = len(revived) + 1
    out = kv.layers[1].attend(torch.randn(r, 4, 8), torch.randn(r, 2, 8), torch.randn(r, 2, 8), change.meta, 0.5, None)
    assert out.shape == (r, 32) and bool(torch.isfinite(out).all())
    visible = kv.layers[1]._visible(torch.arange(nb), n + 1)
    assert visible[revived].all() and visible[n] and int(visible.sum()) == len(kept) + len(revived) + 1
    assert kv.stats["revived"] == len(revived) and empty.numel() == 0


# -- the decoder computes the kept rows only -----------------------------------------------------

class _Hidden(LayerKV):
    """Reference: every row computed, tokens with depth <= layer hidden from attention (a row still sees itself)."""

    def __init__(self, layer: int, depth: torch.Tensor) -> None:
        self.layer, self.depth = layer, depth

    def attend(self, q, k, v, meta, scale, window):
        T = q.shape[0]
        pos = torch.arange(T)
        mask = (pos[None, :] <= pos[:, None]) & ((self.depth > self.layer)[None, :] | torch.eye(T, dtype=torch.bool))
        o = F.scaled_dot_product_attention(q.float().transpose(0, 1)[None], k.float().transpose(0, 1)[None],
                                           v.float().transpose(0, 1)[None], attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        return o[0].transpose(0, 1).reshape(T, -1)


@pytest.fixture(scope="module")
def llama(tmp_ckpt_dir):
    return make_checkpoint("llama", tmp_ckpt_dir)



@pytest.mark.parametrize("logit,revives", [(0.7, False), (3.0, True)])
def test_only_a_pruned_token_drawing_revive_min_of_the_attention_comes_back(logit, revives):
    """In a long context a share above the even one can still be noise: 0.7 draws ~0.5% of 400 tokens' attention
    (twice the even share, under REVIVE_MIN), 3.0 ~5%."""
    n, lost = 400, 300
    kv = _store([1.0, (2 * POOL + 0.5) / n, (2 * POOL + 0.5) / n], blocks=104)  # keeps the target's neighbourhood
    q, k, v = _qkv(n, targets=[100], rows=list(range(n - 8, n)))
    k[lost, :, 1] = 10.0
    meta = _prefill_meta(n)
    meta.kv_state = kv.begin_step(meta)
    kv.layers[0].attend(q, k, v, meta, 1.0, None)
    kv.prune(1, torch.randn(n, 32), meta, torch.arange(n) == n - 1, _peek(n, [100]))
    assert kv.depth.flatten()[lost] == 1
    nb = n // 4 + 1
    dmeta = AttnMetadata(torch.tensor([n]), torch.tensor([n]), 4, 1, torch.arange(nb)[None], torch.tensor([n + 1]))
    dmeta.kv_state = kv.begin_step(dmeta)
    qd = torch.zeros(1, 4, 8)
    qd[0, :, 1] = logit / 10
    kv.layers[0].attend(qd, torch.zeros(1, 2, 8), torch.randn(1, 2, 8), dmeta, 1.0, None)
    change = kv.prune(1, torch.randn(1, 32), dmeta, torch.tensor([True]), _no_peek)
    revived = [] if change is None else change.meta.positions[1:].tolist()
    assert (lost in revived) == revives and (revives or not revived)

def test_decoder_with_pruned_rows_equals_a_forward_that_hides_them(llama):
    """One unchunked prompt: the logits of its last token equal those of a plain forward over every row in which
    the tokens lazy pruned are merely invisible from the layer they were pruned at (so dropping rows, saving them
    and mapping the logits row back lose nothing else)."""
    from ferry.models.loader import load_model
    from ferry.plan import ScheduledReq, StepPlan
    from ferry.runner.inputs import build_inputs
    cfg = ModelConfig.from_hf(llama)
    model = load_model(cfg, torch.float32, torch.device("cpu"), 256, None)
    n = 120
    ids = random_prompts(1, [n], cfg.vocab_size, seed=4)[0]
    kv = LazyKV(make_kv_policy("lazy", KVShape(cfg.num_layers, cfg.num_kv_heads,
                cfg.head_dim, 16, 4), budget=0.3), BlockLayout(cfg, 16, 0, 16, torch.float32, torch.device("cpu")))
    assert kv.pruning_layers  # the tiny model prunes somewhere
    plan = StepPlan([ScheduledReq("a", ids, 0, list(range(8)), True, SamplingParams(), ids, n)])
    inputs = build_inputs(plan, 16, torch.device("cpu"))
    inputs.meta.kv_state = kv.begin_step(inputs.meta)
    got = kv.forward(model, inputs.input_ids, inputs.meta, inputs.logits_indices)  # lazy drives the layers
    depth = kv.depth.flatten()[:n].long()
    assert int((depth < cfg.num_layers).sum()) == kv.stats["pruned"] > 0 and depth[-1] == cfg.num_layers
    ref = [_Hidden(l, depth) for l in range(cfg.num_layers)]
    inputs = build_inputs(plan, 16, torch.device("cpu"))
    want = model(inputs.input_ids, inputs.meta, ref, inputs.logits_indices)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert kv.stats["token_layers"] == int(depth.clamp(max=cfg.num_layers).sum())  # a pruned token skips its layers


# -- whole engines -------------------------------------------------------------------------------

def _run(path, prompts, **kw):
    with LLM(str(path), dtype="float32", max_num_batched_tokens=48, max_num_seqs=4, block_size=4, **kw) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        kv = llm.engine.kv
        assert kv.all_free and not llm.engine.scheduler.has_unfinished
        assert llm.engine.parts.storage.nbytes <= llm.engine.config.cache.kv_cache_memory
        return [o.outputs[0].token_ids for o in outs], llm.engine


def _blocks_bytes(path, num_blocks: int) -> int:
    cfg = ModelConfig.from_hf(path)
    shape = KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 4, 4)
    return num_blocks * make_kv_policy("lazy", shape).device_bytes_per_block()


def _prompts(path):
    vocab = ModelConfig.from_hf(path).vocab_size
    prompts = random_prompts(6, [60, 90, 75, 100, 64, 80], vocab, seed=3)
    prompts[4] = prompts[1][:64]  # a prefix hit (when blocks are shared)
    return prompts


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_budget_one_equals_full_under_batching_chunking_prefix_hits_and_preemption(llama, mode):
    prompts = _prompts(llama)
    want, _ = _run(llama, prompts, kv_cache_memory="1M")
    got, engine = _run(llama, prompts, kv_cache_memory=_blocks_bytes(llama, 40), preemption_mode=mode,
                       kv_policy="lazy", kv_budget=1.0, swap_space="1M")
    assert got == want
    assert engine.scheduler.num_preemptions > 0 and engine.parts.storage.stats["pruned"] == 0


def test_prefix_blocks_are_shared_only_when_nothing_is_pruned(llama):
    vocab = ModelConfig.from_hf(llama).vocab_size
    base = random_prompts(1, [40], vocab, seed=2)[0]
    prompts = [base + tail for tail in random_prompts(3, [3, 9, 20], vocab, seed=3)]
    with LLM(str(llama), dtype="float32", block_size=4, kv_policy="lazy", kv_budget=1.0) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)]
        first = llm.engine.scheduler.prefix_hits
        again = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts],
                 SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)]
        assert again == want and llm.engine.scheduler.prefix_hits > first
    with LLM(str(llama), dtype="float32", block_size=4, kv_policy="lazy", kv_budget=0.5) as llm:
        for _ in range(2):
            llm.generate([{"prompt_token_ids": p} for p in prompts],
                         SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
        assert llm.engine.scheduler.prefix_hits == 0 and not llm.engine.kv.pool.cached


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_pruning_under_batching_chunking_and_preemption_frees_everything_and_shares_nothing(llama, mode):
    prompts = _prompts(llama)
    got, engine = _run(llama, prompts, kv_cache_memory=_blocks_bytes(llama, 40), preemption_mode=mode,
                       kv_policy="lazy", kv_budget=0.3, swap_space="1M")
    stats = engine.parts.storage.stats
    assert engine.scheduler.num_preemptions > 0
    assert stats["pruned"] > 0 and stats["revived"] > 0
    assert stats["token_layers"] < stats["scheduled_token_layers"]  # rows were skipped
    assert engine.scheduler.prefix_hits == 0 and not engine.kv.pool.cached  # blocks with pruned tokens not shared
    assert all(len(t) == 10 for t in got)
    again, _ = _run(llama, prompts, kv_cache_memory=_blocks_bytes(llama, 40), preemption_mode=mode,
                    kv_policy="lazy", kv_budget=0.3, swap_space="1M")
    assert again == got  # deterministic under the same schedule


def test_prompt_logprobs_rows_are_never_pruned(llama):
    """Rows whose logits are asked for (every scored prompt token) must be computed through every layer."""
    ids = random_prompts(1, [50], ModelConfig.from_hf(llama).vocab_size, seed=6)[0]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = {}
    for policy in ("full", "lazy"):
        with LLM(str(llama), dtype="float32", block_size=4, kv_policy=policy,
                 **({"kv_budget": 0.3} if policy == "lazy" else {})) as llm:
            o = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
            outs[policy] = [lp.logprob for lp in o.prompt_logprobs[1:]]
    assert outs["lazy"] == pytest.approx(outs["full"], abs=1e-4)


def test_reported_memory_is_held(llama):
    with LLM(str(llama), dtype="float32", kv_cache_memory="1M", kv_policy="lazy", kv_budget=0.5) as llm:
        s = llm.engine.parts.storage
        held = s.storage.kv.numel() * s.storage.kv.element_size() + s.depth.numel()
        assert llm.engine.stats().kv_cache_bytes == held <= 1 << 20
        assert held > (1 << 20) - llm.engine.kv.policy.device_bytes_per_block()
