"""One decoder-only transformer covering every supported family; config flags pick the variants
(q/k norm, biases, sliding windows, dense or MoE feed-forward). Layers are plain nn.Modules that get
the step's attention metadata and their layer's KV cache as arguments."""
from __future__ import annotations

import torch
from torch import nn

from ferry.config import ModelConfig
from ferry.models.layers.attention import AttnMetadata, LayerKV
from ferry.models.layers.linear import QuantLinear, embedding, linear
from ferry.models.layers.mlp import MoE, DenseMLP, _meta
from ferry.models.layers.norm import RMSNorm
from ferry.models.layers.rotary import Rotary
from ferry.models.routing import RoutingObservers
from ferry.models.scopes import scope
from ferry.ops.fused import rotary_


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.window = cfg.sliding_windows[layer] if cfg.sliding_windows else None
        self.qkv = _meta(cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size)  # q, k, v fused
        self.qkv_bias = _meta(cfg.q_size + 2 * cfg.kv_size) if cfg.qkv_bias else None
        self.o = _meta(cfg.hidden_size, cfg.q_size)
        self.o_bias = _meta(cfg.hidden_size) if cfg.o_bias else None
        norm_dims = {"head": (cfg.head_dim, cfg.head_dim), "full": (cfg.q_size, cfg.kv_size)}.get(cfg.qk_norm)
        self.q_norm = RMSNorm(norm_dims[0], cfg.rms_norm_eps) if norm_dims else None
        self.k_norm = RMSNorm(norm_dims[1], cfg.rms_norm_eps) if norm_dims else None
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttnMetadata,
                kv_cache: LayerKV) -> torch.Tensor:
        q, k, v = self.project(x, cos, sin)
        with scope("attention"):
            out = kv_cache.attend(q, k, v, meta, self.scale, self.window)  # the KV policy stores k/v and reads
        with scope("o_proj"):
            return linear(out, self.o, self.o_bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [T, D] -> q [T, H, Dh], k and v [T, K, Dh], rotated."""
        cfg, T = self.cfg, x.shape[0]
        with scope("qkv_proj"):
            q, k, v = linear(x, self.qkv, self.qkv_bias).split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
            if cfg.qk_norm == "full":
                q, k = self.q_norm(q), self.k_norm(k)
            if cfg.clip_qkv is not None:
                q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
            q = q.reshape(T, cfg.num_heads, cfg.head_dim)
            k = k.reshape(T, cfg.num_kv_heads, cfg.head_dim)
            v = v.reshape(T, cfg.num_kv_heads, cfg.head_dim)
            if cfg.qk_norm == "head":
                q, k = self.q_norm(q), self.k_norm(k)
        with scope("rotary"):  # one in-place rotary pass over q and k together: [T, H + K, Dh]
            qk = torch.cat((q, k), dim=1)
            q, k = rotary_(qk, cos, sin).split([cfg.num_heads, cfg.num_kv_heads], dim=1)
        return q, k, v


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, routing: RoutingObservers) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        sparse = cfg.moe is not None and cfg.moe.sparse_layers[layer]
        self.mlp = MoE(cfg.moe, cfg.hidden_size, layer, routing) if sparse else \
            DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.layer = layer
        self.routing = routing if sparse else None  # told when this MoE layer is done (observers of the stream)

    def forward(self, h: torch.Tensor | None, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttnMetadata, kv_cache: LayerKV) -> torch.Tensor:
        """h: the previous layer's output (None for the first), added into residual in place; returns this
        layer's output. Same arithmetic as x = x + attn(norm(x)); x = x + mlp(norm(x)), fused."""
        with scope("attn_norm"):
            n = self.input_norm(residual, h)
        a = self.attn(n, cos, sin, meta, kv_cache)
        with scope("mlp_norm"):
            n = self.post_attn_norm(residual, a)
        out = self.mlp(n)
        if self.routing is not None:  # residual has the attention output added: + out is the stream
            self.routing.layer_done(self.layer, residual, out)
        return out

    def queries_keys(self, residual: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This layer's queries (times the attention scale) and keys for its input `residual`, without running it:
        a pruning policy ranks the rows by the attention they would get here."""
        q, k, _ = self.attn.project(self.input_norm(residual), cos, sin)
        return q * self.attn.scale, k


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = _meta(cfg.vocab_size, cfg.hidden_size)
        self.routing = RoutingObservers()  # the MoE layers' routing port: add observers here
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.routing) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else _meta(cfg.vocab_size, cfg.hidden_size)
        self.max_len = max_len
        self.rotary: Rotary | None = None  # built after weights are loaded (knows the device)

    def init_rotary(self, device: torch.device | str) -> None:
        self.rotary = Rotary(self.cfg.rope, self.cfg.head_dim, self.max_len, device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, meta: AttnMetadata, kv_caches: list[LayerKV],
                logits_indices: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> float32 logits [S, V] for the rows in logits_indices [S]. (A KV policy that changes the
        rows between layers drives the layers itself: ferry/runner/kv/lazy.py.)"""
        residual = self.embed_tokens(input_ids)
        cos, sin = self.rotary.tables(meta.positions, residual.dtype)
        h = None
        for layer, kv in zip(self.layers, kv_caches):
            h = layer(h, residual, cos, sin, meta, kv)
        residual += h
        return self.logits(residual[logits_indices])

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> the first layer's input [T, D] (a copy: layers update it in place)."""
        with scope("embedding"):
            return embedding(self.embed, input_ids, self.norm.weight.dtype)  # a float or a quantized (tied) table

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output rows x [S, D] -> float32 logits [S, V]. A quantized head takes x in float32: its
        kernel rounds x to int8 blocks either way (bfloat16 x converts exactly), and the logits then skip a
        rounding to bfloat16 (fewer ties), for the price of casting S rows."""
        with scope("final_norm"):
            x = self.norm(x.contiguous())
        with scope("lm_head"):
            head = self.embed if self.lm_head is None else self.lm_head
            return linear(x.float() if isinstance(head, QuantLinear) else x, head).float()
