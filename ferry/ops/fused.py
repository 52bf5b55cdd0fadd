"""Fused decoder elementwise ops (fused.cpp), bit-identical to the torch sequences they replace."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ferry.ops.build import load_extension

_SUPPORTED = (torch.float32, torch.bfloat16)


def _ext():
    return load_extension("ferry_fused", ["fused.cpp"], ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"])


def _usable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _SUPPORTED and _ext() is not None


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place, when x is given); returns weight * rms_norm(residual) in residual's dtype."""
    if _usable(residual) and residual.is_contiguous():
        return _ext().add_rms_norm(x, residual, weight, eps)
    if x is not None:
        residual.add_(x)
    return weight * F.rms_norm(residual.float(), (residual.shape[-1],), eps=eps).to(residual.dtype)


SILU_MAX_ROWS = 16  # the kernel's exp is scalar: past a few rows torch's vectorized silu is faster


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.numel() <= SILU_MAX_ROWS * gate_up.shape[-1] and _usable(gate_up) and gate_up.is_contiguous():
        return _ext().silu_mul(gate_up)
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Dh] rotated in place (rotate_half convention); cos/sin [T, Dh] in x's dtype."""
    if _usable(x) and x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        _ext().rotary_(x, cos, sin)
        return x
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    x.copy_(x * cos[:, None] + rotated * sin[:, None])
    return x
