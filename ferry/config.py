"""Frozen configuration, resolved once. `ModelConfig.from_hf` is the one place that knows Hugging Face
config quirks across families; values found at run time (number of KV blocks) live elsewhere."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferry.errors import ModelLoadError

# architecture name in config.json -> family (how the weights are laid out and the layer computes)
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Qwen3ForCausalLM": "llama",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen_moe",
    "Qwen3MoeForCausalLM": "qwen_moe",
    "OlmoeForCausalLM": "qwen_moe",  # same expert naming; differs by q/k norm and routing flags
}


@dataclass(frozen=True)
class RopeConfig:
    type: str = "default"  # default | linear | llama3 | yarn | dynamic
    theta: float = 10000.0
    params: tuple[tuple[str, Any], ...] = ()  # the remaining rope_parameters, as sorted items

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    top_k: int
    intermediate_size: int
    norm_topk_prob: bool  # renormalize the top-k routing weights to sum to 1
    shared_intermediate_size: int = 0  # qwen2_moe's always-on shared expert (0: none)
    sparse_layers: tuple[bool, ...] = ()  # per layer: MoE (True) or dense MLP (False)


@dataclass(frozen=True)
class ModelConfig:
    path: str
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: str = "none"  # none | head (Qwen3: per head) | full (OLMoE: over the whole projection)
    clip_qkv: float | None = None
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None is full attention
    moe: MoEConfig | None = None
    checkpoint_dtype: str = "float32"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not path.is_dir():
            raise ModelLoadError(f"model folder {str(path)!r} does not exist; pass a local folder holding config.json and *.safetensors")
        if not cfg_file.is_file():
            raise ModelLoadError(f"{str(path)!r} has no config.json; ferry loads Hugging Face folders (config.json + *.safetensors + tokenizer files)")
        try:
            hf = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{cfg_file} is not valid JSON: {e}") from None
        return cls.from_dict(hf, str(path))

    @classmethod
    def from_dict(cls, hf: dict[str, Any], path: str = "") -> "ModelConfig":
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"unsupported architecture {archs or hf.get('model_type')!r} in {path or 'config'}; "
                f"ferry supports: {', '.join(sorted(ARCHITECTURES))}")
        model_type = hf.get("model_type", "")
        try:
            hidden = int(hf["hidden_size"])
            num_heads = int(hf["num_attention_heads"])
            num_layers = int(hf["num_hidden_layers"])
            vocab = int(hf["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelLoadError(f"config.json in {path!r} lacks a usable {e} field") from None
        head_dim = int(hf.get("head_dim") or hidden // num_heads)
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"hidden_act {act!r} is not supported (only silu)")
        is_qwen2 = model_type in ("qwen2", "qwen2_moe")
        moe = _moe_config(hf, num_layers) if ARCHITECTURES[arch] != "llama" else None
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
        dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
        return cls(
            path=path,
            architecture=arch,
            family=ARCHITECTURES[arch],
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(hf.get("intermediate_size") or 0),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_model_len=int(hf.get("max_position_embeddings", 2048)),
            rope=_rope_config(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", False)) or is_qwen2,
            o_bias=bool(hf.get("attention_bias", False)) and not is_qwen2 and model_type != "qwen3",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm={"qwen3": "head", "qwen3_moe": "head", "olmoe": "full"}.get(model_type, "none"),
            clip_qkv=hf.get("clip_qkv"),
            sliding_windows=_sliding_windows(hf, num_layers),
            moe=moe,
            checkpoint_dtype=dtype,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_config(hf: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes rope_parameters; older checkpoints have rope_theta + rope_scaling
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings",
                          hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
    if rope_type not in ("default", "linear", "llama3", "yarn", "dynamic"):
        raise ModelLoadError(f"rope type {rope_type!r} is not supported (default, linear, llama3, yarn, dynamic)")
    if params.get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("partial_rotary_factor != 1 is not supported")
    return RopeConfig(type=rope_type, theta=theta, params=tuple(sorted(params.items())))


def _sliding_windows(hf: dict[str, Any], num_layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if hf.get("model_type", "").startswith("qwen") and not hf.get("use_sliding_window", False):
        return (None,) * num_layers
    return (window,) * num_layers


def _moe_config(hf: dict[str, Any], num_layers: int) -> MoEConfig:
    model_type = hf.get("model_type")
    num_experts = int(hf.get("num_local_experts") or hf.get("num_experts") or 0)
    step = int(hf.get("decoder_sparse_step", 1) or 1)
    dense_layers = set(hf.get("mlp_only_layers") or [])
    sparse = tuple(i not in dense_layers and (i + 1) % step == 0 for i in range(num_layers))
    return MoEConfig(
        num_experts=num_experts,
        top_k=int(hf["num_experts_per_tok"]),
        intermediate_size=int(hf.get("moe_intermediate_size") or hf["intermediate_size"]),
        # Mixtral always renormalizes; the Qwen/OLMoE families say so in the config
        norm_topk_prob=True if model_type == "mixtral" else bool(hf.get("norm_topk_prob", False)),
        shared_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
        sparse_layers=sparse,
    )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory: int = 1 << 30  # bytes for the device KV cache; never exceeded
    swap_space: int = 1 << 30  # bytes of host memory for KV swapped out on preemption
    enable_prefix_caching: bool = True


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # token budget per step (prefill chunks + decodes)
    max_num_seqs: int = 64  # running requests at most
    max_waiting: int = 1024  # queued requests at most; more is Overloaded
    policy: str = "fcfs"
    preemption_mode: str = "recompute"  # recompute | swap
    # a new prompt that fits in a step but not in this one's remaining budget waits for the next step instead of
    # being split (set by a KV policy that ranks a prompt's tokens by its last ones)
    whole_prompts: bool = False


@dataclass(frozen=True)
class OffloadConfig:
    expert_store: str | None = None  # folder written by `ferry convert --expert-store`; None: experts resident
    expert_cache_memory: int | None = None  # bytes of RAM for cached experts (None: every expert); never exceeded
    expert_eviction: str = "auto"  # auto | lru | correlation (auto: chosen online, ferry/experts/auto.py)
    expert_prefetch: str = "auto"  # auto | none | correlation | pregate
    explain: bool = False  # print the planner's measured costs and choices at start
    expert_correlation_file: str | None = None  # correlation prefetch statistics: loaded at start, saved at close


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (ferry/speculative/): who drafts and how many tokens a request verifies per step."""

    method: str | None = None  # None (off) | ngram | draft | phrase | route
    num_tokens: int | None = None  # draft tokens per request per step at most; None: auto (adaptive, up to 8)
    model: str | None = None  # the draft model's folder (method draft), the small model's (method route)
    prompt_lookup_min: int = 2  # n-gram lengths matched (ngram, phrase)
    prompt_lookup_max: int = 5
    route_threshold: float = 0.5  # route: the large model makes a token whose divergence score is at least this
    route_router: str | None = None  # route: a calibrated router file; None: score = 1 - top-1 probability


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization of the decoder's linears at load (ferry/quant/)."""

    method: str | None = None  # int8 | int4; None: the checkpoint's weights as they are
    group_size: int | None = None  # inputs per scale for every matrix; None: chosen per matrix (int8: per channel)
    lm_head: str | None = None  # int8 | int4 | none (kept in float); None: int8, or what a converted folder holds


@dataclass(frozen=True)
class KVOptions:
    """The options of a KV policy (ferry/kvcache/policies/): each policy subclasses it with its own fields (the
    --kv-* flags it reads, with defaults and checks) beside its class. `full` reads none."""


@dataclass(frozen=True)
class EngineConfig:
    model: str
    device: str = "cpu"
    dtype: str = "auto"  # auto | float32 | bfloat16
    threads: int | None = None  # torch intra-op threads (None: leave as is)
    max_model_len: int | None = None  # cap the context below the model's
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    kv_policy: str = "full"  # a name in ferry.kvcache.policies.KV_POLICIES
    kv_options: KVOptions = field(default_factory=KVOptions)  # that policy's own options
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
