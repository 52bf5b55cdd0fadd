"""Per-operator roofline of one engine step, as LLM-Viewer's analyzer counts it (FLOPs, bytes loaded and stored:
weights, activations, KV) but for ferry's own operators: fused q/k/v and gate/up, attention in float32 over the
paged KV (decode reads each request's KV through the KV policy; prefill is causal over the prompt), logits only
for the rows that sample.

Legend: T tokens in the step (decode: B, prefill: B * P), B requests, P prompt tokens each, C context a decode
query sees (kv_len + 1), R tokens it reads (the KV policy's budget), D hidden, I intermediate, H / K query / kv
heads, Dh head dim, V vocabulary, E experts, A experts per token, L layers.

Predicted time of an operator = max(bytes / bandwidth, FLOPs / peak) + its calls x the measured cost of one (a
call on the thread pool, e.g. a linear, costs the pool's wake-up and barrier; a small single-threaded one, e.g. a
decode row's norm, only the Python dispatch); a step is the sum. A float linear's peak is what the engine's own
linear reached over that many rows of x on this machine (HardwareProfile.linear_gflops: a decode kernel over 16
rows does not run at a large GEMM's peak), where the profile has it; over the few rows where the profile also
timed it streaming weights from DRAM (HardwareProfile.linear_stream), its weight is read at that measured cost per
byte and per call (a decode kernel's reads, compute and ramp-up overlap in ways bandwidth and peak alone do not
predict); an elementwise operator moves its bytes at the rate the engine's own elementwise kernels reached
(HardwareProfile.vector_gbs); attention costs, per request (decode) or prompt (prefill) and layer, what the
engine's attention took for one at small sizes (HardwareProfile.attention_us), where its calls and per-request
work, not bytes or FLOPs, set the time. Approximations, said once: each byte is counted once per step (K/V of a
prefill's attention are re-read per query block from cache, not DRAM), the routed experts of a MoE layer are the
expected number of distinct experts T tokens pick if routing were uniform, int8/int4 weights are costed at the
bfloat16 GEMM peak (weight-only: activations stay in float), elementwise operators at the float32 peak."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ferry.config import ModelConfig
from ferry.kvcache.policies import KV_POLICIES
from ferry.kvcache.policies.base import KVOptions, KVPolicy, KVShape

if TYPE_CHECKING:  # the analysis itself needs no torch
    from ferry.roofline.hardware import HardwareProfile

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
QUANTIZATIONS = ("none", "int8", "int4")
SCALE_BYTES = 2  # one float16 scale per group of a quantized weight's inputs (ferry/ops/quant.py)
POOL_ROWS = 16  # an elementwise kernel over this many token rows or more runs on the thread pool (fewer: one thread)


@dataclass(frozen=True)
class Workload:
    """One step: `phase` decode (each of B requests computes one token over kv_len cached ones) or prefill (each of
    B requests computes its P prompt tokens at once, causally)."""

    phase: str
    batch_size: int = 1
    prompt_len: int = 128
    kv_len: int = 128
    dtype: str = "float32"
    quantization: str = "none"
    group_size: int | None = None  # int4: inputs per scale (default 32); int8: default per output channel

    def __post_init__(self) -> None:
        if self.phase not in ("decode", "prefill"):
            raise ValueError(f"phase must be decode or prefill, got {self.phase!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if min(self.batch_size, self.prompt_len) < 1 or self.kv_len < 0:
            raise ValueError("batch_size and prompt_len must be >= 1 and kv_len >= 0")

    @property
    def num_tokens(self) -> int:
        return self.batch_size if self.phase == "decode" else self.batch_size * self.prompt_len

    @property
    def act_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class OpCost:
    """One operator of a step, summed over the layers it runs in."""

    name: str
    flops: float
    weight_bytes: float
    act_bytes: float  # activations read + written
    kv_bytes: float  # KV read + written
    peak: str  # which measured peak bounds its compute: a dtype of HardwareProfile.peak_gflops
    calls: int  # kernel calls on the thread pool in the step (each costs HardwareProfile.dispatch_us at least)
    serial_calls: int = 0  # small single-threaded calls (each costs HardwareProfile.call_us at least; views free)
    rows: int = 0  # a float linear's rows of x: its compute is bounded by the engine's linear at that many rows
    kind: str = ""  # "vector" (elementwise: bytes at the engine's measured vector rate), "decode" / "prefill"
    # (attention: per request and layer at the engine's measured attention cost), "" (the rest)
    dtype: str = ""  # the data dtype of a vector or attention operator
    requests: int = 0  # attention: (request, layer) pairs it runs

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.act_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte moved."""
        return self.flops / self.bytes if self.bytes else float("inf")

    def __add__(self, other: "OpCost") -> "OpCost":
        return replace(self, flops=self.flops + other.flops, weight_bytes=self.weight_bytes + other.weight_bytes,
                       act_bytes=self.act_bytes + other.act_bytes, kv_bytes=self.kv_bytes + other.kv_bytes,
                       calls=self.calls + other.calls, serial_calls=self.serial_calls + other.serial_calls)


@dataclass(frozen=True)
class Prediction:
    op: OpCost
    memory_s: float
    compute_s: float
    overhead_s: float

    @property
    def bound(self) -> str:
        if self.overhead_s > max(self.memory_s, self.compute_s):
            return "overhead"
        return "memory" if self.memory_s >= self.compute_s else "compute"

    @property
    def time_s(self) -> float:
        return max(self.memory_s, self.compute_s) + self.overhead_s


def weight_bytes_per_element(dtype: str, quantization: str, in_features: int, group_size: int | None = None) -> float:
    """Bytes one weight costs: the dtype's width, or int8 (1 byte) / int4 (half a byte) plus a float16 scale per
    group of inputs (int8 default: one group per output channel; int4 default: 32 inputs)."""
    if quantization == "none":
        return DTYPE_BYTES[dtype]
    if quantization == "int8":
        return 1 + SCALE_BYTES / (group_size or in_features)
    return 0.5 + SCALE_BYTES / (group_size or 32)


def kv_policy(cfg: ModelConfig, name: str = "full", options: KVOptions | None = None, dtype: str = "float32",
              block_size: int = 16) -> KVPolicy:
    """The scheduler half of KV policy `name` for this model (its bytes per block and read budget)."""
    if name not in KV_POLICIES:
        raise ValueError(f"unknown KV policy {name!r}; known: {', '.join(KV_POLICIES)}")
    cls = KV_POLICIES[name]
    shape = KVShape(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, block_size, DTYPE_BYTES[dtype])
    return cls(options or cls.Options(), shape)


def linear_cost(name: str, T: int, n_in: int, n_out: int, w: Workload, layers: int = 1,
                out_bytes: int | None = None) -> OpCost:
    """x [T, n_in] @ W[n_out, n_in]^T: the weight read once, x read, the output written (LLM-Viewer's linear)."""
    wb = weight_bytes_per_element(w.dtype, w.quantization, n_in, w.group_size)
    peak = w.dtype if w.quantization == "none" else "bfloat16"
    ob = w.act_bytes if out_bytes is None else out_bytes
    return OpCost(name, layers * 2.0 * T * n_in * n_out, layers * wb * n_in * n_out,
                  layers * T * (n_in * w.act_bytes + n_out * ob), 0.0, peak, layers,
                  rows=T if w.quantization == "none" else 0)


def _vector(name: str, flops: float, act_bytes: float, calls: int, weight_bytes: float = 0.0,
            rows: int = 0, dtype: str = "float32") -> OpCost:
    """An elementwise operator over `rows` token rows of `dtype` data: on the thread pool from POOL_ROWS rows,
    else one thread."""
    pooled = rows >= POOL_ROWS
    return OpCost(name, flops, weight_bytes, act_bytes, 0.0, "float32", calls if pooled else 0,
                  0 if pooled else calls, kind="vector", dtype=dtype)


def operators(cfg: ModelConfig, w: Workload, policy: KVPolicy | None = None) -> list[OpCost]:
    """Every operator of one step, in execution order, each summed over its layers."""
    policy = policy or kv_policy(cfg, dtype=w.dtype)
    T, B, L, D, ab = w.num_tokens, w.batch_size, cfg.num_layers, cfg.hidden_size, w.act_bytes
    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    moe_layers = sum(cfg.moe.sparse_layers) if cfg.moe else 0
    dense_layers = L - moe_layers
    ops = [
        _vector("embedding", 0.0, 2.0 * T * D * ab, 1, dtype=w.dtype),
        _vector("attn_norm", L * 7.0 * T * D, L * 4.0 * T * D * ab, L, L * D * ab, T, w.dtype),  # read 2, write 2
        linear_cost("qkv_proj", T, D, cfg.q_size + 2 * cfg.kv_size, w, L),
        _vector("rotary", L * 3.0 * T * (H + K) * Dh, L * (4.0 * T * (H + K) * Dh + 2.0 * T * Dh) * ab, 2 * L,
                rows=T, dtype=w.dtype),
        attention_cost(cfg, w, policy),
        linear_cost("o_proj", T, cfg.q_size, D, w, L),
        _vector("mlp_norm", L * 7.0 * T * D, L * 4.0 * T * D * ab, L, L * D * ab, T, w.dtype),
    ]
    if dense_layers:
        inter = cfg.intermediate_size
        ops += [linear_cost("gate_up", T, D, 2 * inter, w, dense_layers),
                _vector("act", dense_layers * 5.0 * T * inter, dense_layers * 3.0 * T * inter * ab, dense_layers,
                        rows=T, dtype=w.dtype),
                linear_cost("down", T, inter, D, w, dense_layers)]
    if moe_layers:
        ops += moe_costs(cfg, w, moe_layers)
    S = B  # rows that sample: each request's last token
    # a quantized model's head is int8 per channel whatever --quantization (ferry/quant/model.py's default)
    head = linear_cost("lm_head", S, D, cfg.vocab_size, w if w.quantization == "none" else
                       replace(w, quantization="int8"), out_bytes=4)
    ops += [_vector("final_norm", 7.0 * S * D, 2.0 * S * D * ab, 1, D * ab, dtype=w.dtype),
            replace(head, serial_calls=1),
            _vector("sampling", 5.0 * S * cfg.vocab_size, 2.0 * S * cfg.vocab_size * 4, 8)]
    return ops


def attention_cost(cfg: ModelConfig, w: Workload, policy: KVPolicy) -> OpCost:
    """Scores and values over the KV (float32 math), this step's K/V written into the cache. Decode: each query
    reads R = policy.read_tokens(C) tokens (a sliding window caps it); prefill: causal over its own prompt."""
    H, K, Dh, L = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    kv_token = policy.device_bytes_per_block() / policy.shape.block_size / L  # K + V (+ scales) of a token, a layer
    flops = act = kv = 0.0
    windows = cfg.sliding_windows or (None,) * L
    for window in windows:
        if w.phase == "decode":
            ctx = w.kv_len + 1
            read = min(policy.read_tokens(ctx), window or ctx)
            pairs = w.batch_size * read  # (query, key) pairs
            kv += w.batch_size * (read + 1) * kv_token  # reads R, writes the new token's
            pool, serial = 1, 3  # the paged decode kernel; K/V written (2), its output copied into place
        else:
            P = w.prompt_len
            span = P if window is None else min(P, window)
            pairs = w.batch_size * sum(min(i + 1, span) for i in range(P)) if window else w.batch_size * P * (P + 1) / 2
            kv += w.batch_size * P * (kv_token + 2 * K * Dh * 4)  # written to the cache; read as float32 copies
            # per prompt one SDPA call and its output copied back; K/V written, q/k/v to float32 per prompt
            pool, serial = 2 * w.batch_size, 2 + 3 * w.batch_size
        flops += pairs * H * (4.0 * Dh + 5.0)  # q.k and p.v (2 FLOPs per multiply-add each), softmax ~5 per score
        act += w.num_tokens * H * Dh * (4 + w.act_bytes)  # q read (as float32), output written
    return OpCost("attention", flops, 0.0, act, kv, "float32", pool * L, serial * L, kind=w.phase, dtype=w.dtype,
                  requests=w.batch_size * L)


def moe_costs(cfg: ModelConfig, w: Workload, layers: int) -> list[OpCost]:
    """Router (a small linear + top-k) and the experts the step's tokens pick: weights of the expected distinct
    experts (uniform routing), FLOPs of every (token, expert) pair; a shared expert runs for every token."""
    moe, T, D = cfg.moe, w.num_tokens, cfg.hidden_size
    E, A, inter = moe.num_experts, moe.top_k, moe.intermediate_size
    distinct = E * (1 - (1 - A / E) ** T)
    router = replace(linear_cost("router", T, D, E, w, layers), serial_calls=3 * layers)
    expert = linear_cost("experts", 1, D, 3 * inter, w)  # gate_up + down of one expert (3 I x D), one token
    experts = OpCost("experts", layers * T * A * expert.flops, layers * distinct * expert.weight_bytes,
                     layers * T * A * (2 * D + 5 * inter) * w.act_bytes, 0.0, expert.peak,
                     layers * 3 * round(distinct), layers * (8 + 3 * round(distinct)))
    if moe.shared_intermediate_size:
        s = linear_cost("experts", T, D, 3 * moe.shared_intermediate_size + 1, w, layers)
        experts = experts + replace(s, calls=3 * layers, serial_calls=2 * layers)
    return [router, experts]


def predict(ops: list[OpCost], hw: HardwareProfile) -> list[Prediction]:
    return [_predict(op, hw) for op in ops]


def _predict(op: OpCost, hw: HardwareProfile) -> Prediction:
    """max(memory, compute) + calls, each priced from the profile's measures of the engine's own kernels where it
    has them (module docstring)."""
    serial = op.serial_calls * (hw.call_us or hw.dispatch_us) * 1e-6
    compute = op.flops / hw.peak(op.peak, op.rows)
    streamed = hw.streamed(op.peak, op.rows) if op.rows else None
    if streamed is not None:  # a float linear over few rows: its weight read at the measured streaming cost
        per_call, per_byte = streamed
        memory = op.weight_bytes * per_byte + (op.act_bytes + op.kv_bytes) / hw.bandwidth
        return Prediction(op, memory, compute, op.calls * per_call + serial)
    per_request = hw.attention_us.get(op.dtype, {}).get(op.kind)  # attention the profile measured, else None
    calls = op.requests * per_request * 1e-6 if per_request is not None else op.calls * hw.dispatch_us * 1e-6 + serial
    rate = hw.vector_gbs.get(op.dtype, hw.read_gbs) if op.kind == "vector" else hw.read_gbs
    return Prediction(op, op.bytes / (rate * 1e9), compute, calls)


def decode_weight_bytes(cfg: ModelConfig, dtype: str = "float32", quantization: str = "none", batch_size: int = 1,
                        group_size: int | None = None) -> float:
    """Weight bytes one decode step reads: every linear's weight (routed experts: the expected distinct ones)."""
    w = Workload("decode", batch_size=batch_size, dtype=dtype, quantization=quantization, group_size=group_size)
    return sum(op.weight_bytes for op in operators(cfg, w) if op.name not in ("attn_norm", "mlp_norm", "final_norm"))
