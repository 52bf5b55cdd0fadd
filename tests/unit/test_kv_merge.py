"""`merge` (MiniCache): the pair layout, exact reconstruction of parallel vectors, retention of distinct pairs,
bytes reported = bytes held, and whole engines under batching, chunked prefill, prefix caching and preemption."""
from __future__ import annotations

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.engine.options import engine_config
from ferry.errors import InvalidRequest
from ferry.kvcache.policies import KVShape, make_kv_policy
from ferry.kvcache.policies.merge import merge_pairs
from ferry.runner.kv.full import PagedLayer
from ferry.runner.kv.merge import MergeKV, MergeLayer, rank_in_block
from ferry.runner.kv.storage import BlockLayout
from tests.checkpoints import make_checkpoint, random_prompts

BS, K, DH = 4, 2, 8


def model_cfg(num_layers: int = 4) -> ModelConfig:
    return ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 32, "num_attention_heads": 4,
                                  "num_key_value_heads": K, "num_hidden_layers": num_layers, "vocab_size": 10})


def merge_policy(num_layers: int = 4, angle: float = 30.0, retain: float = 0.5, dtype: torch.dtype = torch.float32):
    shape = KVShape(num_layers, K, DH, BS, torch.empty(0, dtype=dtype).element_size())
    return make_kv_policy("merge", shape, merge_angle=angle, merge_retain=retain)


def merge_kv(num_blocks: int = 6, num_layers: int = 4, angle: float = 30.0, retain: float = 0.5,
             dtype: torch.dtype = torch.float32) -> MergeKV:
    policy = merge_policy(num_layers, angle, retain, dtype)
    return MergeKV(policy, BlockLayout(model_cfg(num_layers), num_blocks, 2, BS, dtype, torch.device("cpu")))


def write_pair(kv: MergeKV, k1, v1, k2, v2, slots) -> None:
    kv.layers[2].write(k1, v1, torch.tensor(slots))
    kv.layers[3].write(k2, v2, torch.tensor(slots))


def test_pairs_start_at_the_middle_layer():
    assert merge_pairs(4) == [(2, 3)]
    assert merge_pairs(24)[0] == (12, 13) and merge_pairs(24)[-1] == (22, 23)
    assert merge_pairs(5) == [(2, 3)]  # layer 4 stays exact
    kv = merge_kv(num_layers=5)
    assert [type(l) for l in kv.layers] == [PagedLayer, PagedLayer, MergeLayer, MergeLayer, PagedLayer]


def test_parallel_vectors_reconstruct_exactly_and_share_one_direction():
    torch.manual_seed(0)
    kv = merge_kv(angle=30.0, retain=0.0)  # no kept slots at all: everything merges
    d = torch.randn(6, K, DH)
    k1, k2 = d * 2.0, d * 0.5  # same direction, different lengths
    v1, v2 = -d, -d * 3.0
    write_pair(kv, k1, v1, k2, v2, range(4, 10))  # blocks 1 and 2
    ids = torch.tensor([1, 2])
    for layer, (k, v) in ((2, (k1, v1)), (3, (k2, v2))):
        rk, rv = kv.layers[layer].read(ids)
        torch.testing.assert_close(rk[:6], k, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rv[:6], v, atol=1e-5, rtol=1e-5)
    assert kv.num_retained == 0 and kv.num_merged == 2 * 6 * K


def test_distinct_pairs_are_retained_exactly_and_similar_ones_merged():
    torch.manual_seed(1)
    kv = merge_kv(angle=30.0, retain=0.5)  # 2 kept slots per block and head
    a = torch.randn(4, K, DH)
    b = a + 0.01 * torch.randn(4, K, DH)  # nearly parallel: merged
    b[1] = torch.randn(K, DH)  # random in 8 dims: far apart
    b[3] = -a[3]  # opposite: 180 degrees, the most distinct
    write_pair(kv, a, a, b, b, range(8, 12))  # block 2, one write
    slot = kv.pair_tensors[3][0, 2, 0]  # [bs, K] for K
    assert (slot[[0, 2]] == -1).all() and (slot[[1, 3]] >= 0).all()
    for layer, x in ((2, a), (3, b)):
        rk, _ = kv.layers[layer].read(torch.tensor([2]))
        torch.testing.assert_close(rk[[1, 3]], x[[1, 3]], atol=1e-6, rtol=1e-6)  # retained: both layers exact
        assert not torch.allclose(rk[[0, 2]], x[[0, 2]], atol=1e-6)  # merged: close, not exact
        torch.testing.assert_close(rk[[0, 2]], x[[0, 2]], atol=0.05, rtol=0.05)


def test_retention_is_capped_per_block_most_distinct_first_and_later_writes_take_free_slots():
    kv = merge_kv(angle=10.0, retain=0.25)  # one kept slot per block and head
    a = torch.zeros(4, K, DH)
    a[..., 0] = 1.0
    b = torch.zeros(4, K, DH)
    angles = torch.tensor([40.0, 120.0, 80.0, 5.0])  # token 1 is the most distinct
    b[..., 0] = torch.cos(torch.deg2rad(angles))[:, None]
    b[..., 1] = torch.sin(torch.deg2rad(angles))[:, None]
    write_pair(kv, a[:2], a[:2], b[:2], b[:2], [0, 1])  # first write: tokens 0, 1 of block 0
    write_pair(kv, a[2:], a[2:], b[2:], b[2:], [2, 3])  # second write: its one slot is taken already
    slot = kv.pair_tensors[3][0, 0, 0, :, 0]
    assert slot.tolist() == [-1, 0, -1, -1]
    write_pair(kv, a[:2], a[:2], b[:2], b[:2], [4, 5])  # block 1, fresh: token 1 again wins its slot
    assert kv.pair_tensors[3][0, 1, 0, :2, 0].tolist() == [-1, 0]
    write_pair(kv, a[:2], a[:2], b[:2], b[:2], [0, 1])  # block 0 reused from offset 0: its old slots are free
    assert kv.pair_tensors[3][0, 0, 0, :2, 0].tolist() == [-1, 0]


def test_rank_in_block_orders_by_angle_within_each_block():
    b = torch.tensor([3, 3, 3, 7, 7])
    angle = torch.tensor([[0.1], [0.9], [0.5], [0.2], [0.3]])
    want = torch.tensor([[True], [True], [False], [True], [True]])
    assert rank_in_block(b, angle, want)[:, 0][want[:, 0]].tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reported_bytes_are_the_tensor_bytes_and_smaller_than_full(dtype):
    kv, policy = merge_kv(num_blocks=7, num_layers=5, dtype=dtype), merge_policy(num_layers=5, dtype=dtype)
    assert kv.nbytes == 7 * policy.device_bytes_per_block()
    assert kv.host_nbytes == 2 * policy.host_bytes_per_block()
    shape = KVShape(24, 2, 64, 16, 2)  # Qwen2.5-0.5B-like, bf16
    merge = make_kv_policy("merge", shape)
    full = make_kv_policy("full", shape)
    ratio = merge.pair_bytes_per_block() / (2 * full.device_bytes_per_block() / 24)
    assert 0.59 < ratio < 0.6  # a pair: one layer (50%) + magnitudes (3%) + 2 kept slots of 16 (6%) + map (0.4%)
    assert 0.79 < merge.device_bytes_per_block() / full.device_bytes_per_block() < 0.81  # half the layers paired


def test_swap_roundtrip_keeps_every_tensor():
    torch.manual_seed(2)
    kv = merge_kv(num_blocks=4)
    x = torch.randn(4, K, DH)
    for l in range(4):
        kv.layers[l].write(x * (l + 1), x, torch.arange(4)) if l >= 2 else None
    before = [t.clone() for t in kv.pair_tensors]
    kv.swap_out([(0, 1)])
    for t in kv.pair_tensors:
        t[:, 0] = 0
    kv.swap_in([(1, 3)])
    for t, b in zip(kv.pair_tensors, before):
        assert torch.equal(t[:, 3], b[:, 0])


def test_bad_merge_options_are_one_line_errors():
    with pytest.raises(InvalidRequest, match="kv_merge_retain does not apply to kv_policy=full"):
        engine_config("m", kv_merge_retain=0.5)
    with pytest.raises(InvalidRequest, match="kv_merge_retain must be"):
        engine_config("m", kv_policy="merge", kv_merge_retain=2)
    assert engine_config("m", kv_policy="merge", kv_merge_angle="45").kv_options.merge_angle == 45.0


# -- whole engines -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_ckpt_dir):
    return make_checkpoint("llama", tmp_ckpt_dir)


def _run(path, prompts, max_tokens=10, **kw):
    with LLM(str(path), dtype="float32", max_num_batched_tokens=48, max_num_seqs=4, block_size=4, **kw) as llm:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        assert llm.engine.kv.all_free and not llm.engine.scheduler.has_unfinished
        return [o.outputs[0].token_ids for o in outs], llm.engine


def test_merge_with_everything_retained_matches_full(llama):
    """Angle 0 and one kept slot per token: every pair is retained, so merge must equal full attention."""
    vocab = ModelConfig.from_hf(llama).vocab_size
    prompts = random_prompts(3, [30, 45, 20], vocab, seed=7)
    want, _ = _run(llama, prompts, kv_cache_memory="1M")
    got, _ = _run(llama, prompts, kv_cache_memory="1M", kv_policy="merge", kv_merge_angle=0.0, kv_merge_retain=1.0)
    assert got == want


def merge_bytes(path, num_blocks: int, **cfg) -> int:
    m = ModelConfig.from_hf(path)
    shape = KVShape(m.num_layers, m.num_kv_heads, m.head_dim, 4, 4)
    return num_blocks * make_kv_policy("merge", shape, **cfg).device_bytes_per_block()


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_merge_layout_survives_chunking_prefix_hits_and_preemption(llama, mode):
    """A tight budget (chunked prefill, prefix hits, preemption, block reuse): with every pair retained merge is
    exactly full attention, so any slot collision, stale slot count or lost swap would change tokens; lossy
    settings run to completion with every block back and most greedy tokens unchanged from a roomy run."""
    vocab = ModelConfig.from_hf(llama).vocab_size
    prompts = random_prompts(6, [60, 90, 75, 100, 64, 80], vocab, seed=3)
    prompts[4] = prompts[1][:64]  # a prefix hit
    want, _ = _run(llama, prompts, kv_cache_memory="1M")
    exact = {"merge_angle": 0.0, "merge_retain": 1.0}
    got, engine = _run(llama, prompts, kv_cache_memory=merge_bytes(llama, 40, **exact), preemption_mode=mode,
                       swap_space="1M", kv_policy="merge", kv_merge_angle=0.0, kv_merge_retain=1.0)
    assert engine.scheduler.num_preemptions > 0 and got == want
    lossy = {"merge_angle": 20.0, "merge_retain": 0.25}
    roomy, _ = _run(llama, prompts, kv_cache_memory="1M", kv_policy="merge", kv_merge_angle=20.0, kv_merge_retain=0.25)
    got, engine = _run(llama, prompts, kv_cache_memory=merge_bytes(llama, 40, **lossy), preemption_mode=mode,
                       swap_space="1M", kv_policy="merge", kv_merge_angle=20.0, kv_merge_retain=0.25)
    assert engine.scheduler.num_preemptions > 0
    assert engine.parts.storage.num_retained > 0 and engine.parts.storage.num_merged > 0
    # chunk boundaries change which tokens of a chunk see layer l's own K/V exactly and which win a kept slot first
    assert sum(a[:3] == b[:3] for a, b in zip(got, roomy)) >= 4


def test_engine_reports_the_merge_tensors_within_budget(llama):
    with LLM(str(llama), dtype="float32", kv_cache_memory="1M", swap_space="1M", kv_policy="merge") as llm:
        storage = llm.engine.parts.storage
        held = sum(t.numel() * t.element_size() for t in [storage.exact, *storage.pair_tensors])
        stats = llm.engine.stats()
        assert stats.kv_cache_bytes == held <= 1 << 20
        assert held > (1 << 20) - llm.engine.kv.policy.device_bytes_per_block()
        full = make_kv_policy("full", llm.engine.kv.policy.shape)
        full_blocks = (1 << 20) // full.device_bytes_per_block()
        assert llm.engine.kv.pool.num_blocks > full_blocks  # the same budget buys more blocks
