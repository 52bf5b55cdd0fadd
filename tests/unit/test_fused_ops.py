"""The fused decoder ops are bit-identical to the torch sequences they replace (float32 and bfloat16)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ferry.ops import fused


@pytest.fixture(autouse=True)
def _kernel():
    if not fused.available():
        pytest.skip(f"the kernel does not run here ({fused.unavailable_reason()}): the torch fallbacks are what runs")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
def test_add_rms_norm(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x, res = (torch.randn(rows, 96, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(96, generator=g).to(dtype)
    want_res = res + x
    want = w * F.rms_norm(want_res.float(), (96,), eps=1e-6).to(dtype)
    ref_manual = w * (want_res.float() * torch.rsqrt(want_res.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    got_res = res.clone()
    got = fused.add_rms_norm(x, got_res, w, 1e-6)
    assert torch.equal(got_res, want_res)
    if dtype == torch.bfloat16:  # identical bits to the reference's op sequence
        torch.testing.assert_close(got, ref_manual, atol=0, rtol=0)
    else:  # float32: the sum of squares is accumulated in another order
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    gu = torch.randn(5, 2 * 70, generator=torch.Generator().manual_seed(1)).to(dtype)
    want = F.silu(gu[:, :70]) * gu[:, 70:]
    torch.testing.assert_close(fused.silu_mul(gu), want, atol=1e-6 if dtype == torch.float32 else 0, rtol=1e-6 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_in_place_on_a_strided_view(dtype):
    g = torch.Generator().manual_seed(2)
    T, H, Dh = 7, 6, 16
    qkv = torch.randn(T, (H + 2) * Dh, generator=g).to(dtype)
    x = qkv[:, :H * Dh].view(T, H, Dh)  # rows strided, as the q slice of a fused projection
    cos, sin = torch.randn(T, Dh, generator=g).to(dtype), torch.randn(T, Dh, generator=g).to(dtype)
    rotated = torch.cat((-x[..., Dh // 2:], x[..., :Dh // 2]), dim=-1)
    want = x * cos[:, None] + rotated * sin[:, None]
    tail = qkv[:, H * Dh:].clone()
    fused.rotary_(x, cos, sin)
    torch.testing.assert_close(x, want, atol=0, rtol=0)
    assert torch.equal(qkv[:, H * Dh:], tail)  # the rest of the row is untouched
