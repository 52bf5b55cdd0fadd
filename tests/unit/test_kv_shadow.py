"""`shadow` (ShadowKV): low-rank keys rebuilt at their positions, landmark selection, outlier blocks read exactly,
the bytes it reports, and whole engines under continuous batching, chunked prefill, prefix caching and preemption."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ferry import LLM
from ferry.config import ModelConfig
from ferry.engine.options import engine_config
from ferry.errors import InvalidRequest
from ferry.kvcache.policies import KVShape, make_kv_policy
from ferry.models.layers.attention import AttnMetadata
from ferry.runner.kv.lowrank import rope_angles, rotate
from ferry.runner.kv.shadow import ShadowKV
from ferry.runner.kv.storage import BlockLayout
from tests.checkpoints import make_checkpoint, random_prompts
from tests.kv_engines import passkey_first_decode, run_greedy

CFG = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                             "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 10})  # K*Dh = 32
BS = 4


SHAPE = KVShape(1, 2, 16, BS, 4)


def shadow(rank: int | None = None, budget: float | None = None, shape: KVShape = SHAPE):
    return make_kv_policy("shadow", shape, budget=budget, sink_tokens=4, window_tokens=8, rank=rank)


def fake_model(w_k: torch.Tensor) -> SimpleNamespace:
    """What bind_model reads: each layer's fused qkv weight (k rows = w_k [K*Dh, D]) and input norm."""
    qkv = torch.randn(CFG.q_size + 2 * CFG.kv_size, CFG.hidden_size)
    qkv[CFG.q_size:CFG.q_size + CFG.kv_size] = w_k
    attn = SimpleNamespace(qkv=qkv, qkv_bias=None, k_norm=None)
    return SimpleNamespace(layers=[SimpleNamespace(attn=attn, input_norm=SimpleNamespace(weight=torch.ones(64)))])


def written_kv(w_k: torch.Tensor, rank: int, num_blocks: int = 8) -> tuple[ShadowKV, torch.Tensor]:
    """A ShadowKV bound to a model with key weights w_k, with num_blocks blocks of keys k = RoPE(w_k x) written
    at positions 0.. (block b holds positions b*BS..) and every block moved to the host block of the same id."""
    kv = ShadowKV(shadow(rank), BlockLayout(CFG, num_blocks, num_blocks, BS, torch.float32, torch.device("cpu")))
    kv.bind_model(fake_model(w_k))
    T = num_blocks * BS
    pos = torch.arange(T)
    keys = rotate((torch.randn(T, CFG.hidden_size) @ w_k.T).view(T, 2, 16), *rope_angles(pos, kv.inv_freq))
    meta = AttnMetadata(positions=pos, slot_mapping=pos, block_size=BS, num_decodes=0,
                        decode_block_tables=torch.zeros(0, 1, dtype=torch.long), decode_ctx_lens=torch.zeros(0))
    meta.kv_state = kv.begin_step(meta)
    kv.layers[0].write(keys, torch.randn(T, 2, 16), meta)
    kv.swap_out([(b, b) for b in range(num_blocks)])
    return kv, keys


def rebuilt(kv: ShadowKV, blocks: list[int]) -> torch.Tensor:
    ids = torch.tensor([blocks])
    keys, _ = kv.layers[0].host_kv(ids, ids, None, torch.device("cpu"))
    return keys[0]


def test_low_rank_keys_are_rebuilt_at_their_positions():
    torch.manual_seed(0)
    low = torch.randn(32, 4) @ torch.randn(4, 64)  # keys of rank 4
    kv, keys = written_kv(low, rank=4)
    want = torch.cat([keys[b * BS:(b + 1) * BS] for b in (2, 5)])
    err = (rebuilt(kv, [2, 5]) - want).norm() / want.norm()
    assert err < 1e-5  # rank-4 keys, rank-4 basis: exact up to float error, RoPE undone and redone
    full = torch.randn(32, 64)  # full-rank keys: rank 4 loses most of them, rank 32 (K*Dh) none
    kv, keys = written_kv(full, rank=4)
    assert (rebuilt(kv, [2, 5]) - torch.cat([keys[8:12], keys[20:24]])).norm() / keys[8:12].norm() > 0.3
    kv, keys = written_kv(full, rank=32)
    torch.testing.assert_close(rebuilt(kv, [2, 5]), torch.cat([keys[8:12], keys[20:24]]), atol=1e-4, rtol=1e-4)


def test_landmarks_pick_the_block_holding_the_needle():
    """Block 6's keys lean towards the query's direction (kv head 1): its landmark, the mean key, scores highest.
    Of top_k = 2, ceil(2 / 4) = 1 slot goes to the most scattered block (read exactly), the other to block 6."""
    torch.manual_seed(0)
    kv = ShadowKV(shadow(budget=0.5), BlockLayout(CFG, 12, 12, BS, torch.float32, torch.device("cpu")))
    kv.storage.kv.normal_()
    kv.storage.kv[0, 0, 6, :, 1, 3] += 4.0  # device block 6, every slot, kv head 1, channel 3
    kv.swap_out([(b, b) for b in range(12)])
    torch.testing.assert_close(kv.landmarks[0, 6], kv.storage.kv[0, 0, 6].mean(0))  # the mean post-RoPE key
    q = torch.zeros(4, 16)
    q[2:, 3] = 1.0  # query heads 2-3 (kv head 1) look for that direction
    idx, exact = kv.layers[0]._select(q[None], torch.arange(12), 2, 0.25)
    assert 6 in idx.tolist() and not exact[idx.tolist().index(6)]
    assert int(kv.outlier[0].argmax()) in idx.tolist()


def test_outlier_block_is_read_and_read_exactly():
    """A block whose keys point every way has a landmark that stands for none of them: it is read whatever its
    landmark scores, with its exact keys from host (here its coefficients are zeroed to show they are not used)."""
    torch.manual_seed(0)
    kv = ShadowKV(shadow(budget=0.5), BlockLayout(CFG, 16, 16, BS, torch.float32, torch.device("cpu")))
    kv.storage.kv[0, 0] = torch.randn(2, 16) * 0.1 + torch.ones(16)  # coherent keys: cosine ~1 to their mean
    kv.storage.kv[0, 0, 3] = torch.randn(BS, 2, 16) * 5  # block 3: scattered keys
    kv.swap_out([(b, b) for b in range(16)])
    assert int(kv.outlier[0].argmax()) == 3
    kv.index_coeffs[0, 3] = 0
    q = torch.ones(1, 4, 16)  # every landmark but block 3's scores high
    idx, exact = kv.layers[0]._select(q, torch.arange(16), 4, 0.25)  # ceil(4 / 4) = 1 outlier slot
    assert 3 in idx.tolist() and exact.tolist() == [i == 3 for i in idx.tolist()]
    ids = torch.tensor([[3, 4]])
    keys, values = kv.layers[0].host_kv(ids, ids, torch.tensor([[True, False]]), torch.device("cpu"))
    torch.testing.assert_close(keys[0, :BS], kv.storage.host[0, 0, 3])
    torch.testing.assert_close(values[0], kv.storage.host[0, 1, 3:5].flatten(0, 1))


def test_policy_bytes_and_options():
    p = shadow(rank=8)
    s = p.shape
    plain = 2 * s.block_size * s.num_kv_heads * s.head_dim * 4
    assert p.device_bytes_per_block() == plain + BS * 8 * 4  # K/V + the coefficients written beside them
    assert p.host_bytes_per_block() == plain  # exact K and V
    assert p.index_bytes_per_host_block() == BS * 8 * 4 + 2 * 16 * 4 + 4  # coefficients, landmark, outlier score
    assert shadow().rank == 4 and shadow(rank=999).rank == 32  # default K*Dh / 8, at most K*Dh
    # ferry-tiny in bfloat16 (4 layers, 2 kv heads of 64) holding 4096 tokens: sink + window + partial blocks on
    # device, every other block's index entry; fast-tier bytes per token are under a quarter of full attention's
    tiny = make_kv_policy("shadow", KVShape(4, 2, 64, 16, 2), budget=0.25)  # default sinks, window
    cold = len(tiny.cold_blocks(4096, 4096 // 16))
    fast = (4096 // 16 - cold) * tiny.device_bytes_per_block() + cold * tiny.index_bytes_per_host_block()
    assert cold == 247 and fast / 4096 / (tiny.shape.plain_block_bytes / 16) < 0.14
    assert engine_config("m", kv_policy="shadow", kv_budget=0.25, kv_rank=16).kv_options.rank == 16
    for kw in ({"kv_rank": 8}, {"kv_policy": "shadow", "kv_rank": 0}):
        with pytest.raises(InvalidRequest, match="kv_rank"):
            engine_config("m", **kw)


# -- whole engines -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama(tmp_ckpt_dir):
    return make_checkpoint("llama", tmp_ckpt_dir)


def _budget(path, num_blocks: int, rank: int | None, swap: int = 1 << 20) -> int:
    """kv_cache_memory for num_blocks device blocks beside the index of a swap-sized host pool."""
    cfg = ModelConfig.from_hf(path)
    p = shadow(rank, shape=KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 4, 4))
    return num_blocks * p.device_bytes_per_block() + swap // p.host_bytes_per_block() * p.index_bytes_per_host_block()


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_full_rank_reading_everything_matches_full_under_batching_and_preemption(llama, mode):
    """Budget = the whole context, rank = K*Dh: every cold block is read with keys rebuilt from its coefficients
    (exact up to float error) and must give full attention's tokens; a tight device budget forces chunked prefill,
    offloading, a prefix hit and preemption."""
    cfg = ModelConfig.from_hf(llama)
    rank = cfg.num_kv_heads * cfg.head_dim
    prompts = random_prompts(6, [60, 90, 75, 100, 64, 80], cfg.vocab_size, seed=3)
    prompts[4] = prompts[1][:64]  # a prefix hit
    want, _ = run_greedy(llama, prompts, kv_cache_memory="1M")
    got, engine = run_greedy(llama, prompts, kv_cache_memory=_budget(llama, 20, rank), preemption_mode=mode,
                       kv_policy="shadow", kv_budget=1.0, kv_rank=rank, kv_sink_tokens=4, kv_window_tokens=8,
                       swap_space="1M")
    assert got == want
    assert engine.kv.num_offloaded > 0 and engine.scheduler.num_preemptions > 0


def test_low_rank_small_budget_runs_under_swap_preemption(llama):
    cfg = ModelConfig.from_hf(llama)
    prompts = random_prompts(5, [60, 90, 75, 100, 64], cfg.vocab_size, seed=5)
    got, engine = run_greedy(llama, prompts, kv_cache_memory=_budget(llama, 20, None), preemption_mode="swap",
                       kv_policy="shadow", kv_budget=0.25, kv_sink_tokens=4, kv_window_tokens=8, swap_space="1M")
    assert [len(t) for t in got] == [10] * 5
    assert engine.kv.num_offloaded > 0 and engine.scheduler.num_preemptions > 0


def test_reported_kv_memory_is_the_tensors_and_within_budget(llama):
    with LLM(str(llama), dtype="float32", kv_cache_memory="1M", swap_space="1M", kv_policy="shadow") as llm:
        stats, kv, st = llm.engine.stats(), llm.engine.kv, llm.engine.parts.storage
        held = sum(t.numel() * t.element_size() for t in [st.storage.kv, *st.fast_index_tensors()])
        policy = kv.policy
        assert stats.kv_cache_bytes == held == (kv.pool.num_blocks * policy.device_bytes_per_block()
                                                + kv.host.num_blocks * policy.index_bytes_per_host_block())
        assert held <= 1 << 20 and held > (1 << 20) - policy.device_bytes_per_block()
        assert stats.kv_host_bytes == kv.host.num_blocks * policy.host_bytes_per_block() <= 1 << 20


def test_shadow_retrieves_the_passkey_on_ferry_tiny():
    """ferry-tiny at 1K tokens with a quarter of the context read per query, default rank (16 of K*Dh = 128): a
    block holding the passkey's digits (either mention) is among those picked by most layers' landmarks or outlier
    scores, and all the digits come out."""
    needle, first_step, correct = passkey_first_decode(kv_policy="shadow", kv_budget=0.25)
    assert all(1 <= b < 1024 // 16 - 8 for b in needle)  # in cold blocks
    assert sum(bool(needle & set(blocks)) for blocks in first_step) >= 2, (needle, first_step)
    assert correct
