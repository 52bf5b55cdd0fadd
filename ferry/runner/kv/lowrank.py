"""Low-rank keys for `shadow`: the per-layer key basis, and RoPE undone and redone at any position.

A pre-RoPE key is k = W_k (g * x / rms(x)) (+ b): it lies in the column space of W_k diag(g), whatever the text.
The basis is the top r left singular vectors of that matrix (per layer, over all kv heads at once: [K*Dh, r]),
so it is fixed by the weights: every token's coefficients are computed once, when it is written, and stay valid
for any request sharing its block (prefix cache), any tier it moves to and any chunking of its prompt. A per-request
SVD of the prompt's keys (ShadowKV) fits one prompt better but needs the whole prompt before its first block goes
cold, and per-request state the paged blocks do not carry. (Measured on ferry-tiny as of commit 0bfb0b4, relative
error of the keys of 1K held-out tokens at rank 32: 9-19% per layer with this basis, 2-9% with the prompt's own SVD.)
q/k-norm models scale the normalized key per channel, which the basis folds in; the basis is exact at rank K*Dh.
Legend: T tokens, K kv heads, Dh head dim, r rank.
"""
from __future__ import annotations

import torch

from ferry.config import ModelConfig
from ferry.models.layers.linear import dense


def key_basis(cfg: ModelConfig, attn: torch.nn.Module, input_norm: torch.nn.Module,
              rank: int, rope_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's basis [K*Dh, r] (orthonormal columns) and key offset [K*Dh] (the bias, as RoPE scales it),
    float32."""
    qkv = dense(attn.qkv, (cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size))  # dequantized if quantized
    w = qkv[cfg.q_size:cfg.q_size + cfg.kv_size].float() * input_norm.weight.float()[None]  # [K*Dh, D]
    if cfg.qk_norm == "head":
        w = w * attn.k_norm.weight.float().repeat(cfg.num_kv_heads)[:, None]
    elif cfg.qk_norm == "full":
        w = w * attn.k_norm.weight.float()[:, None]
    u = torch.linalg.svd(w, full_matrices=False).U
    if u.shape[1] < rank:  # fewer inputs than key dims: complete the basis (exact at rank K*Dh still)
        u = torch.linalg.qr(torch.cat((u, torch.eye(w.shape[0], device=w.device)), dim=1)).Q
    offset = torch.zeros(cfg.kv_size, device=w.device)
    if attn.qkv_bias is not None and cfg.qk_norm == "none":
        offset = attn.qkv_bias[cfg.q_size:cfg.q_size + cfg.kv_size].float() * rope_scale
    return u[:, :rank].contiguous(), offset


def rope_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] -> cos, sin [..., Dh/2] float32 (the decoder's angles, without yarn's factor)."""
    ang = positions.float()[..., None] * inv_freq
    return ang.cos(), ang.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [..., heads, Dh] (rotate_half convention), cos/sin [..., Dh/2] broadcast over heads -> float32 copy."""
    x = x.float()
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[..., None, :], (-sin if inverse else sin)[..., None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
