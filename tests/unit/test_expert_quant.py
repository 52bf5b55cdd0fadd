"""Expert-wise bitwidth: int8 / int4 with group-wise scales, chosen per expert by measured sensitivity.
Lossy by design, so these tests bound the error instead of asking for exact tokens."""
from __future__ import annotations

import pytest
import torch

from ferry import LLM, SamplingParams
from ferry.config import ModelConfig
from ferry.errors import InvalidRequest
from ferry.experts.convert import convert_expert_store
from ferry.experts.layout import StoreIndex
from ferry.experts.policies import LRUPolicy
from ferry.experts.quant import QuantLayout, dequantize, quantizable, quantize
from ferry.experts.store import ExpertStore
from ferry.models.loader import load_model
from ferry.ops import quant as ops_quant
from ferry.ops.quant import pack_int4, unpack_int4
from tests.checkpoints import make_checkpoint, random_prompts
from tests.expert_stores import check_store_clean, make_store


@pytest.mark.parametrize("bits,bound", [(8, 0.01), (4, 0.2)])
def test_group_quantization_error_is_bounded(bits, bound):
    w = torch.randn(128, 96, generator=torch.Generator().manual_seed(0))
    codes, scales = quantize(w, bits, 32)
    assert codes.shape == (128, 96 * bits // 8)
    assert scales.shape == ((128,) if bits == 8 else (3, 128)) and scales.dtype == torch.bfloat16
    back = dequantize(codes, scales, bits, 32, torch.empty(128, 96))
    assert float((back - w).norm() / w.norm()) < bound


def test_int4_codes_round_trip_exactly():
    q = torch.randint(-7, 8, (64, 64), generator=torch.Generator().manual_seed(1)).float()
    q[:, ::32] = 7  # every group's max |w| maps to 7: scale 0.5 exactly
    codes, scales = quantize(q * 0.5, 4, 32)
    assert torch.equal(dequantize(codes, scales, 4, 32, torch.empty(64, 64)), q * 0.5)


def test_int4_packing_is_the_kernels_own():
    if not ops_quant.available():  # torch's int4 kernel reads another packing: ferry dequantizes instead
        pytest.skip(ops_quant.unavailable_reason())
    u = torch.randint(0, 16, (192, 96), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    packed = pack_int4(u)
    assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.int(), 1))
    assert torch.equal(unpack_int4(packed, 192, 96), u)


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_kernel_computes_the_dequantized_weight(bits):
    """The bf16 path (fused kernel on the stored bytes) and the float path (dequantize, then matmul) are the
    same weight: outputs agree to bf16 rounding."""
    gen = torch.Generator().manual_seed(3)
    gate_up, down = torch.randn(128, 64, generator=gen), torch.randn(64, 64, generator=gen)
    q = QuantLayout(bits, 32, 64, 64)
    slot = torch.frombuffer(bytearray(q.encode(gate_up, down)), dtype=torch.uint8)
    g, _ = q.weights(slot)
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    want = x.float() @ g.dequantize(torch.empty(128, 64)).T
    assert float((g(x).float() - want).abs().max()) < 0.02 * float(want.abs().max())
    assert q.record_nbytes < (128 * 64 + 64 * 64) * 2  # fewer bytes than the bf16 expert


def test_int4_refuses_shapes_the_kernel_cannot_pack():
    assert quantizable(4, 64, 32) is None
    assert "multiples of 64" in quantizable(4, 96, 32)
    assert quantizable(8, 96, 32) is None


@pytest.fixture(scope="module")
def stores(tmp_ckpt_dir):
    ckpt = make_checkpoint("qwen3_moe", tmp_ckpt_dir)
    out = {}
    for bits in ("8", "4", "auto"):
        out[bits] = tmp_ckpt_dir / f"qwen3_moe-int{bits}.experts"
        convert_expert_store(ckpt, out[bits], "float32", bits, int4_fraction=0.25)
    return ckpt, out


def test_convert_stores_the_chosen_bits_and_fewer_bytes(tmp_ckpt_dir, stores):
    ckpt, folders = stores
    _, dense = make_store("qwen3_moe", tmp_ckpt_dir)
    sizes = {b: StoreIndex.load(f).total_nbytes for b, f in folders.items()}
    assert sizes["4"] < sizes["8"] < StoreIndex.load(dense).total_nbytes
    bits = [r.bits for recs in StoreIndex.load(folders["auto"]).experts.values() for r in recs]
    assert bits.count(4) == 4 and bits.count(8) == 12  # a quarter of the 16 experts at int4
    with pytest.raises(InvalidRequest, match="expert bits"):
        convert_expert_store(ckpt, tmp_ckpt_dir / "x", "float32", "3")


@pytest.mark.parametrize("bits", ["8", "4", "auto"])
def test_store_serves_the_dequantized_experts(stores, bits):
    ckpt, folders = stores
    cfg = ModelConfig.from_hf(ckpt)
    resident = load_model(cfg, torch.float32, torch.device("cpu"), 64)
    shape = ([0, 1], 8, 2)
    index = StoreIndex.load(folders[bits])
    store = ExpertStore(folders[bits], cfg, torch.float32, 2 * index.slot_nbytes + 100_000, LRUPolicy(*shape))
    try:
        for layer in (0, 1):
            for i, g, d in store.weights(layer, list(range(8))):
                w_g, w_d = resident.layers[layer].mlp.experts.gate_up[i], resident.layers[layer].mlp.experts.down[i]
                q = QuantLayout(index.experts[layer][i].bits, index.layout.group_size, cfg.hidden_size,
                                cfg.moe.intermediate_size)
                want_g, want_d = q.unpack(torch.frombuffer(bytearray(q.encode(w_g, w_d)), dtype=torch.uint8),
                                          torch.empty_like(w_g), torch.empty_like(w_d))
                assert torch.equal(g, want_g) and torch.equal(d, want_d)
        check_store_clean(store, 2 * index.slot_nbytes + 100_000)
    finally:
        store.close()


def test_int8_store_generates_close_to_the_resident_model(stores):
    ckpt, folders = stores
    prompts = random_prompts(4, [3, 9, 17, 30], ModelConfig.from_hf(ckpt).vocab_size, seed=3)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run(**options):
        with LLM(str(ckpt), dtype="float32", kv_cache_memory="4M", **options) as llm:
            return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                                  use_tqdm=False)]
    want = run()
    got = run(expert_store=str(folders["8"]), expert_cache_memory=3 * StoreIndex.load(folders["8"]).slot_nbytes
              + 64 * 1024)
    first_tokens_equal = sum(g[0] == w[0] for g, w in zip(got, want))
    assert first_tokens_equal >= 3, (got, want)
