"""A trainable Llama / Mixtral decoder whose weights export to Hugging Face format.

Only what training needs: full causal attention (SDPA), RoPE as in HF Llama,
RMSNorm, SwiGLU, and a Mixtral-style top-k router with the Switch
load-balancing loss. Parameter names follow HF checkpoints, so
``state_dict()`` is the exported checkpoint.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ferry.config import RopeConfig
from ferry.models.layers.rotary import Rotary


@dataclass
class Spec:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 768
    num_experts: int = 0  # 0 = dense (Llama); else Mixtral
    top_k: int = 2
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    rope_scaling: dict | None = None  # HF rope_scaling, e.g. {"rope_type": "yarn", "factor": 4.5, ...}

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def hf_config(self) -> dict:
        common = {
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,  # transformers' Mixtral YaRN needs it spelled out
            "max_position_embeddings": self.max_position_embeddings, "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps, "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
        }
        if self.rope_scaling:
            common["rope_scaling"] = dict(self.rope_scaling)
        if self.num_experts:
            return {**common, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                    "num_local_experts": self.num_experts, "num_experts_per_tok": self.top_k,
                    "sliding_window": None, "router_aux_loss_coef": 0.02}
        return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "attention_bias": False, "mlp_bias": False}

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_tables(spec: Spec, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [n, head_dim]: ferry's own RoPE tables (every HF scaling type), so training sees what serving does."""
    scaling = dict(spec.rope_scaling or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    rotary = Rotary(RopeConfig(kind, spec.rope_theta, tuple(sorted(scaling.items()))), spec.head_dim, n)
    return rotary.cos, rotary.sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, -1)
    return x * cos + torch.cat([-b, a], -1) * sin


class Attention(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.hidden_size, s.num_heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, s.num_kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.num_heads * s.head_dim, s.hidden_size, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        s = self.s
        q = self.q_proj(x).view(b, t, s.num_heads, s.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, s.num_kv_heads, s.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin).to(v.dtype), _rotate(k, cos, sin).to(v.dtype)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=s.num_kv_heads != s.num_heads)
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, d: int, f: int, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        for n, (i, o) in zip(names, ((d, f), (d, f), (f, d))):
            setattr(self, n, nn.Linear(i, o, bias=False))

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.names)
        return d(F.silu(g(x)) * u(x))


class SparseMoE(nn.Module):
    """Mixtral's block: softmax router, top-k, weights renormalized over the chosen k."""

    def __init__(self, s: Spec):
        super().__init__()
        self.s = s
        self.gate = nn.Linear(s.hidden_size, s.num_experts, bias=False)
        self.experts = nn.ModuleList(
            MLP(s.hidden_size, s.intermediate_size, ("w1", "w3", "w2")) for _ in range(s.num_experts)
        )
        self.aux_loss = torch.zeros(())
        self.last_choice = torch.zeros(0)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.gate(x).float(), -1)
        w, idx = probs.topk(self.s.top_k, -1)
        w = (w / w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(x[rows]) * w[rows, slot, None])
        frac = F.one_hot(idx, self.s.num_experts).float().sum((0, 1)) / idx.numel()
        self.aux_loss = self.s.num_experts * (frac * probs.mean(0)).sum()
        self.last_choice = idx.detach()
        return out.view(shape)


class Layer(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        self.self_attn = Attention(s)
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        if s.num_experts:
            self.block_sparse_moe = SparseMoE(s)
        else:
            self.mlp = MLP(s.hidden_size, s.intermediate_size)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + ffn(self.post_attention_layernorm(x))


class Inner(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.num_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        self.spec = s
        self.model = Inner(s)
        if not s.tie_word_embeddings:
            self.lm_head = nn.Linear(s.hidden_size, s.vocab_size, bias=False)
        self.apply(self._init)
        self._rope = rope_tables(s, s.max_position_embeddings)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        cos, sin = (r[:t] for r in self._rope)
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        h = self.model.norm(h)
        head = self.model.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight
        return h @ head.to(h.dtype).T

    def aux_loss(self) -> torch.Tensor:
        moes = [l.block_sparse_moe for l in self.model.layers if hasattr(l, "block_sparse_moe")]
        return sum(m.aux_loss for m in moes) / max(1, len(moes)) if moes else torch.zeros(())

    def export_state(self) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in self.state_dict().items()}
        if self.spec.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        return sd
