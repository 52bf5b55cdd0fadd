"""The roofline analysis' arithmetic against hand counts on a tiny config, the quantized weight bytes, the KV
policy's effect on bytes read, the prediction rule, and the hardware cache key."""
from __future__ import annotations

import pytest

from ferry.config import ModelConfig
from ferry.roofline.analysis import Workload, decode_weight_bytes, kv_policy, operators, predict
from ferry.roofline.hardware import HardwareProfile, cache_key, cache_path

# D=64, H=4 heads of Dh=16, K=2 kv heads, I=128, L=2, V=100
HF = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=100, rms_norm_eps=1e-5,
          max_position_embeddings=256, hidden_act="silu", tie_word_embeddings=False)
HW = HardwareProfile(cpu="fake", isa="portable", threads=1, torch="x", read_gbs=10.0,
                     peak_gflops={"float32": 100.0, "bfloat16": 200.0}, bf16_native=False, dispatch_us=1.0,
                     call_us=0.5)


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig.from_dict(HF, "tiny")


def by_name(ops):
    return {op.name: op for op in ops}


def test_decode_linears_and_attention_match_hand_counts(cfg):
    w = Workload("decode", batch_size=3, kv_len=9, dtype="float32")  # each query sees 10 tokens
    ops = by_name(operators(cfg, w))
    qkv = ops["qkv_proj"]  # [3, 64] @ [64 + 2*32, 64]^T in each of 2 layers
    assert qkv.flops == 2 * 2 * 3 * 64 * 128
    assert qkv.weight_bytes == 2 * 64 * 128 * 4
    assert qkv.act_bytes == 2 * 3 * (64 + 128) * 4
    att = ops["attention"]  # 3 queries x 10 keys x 4 heads x (2 * 2 * 16 + 5 softmax) per layer
    assert att.flops == 2 * 3 * 10 * 4 * (4 * 16 + 5)
    # K and V of 2 kv heads x 16 dims x 4 bytes per token: read 10 tokens, write 1, per request and layer
    assert att.kv_bytes == 2 * 3 * 11 * (2 * 2 * 16 * 4)
    head = ops["lm_head"]  # only the 3 sampled rows; float32 logits out
    assert head.flops == 2 * 3 * 64 * 100 and head.weight_bytes == 64 * 100 * 4
    assert head.act_bytes == 3 * (64 * 4 + 100 * 4)


def test_prefill_attention_is_causal_and_linears_see_every_token(cfg):
    w = Workload("prefill", batch_size=2, prompt_len=4, dtype="bfloat16")
    ops = by_name(operators(cfg, w))
    assert ops["gate_up"].flops == 2 * 2 * (2 * 4) * 64 * 256  # 2 layers, 8 tokens
    assert ops["gate_up"].weight_bytes == 2 * 64 * 256 * 2  # bfloat16
    pairs = 2 * (1 + 2 + 3 + 4)  # per layer: 2 prompts, token i sees i + 1 keys
    assert ops["attention"].flops == 2 * pairs * 4 * (4 * 16 + 5)


def test_quantization_changes_only_weight_bytes(cfg):
    base = by_name(operators(cfg, Workload("decode", dtype="bfloat16")))
    int8 = by_name(operators(cfg, Workload("decode", dtype="bfloat16", quantization="int8")))
    int4 = by_name(operators(cfg, Workload("decode", dtype="bfloat16", quantization="int4", group_size=32)))
    n = 2 * 64 * 128  # qkv weights over 2 layers, 64 inputs each
    assert base["qkv_proj"].weight_bytes == n * 2
    assert int8["qkv_proj"].weight_bytes == pytest.approx(n * (1 + 2 / 64))  # a float16 scale per output row
    assert int4["qkv_proj"].weight_bytes == pytest.approx(n * (0.5 + 2 / 32))  # a float16 scale per 32 inputs
    for q in (int8, int4):
        assert q["qkv_proj"].flops == base["qkv_proj"].flops and q["qkv_proj"].act_bytes == base["qkv_proj"].act_bytes
        assert q["attention"] == base["attention"]
    assert decode_weight_bytes(cfg, "bfloat16", "int4") < decode_weight_bytes(cfg, "bfloat16", "int8") \
        < decode_weight_bytes(cfg, "bfloat16")


def test_the_kv_policy_sets_the_kv_bytes_read(cfg):
    w = Workload("decode", batch_size=1, kv_len=63, dtype="float32")
    full = by_name(operators(cfg, w))["attention"].kv_bytes
    int8 = by_name(operators(cfg, w, kv_policy(cfg, "int8", dtype="float32")))["attention"].kv_bytes
    assert int8 == pytest.approx(full * (16 + 4) / (16 * 4))  # Dh int8 bytes + a float32 scale vs Dh float32
    spans = kv_policy(cfg, "spans", dtype="float32")
    assert spans.read_tokens(64) <= 64  # the analysis reads what the policy says a query reads
    read = spans.read_tokens(64)
    kv = by_name(operators(cfg, w, spans))["attention"].kv_bytes
    assert kv == pytest.approx(2 * (read + 1) * spans.device_bytes_per_block() / 16 / 2)


def test_prediction_is_the_larger_of_memory_and_compute_plus_dispatch(cfg):
    preds = {p.op.name: p for p in predict(operators(cfg, Workload("prefill", batch_size=4, prompt_len=64)), HW)}
    p = preds["gate_up"]
    assert p.memory_s == pytest.approx(p.op.bytes / 10e9)
    assert p.compute_s == pytest.approx(p.op.flops / 100e9)
    assert p.time_s == pytest.approx(max(p.memory_s, p.compute_s) + (p.op.calls * 1.0 + p.op.serial_calls * 0.5) * 1e-6)
    assert p.op.calls == 2 and p.op.serial_calls == 0  # a linear per layer, on the thread pool
    assert p.bound == "compute"  # 256 tokens: ~64 FLOPs per weight byte, past this profile's ridge of 10
    d = {q.op.name: q for q in predict(operators(cfg, Workload("decode", batch_size=1)), HW)}["gate_up"]
    assert d.op.intensity < 1 and d.memory_s > d.compute_s
    norm = {q.op.name: q for q in predict(operators(cfg, Workload("decode", batch_size=1)), HW)}["attn_norm"]
    assert (norm.op.calls, norm.op.serial_calls) == (0, 2) and norm.overhead_s == pytest.approx(2 * 0.5e-6)


def test_bad_workloads_are_refused():
    with pytest.raises(ValueError, match="phase"):
        Workload("train")
    with pytest.raises(ValueError, match="quantization"):
        Workload("decode", quantization="int3")


def test_cache_key_follows_what_the_measurement_depends_on(monkeypatch, tmp_path):
    flags = frozenset({"avx2", "fma"})
    key = cache_key("cpu A", "avx2", flags, 2, "2.5")
    assert key == cache_key("cpu A", "avx2", set(flags), 2, "2.5")
    others = [cache_key("cpu B", "avx2", flags, 2, "2.5"), cache_key("cpu A", "portable", flags, 2, "2.5"),
              cache_key("cpu A", "avx2", flags | {"avx512f"}, 2, "2.5"), cache_key("cpu A", "avx2", flags, 1, "2.5"),
              cache_key("cpu A", "avx2", flags, 2, "2.6")]
    assert key not in others and len(set(others)) == len(others)
    monkeypatch.setenv("FERRY_CACHE_DIR", str(tmp_path))
    assert cache_path(key) == tmp_path / "roofline" / f"hardware-{key}.json"


def test_profile_round_trips_through_json():
    assert HardwareProfile.from_json(HW.to_json()) == HW
    assert HW.peak("int8") == HW.peak("float32")  # an unmeasured format falls back to float32's peak


def test_a_float_linear_is_bounded_by_the_engines_linear_at_its_rows(cfg):
    """With measured rates by rows, a linear's compute time uses the rate at its own rows (interpolated in
    log(rows)); elementwise operators, and profiles without the table, keep the GEMM peak."""
    table = {"float32": {"1": 10.0, "16": 50.0, "256": 90.0}}  # as JSON stores it: string keys
    hw = HardwareProfile.from_json({**HW.to_json(), "linear_gflops": table})
    assert hw.peak("float32", 16) == 50e9 and hw.peak("float32", 4) == pytest.approx(30e9)  # log2: 1/2 way
    assert hw.peak("float32", 1000) == 90e9 and hw.peak("float32") == 100e9 and hw.peak("bfloat16", 16) == 200e9
    w = Workload("decode", batch_size=16, kv_len=9, dtype="float32")
    ops = by_name(operators(cfg, w))
    with_table = {p.op.name: p for p in predict(list(ops.values()), hw)}
    plain = {p.op.name: p for p in predict(list(ops.values()), HW)}
    assert ops["gate_up"].rows == 16
    assert with_table["gate_up"].compute_s == pytest.approx(ops["gate_up"].flops / 50e9)
    assert plain["gate_up"].compute_s == pytest.approx(ops["gate_up"].flops / 100e9)
    assert with_table["act"].compute_s == plain["act"].compute_s  # not a linear: the GEMM peak


def test_a_few_row_linear_reads_its_weight_at_the_streamed_cost(cfg):
    """Where the profile timed the engine's linear streaming weights (per call, per byte), a linear over that many
    rows costs its weight bytes at the per-byte cost and its calls at the per-call cost; more rows than were timed
    fall back to bandwidth and peak."""
    stream = {"float32": {"1": [20.0, 0.05], "16": [40.0, 0.1]}}  # us per call, ns per byte (JSON: string keys)
    hw = HardwareProfile.from_json({**HW.to_json(), "linear_stream": stream})
    assert hw.streamed("float32", 4) == pytest.approx((30e-6, 0.075e-9)) and hw.streamed("float32", 32) is None
    assert hw.streamed("bfloat16", 4) is None
    one = by_name(operators(cfg, Workload("decode", batch_size=1, kv_len=9, dtype="float32")))["down"]
    (p,) = predict([one], hw)
    assert p.memory_s == pytest.approx(one.weight_bytes * 0.05e-9 + one.act_bytes / 10e9)
    assert p.overhead_s == pytest.approx(one.calls * 20e-6)
    wide = by_name(operators(cfg, Workload("decode", batch_size=64, kv_len=9, dtype="float32")))["down"]
    (q,) = predict([wide], hw)
    assert q.memory_s == pytest.approx(wide.bytes / 10e9) and q.overhead_s == pytest.approx(wide.calls * 1e-6)


def test_elementwise_operators_move_their_bytes_at_the_measured_vector_rate(cfg):
    hw = HardwareProfile.from_json({**HW.to_json(), "vector_gbs": {"bfloat16": 2.0}})
    ops = by_name(operators(cfg, Workload("prefill", batch_size=4, prompt_len=32, dtype="bfloat16")))
    act, gate_up = predict([ops["act"]], hw)[0], predict([ops["gate_up"]], hw)[0]
    assert ops["act"].kind == "vector" and act.memory_s == pytest.approx(ops["act"].bytes / 2e9)
    assert gate_up.memory_s == pytest.approx(ops["gate_up"].bytes / 10e9)  # a linear: the read bandwidth


def test_attention_costs_the_measured_time_per_request_and_layer(cfg):
    hw = HardwareProfile.from_json({**HW.to_json(), "attention_us": {"float32": {"decode": 30.0, "prefill": 200.0}}})
    for phase, us in (("decode", 30.0), ("prefill", 200.0)):
        att = by_name(operators(cfg, Workload(phase, batch_size=3, prompt_len=8, kv_len=9)))["attention"]
        assert att.requests == 3 * 2 and predict([att], hw)[0].overhead_s == pytest.approx(6 * us * 1e-6)
        assert predict([att], HW)[0].overhead_s == pytest.approx(att.calls * 1e-6 + att.serial_calls * 0.5e-6)
