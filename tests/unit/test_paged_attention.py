"""The C++ paged decode attention equals the torch path (gather + masked softmax) it replaces."""
from __future__ import annotations

import pytest
import torch

from ferry.models.layers.attention import AttnMetadata, _decode_attention
from ferry.ops.attention import paged_decode_attention, paged_decode_attention_available


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 20])
def test_kernel_matches_torch_reference(dtype, window):
    if not paged_decode_attention_available():
        pytest.skip("no C++ toolchain: the torch path is what runs")
    g = torch.Generator().manual_seed(0)
    B, H, K, Dh, bs, nb = 5, 8, 2, 16, 4, 48
    k_cache = torch.randn(nb, bs, K, Dh, generator=g).to(dtype)
    v_cache = torch.randn(nb, bs, K, Dh, generator=g).to(dtype)
    lens = torch.tensor([1, 7, 16, 33, 29])
    tables = torch.randperm(nb, generator=g)[:B * 9].view(B, 9)  # scattered blocks, 9 per sequence
    q = torch.randn(B, H, Dh, generator=g)
    meta = AttnMetadata(positions=lens - 1, slot_mapping=torch.zeros(B, dtype=torch.long), block_size=bs,
                        num_decodes=B, decode_block_tables=tables, decode_ctx_lens=lens)
    want = _decode_attention(q, k_cache, v_cache, meta, 0.25, window)
    got = paged_decode_attention(q, k_cache, v_cache, tables, lens, window, 0.25)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 20])
def test_depth_masked_kernel_and_its_probabilities_match_torch(window):
    """kv policy lazy: keys whose depth is <= the layer are invisible; the per-key attention (mean over each kv
    head's query heads) comes back with the output."""
    from ferry.ops.attention import paged_decode_attention_depth
    if not paged_decode_attention_available():
        pytest.skip("no C++ toolchain: the torch path is what runs")
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
