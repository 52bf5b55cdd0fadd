"""Fused decoder elementwise ops (fused.cpp): residual add + RMSNorm, SiLU-and-multiply, rotary embedding.

Each op runs the kernel on contiguous CPU float32/bfloat16 tensors and its torch sequence otherwise (or where the
kernel cannot be built); the two are bit-identical (the kernel rounds where torch does, and is built with
-ffp-contract=off so no FMA changes a bit). The source is plain C++ (no intrinsics, no x86 header: it builds on ARM
too), compiled once per instruction-set level (portable, avx2, avx512, avx512_bf16; ``cpu.isa()`` picks the build,
``FERRY_ISA`` forces a lower one); the level only decides which vector instructions the compiler may use, and every
level's build is bit-identical to the portable one (tests/unit/test_ops_paths.py)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ferry.ops.kernel import NativeKernel

KERNEL = NativeKernel("ferry_fused", ["fused.cpp"], ["-O3", "-ffp-contract=off", "-fopenmp", "-DNDEBUG"])
_SUPPORTED = (torch.float32, torch.bfloat16)
SILU_MAX_ROWS = 16  # the kernel's exp is scalar: past a few rows torch's vectorized silu is faster


def available() -> bool:
    return KERNEL.available()


def unavailable_reason() -> str | None:
    return KERNEL.unavailable_reason()


def _usable(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in _SUPPORTED and KERNEL.ext() is not None


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place, when x is given); returns weight * rms_norm(residual) in residual's dtype."""
    if _usable(residual) and residual.is_contiguous():
        return KERNEL.ext().add_rms_norm(x, residual, weight, eps)
    return torch_add_rms_norm(x, residual, weight, eps)


def torch_add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """add_rms_norm's fallback: the torch sequence the kernel replaces."""
    if x is not None:
        residual.add_(x)
    return weight * F.rms_norm(residual.float(), (residual.shape[-1],), eps=eps).to(residual.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [rows, 2I] -> [rows, I]: silu(gate) * up."""
    if gate_up.numel() <= SILU_MAX_ROWS * gate_up.shape[-1] and _usable(gate_up) and gate_up.is_contiguous():
        return KERNEL.ext().silu_mul(gate_up)
    return torch_silu_mul(gate_up)


def torch_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu_mul's fallback."""
    inter = gate_up.shape[-1] // 2
    return F.silu(gate_up[..., :inter]) * gate_up[..., inter:]


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, Dh] rotated in place (rotate_half convention); cos/sin [T, Dh] in x's dtype."""
    if _usable(x) and x.stride(2) == 1 and x.stride(1) == x.shape[2]:
        KERNEL.ext().rotary_(x, cos, sin)
        return x
    return torch_rotary_(x, cos, sin)


def torch_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """rotary_'s fallback."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    x.copy_(x * cos[:, None] + rotated * sin[:, None])
    return x
