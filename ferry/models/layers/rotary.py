"""Rotary position embeddings with the scaling types real checkpoints use (linear, llama3, yarn, dynamic).

The cos/sin table is computed once for every position up to max_len (float32), then gathered per token."""
from __future__ import annotations

import math

import torch

from ferry.config import RopeConfig


def inv_freq_and_scale(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the factor cos/sin are multiplied by (yarn's attention factor)."""
    base = rope.theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope.type == "default":
        return inv_freq, 1.0
    factor = float(rope.get("factor", 1.0))
    if rope.type == "linear":
        return inv_freq / factor, 1.0
    if rope.type == "dynamic":
        # dynamic NTK only changes frequencies beyond the original length; inside it equals default
        return inv_freq, 1.0
    if rope.type == "llama3":
        return _llama3(inv_freq, rope, factor), 1.0
    if rope.type == "yarn":
        return _yarn(rope, dim, base, factor)
    raise ValueError(f"rope type {rope.type!r}")


def _llama3(inv_freq: torch.Tensor, rope: RopeConfig, factor: float) -> torch.Tensor:
    low, high = float(rope.get("low_freq_factor")), float(rope.get("high_freq_factor"))
    old_len = float(rope.get("original_max_position_embeddings"))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(rope: RopeConfig, dim: int, base: float, factor: float) -> tuple[torch.Tensor, float]:
    orig_len = float(rope.get("original_max_position_embeddings"))

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = rope.get("attention_factor")
    if attn_factor is None:
        m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attn_factor = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)
    beta_fast = rope.get("beta_fast") or 32
    beta_slow = rope.get("beta_slow") or 1

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig_len / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attn_factor)


class Rotary:
    """cos/sin tables [max_len, dim] (float32) and their application to q and k."""

    def __init__(self, rope: RopeConfig, dim: int, max_len: int, device: torch.device | str = "cpu") -> None:
        inv_freq, scale = inv_freq_and_scale(rope, dim)
        pos = torch.arange(max_len, dtype=torch.int64).float()
        freqs = pos[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * scale).to(device)
        self.sin = (emb.sin() * scale).to(device)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each token: [T, dim] in the activation dtype (ops.fused.rotary_ applies them)."""
        return self.cos[positions].to(dtype).contiguous(), self.sin[positions].to(dtype).contiguous()
