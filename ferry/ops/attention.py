"""Decode attention read straight from the paged KV cache: plain, int8, or masked by depth for lazy
(paged_attention.cpp)."""
from __future__ import annotations

import torch

from ferry.ops.build import load_extension


def _ext():
    return load_extension("ferry_paged_attention", ["paged_attention.cpp"], ["-O3", "-march=native", "-fopenmp", "-DNDEBUG"])


def paged_decode_attention_available() -> bool:
    return _ext() is not None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           ctx_lens: torch.Tensor, window: int | None, scale: float) -> torch.Tensor:
    """q [B, H, Dh] -> float32 [B, H, Dh]; caches [num_blocks, bs, K, Dh] (float32 or bfloat16)."""
    return _ext().paged_decode_attention(q.float().contiguous(), k_cache, v_cache, block_tables, ctx_lens,
                                         window or 0, scale)


def paged_decode_attention_int8(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
                                v_scale: torch.Tensor, block_tables: torch.Tensor, ctx_lens: torch.Tensor,
                                window: int | None, scale: float) -> torch.Tensor:
    """q [B, H, Dh] -> float32 [B, H, Dh]; caches int8 [num_blocks, bs, K, Dh], scales float32 [num_blocks, bs, K]."""
    return _ext().paged_decode_attention_int8(q.float().contiguous(), k_cache, v_cache, k_scale, v_scale,
                                               block_tables, ctx_lens, window or 0, scale)


def paged_decode_attention_depth(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, ctx_lens: torch.Tensor, depth: torch.Tensor, layer: int,
                                 window: int | None, scale: float,
                                 want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """As paged_decode_attention, a key visible only where depth [num_blocks, bs] (uint8) > layer; with want_probs
    also [B, K, max_blocks * bs] attention per key position, averaged over each kv head's query heads."""
    out, probs = _ext().paged_decode_attention_depth(q.float().contiguous(), k_cache, v_cache, block_tables, ctx_lens,
                                                     depth, layer, window or 0, scale, want_probs)
    return out, probs if want_probs else None
