"""The C++ paged decode attention equals its torch fallback (gather + masked softmax) and an einsum reference."""
from __future__ import annotations

import pytest
import torch

from ferry.ops import paged_attention
from ferry.ops.paged_attention import (paged_decode_attention, paged_decode_attention_depth,
                                       paged_decode_attention_int8)


@pytest.fixture
def kernel():
    if not paged_attention.available():
        pytest.skip(f"the kernel does not run here: {paged_attention.unavailable_reason()}")


def _torch_path(monkeypatch):
    """From here on the module takes its fallback, as where the kernel cannot be built."""
    monkeypatch.setattr(paged_attention, "_native", lambda q: None)


def _case(seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    B, H, K, Dh, bs, nb = 5, 8, 2, 16, 4, 48
    k_cache = torch.randn(nb, bs, K, Dh, generator=g).to(dtype)
    v_cache = torch.randn(nb, bs, K, Dh, generator=g).to(dtype)
    lens = torch.tensor([1, 7, 16, 33, 29])
    tables = torch.randperm(nb, generator=g)[:B * 9].view(B, 9)  # scattered blocks, 9 per sequence
    return torch.randn(B, H, Dh, generator=g), k_cache, v_cache, tables, lens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_matches_torch_fallback(kernel, monkeypatch, dtype, window):
    q, k_cache, v_cache, tables, lens = _case(0, dtype)
    got = paged_decode_attention(q, k_cache, v_cache, tables, lens, window, 0.25)
    _torch_path(monkeypatch)
    want = paged_decode_attention(q, k_cache, v_cache, tables, lens, window, 0.25)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    # the fallback itself against a plain reference: softmax over each request's visible positions
    for b in range(q.shape[0]):
        n = int(lens[b])
        start = 0 if window is None else max(0, n - window)
        kc = k_cache[tables[b]].flatten(0, 1)[start:n].float()  # [n', K, Dh]
        vc = v_cache[tables[b]].flatten(0, 1)[start:n].float()
        qg = q[b].view(2, 4, 16)  # [K, G, Dh]
        p = torch.softmax(torch.einsum("kgd,ckd->kgc", qg, kc) * 0.25, -1)
        torch.testing.assert_close(want[b], torch.einsum("kgc,ckd->kgd", p, vc).reshape(8, 16), atol=2e-6, rtol=1e-5)


def test_int8_kernel_matches_torch_fallback(kernel, monkeypatch):
    q, _, _, tables, lens = _case(3)
    g = torch.Generator().manual_seed(3)
    k8, v8 = torch.randint(-127, 128, (2, 48, 4, 2, 16), generator=g, dtype=torch.int8)
    k_scale, v_scale = torch.rand(2, 48, 4, 2, generator=g) / 64  # codes x scale ~ unit-size keys and values
    got = paged_decode_attention_int8(q, k8, v8, k_scale, v_scale, tables, lens, None, 0.25)
    _torch_path(monkeypatch)
    want = paged_decode_attention_int8(q, k8, v8, k_scale, v_scale, tables, lens, None, 0.25)
    dense = paged_decode_attention(q, k8.float() * k_scale[..., None], v8.float() * v_scale[..., None], tables, lens,
                                   None, 0.25)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(want, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_depth_masked_attention_and_its_probabilities_match_a_reference(monkeypatch, window, path):
    """kv policy lazy: keys whose depth is <= the layer are invisible; the per-key attention (mean over each kv
    head's query heads) comes back with the output."""
    if path == "kernel" and not paged_attention.available():
        pytest.skip(f"the kernel does not run here: {paged_attention.unavailable_reason()}")
    if path == "torch":
        _torch_path(monkeypatch)
    g = torch.Generator().manual_seed(1)
    B, H, K, Dh, bs, nb, layer = 4, 8, 2, 16, 4, 40, 2
    k_cache, v_cache = torch.randn(2, nb, bs, K, Dh, generator=g)
    depth = torch.randint(0, 5, (nb, bs), generator=g, dtype=torch.uint8)
    lens = torch.tensor([3, 17, 30, 36])
    tables = torch.randperm(nb, generator=g)[:B * 9].view(B, 9)
    depth.view(-1)[tables[torch.arange(B), (lens - 1) // bs] * bs + (lens - 1) % bs] = 4  # the query's own token
    q = torch.randn(B, H, Dh, generator=g)
    out, probs = paged_decode_attention_depth(q, k_cache, v_cache, tables, lens, depth, layer, window, 0.25, True)
    C = 9 * bs
    kpos = torch.arange(C)
    visible = (kpos[None] < lens[:, None]) & (depth[tables].flatten(1) > layer)
    if window is not None:
        visible &= (lens - 1)[:, None] - kpos[None] < window
    kc, vc = k_cache[tables].flatten(1, 2), v_cache[tables].flatten(1, 2)  # [B, C, K, Dh]
    scores = torch.einsum("bkgd,bckd->bkgc", q.view(B, K, H // K, Dh), kc) * 0.25
    p = torch.softmax(scores.masked_fill(~visible[:, None, None], float("-inf")), -1)
    torch.testing.assert_close(out, torch.einsum("bkgc,bckd->bkgd", p, vc).reshape(B, H, Dh), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(probs, p.mean(2), atol=2e-6, rtol=1e-5)
    assert bool((probs[~visible[:, None].expand_as(probs)] == 0).all()) and bool(visible.sum(1).lt(lens).any())
    _, none = paged_decode_attention_depth(q, k_cache, v_cache, tables, lens, depth, layer, window, 0.25, False)
    assert none is None
