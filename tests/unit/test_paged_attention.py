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
