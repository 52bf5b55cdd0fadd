"""Decode attention read straight from the paged KV cache (paged_attention.cpp): plain, int8, or masked by depth
for kv policy lazy, each with its torch fallback (gather the blocks, masked softmax) where the kernel is not built.

Legend: B decode requests (one query token each), H query heads, K kv heads, G = H / K, Dh head dim, N cache
blocks, bs block size, nb blocks per request in the table, C = nb * bs key positions. The query of request b sits
at position ctx_lens[b] - 1; a key is visible below ctx_lens[b] (and within `window` of the query, if given).
The source is plain C++ (no intrinsics, no x86 header: it builds on ARM too), compiled once per instruction-set level
(portable, avx2, avx512, avx512_bf16; ``cpu.isa()`` picks the build, ``FERRY_ISA`` forces a lower one): the level
only decides the vector width the compiler gives its ``omp simd`` dot products and axpys (FMA from avx2 up), so every
path equals the torch fallback within float tolerance (tests/unit/test_ops_paths.py). The portable build replaces
the fallback everywhere too: the fallback gathers every request's blocks into a copy first."""
from __future__ import annotations

import torch

from ferry.ops.kernel import NativeKernel

KERNEL = NativeKernel("ferry_paged_attention", ["paged_attention.cpp"], ["-O3", "-fopenmp", "-DNDEBUG"])


def available() -> bool:
    return KERNEL.available()


def unavailable_reason() -> str | None:
    return KERNEL.unavailable_reason()


def _native(q: torch.Tensor):
    return KERNEL.ext() if q.device.type == "cpu" else None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           ctx_lens: torch.Tensor, window: int | None, scale: float) -> torch.Tensor:
    """q [B, H, Dh] -> float32 [B, H, Dh]; caches [N, bs, K, Dh] (float32 or bfloat16), tables [B, nb] int64."""
    ext = _native(q)
    if ext is not None:
        return ext.paged_decode_attention(q.float().contiguous(), k_cache, v_cache, block_tables, ctx_lens,
                                          window or 0, scale)
    visible = _visible(block_tables, ctx_lens, k_cache.shape[1], window)
    return _attend(q, _gather(k_cache, block_tables), _gather(v_cache, block_tables), visible, scale)[0]


def paged_decode_attention_int8(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor,
                                v_scale: torch.Tensor, block_tables: torch.Tensor, ctx_lens: torch.Tensor,
                                window: int | None, scale: float) -> torch.Tensor:
    """q [B, H, Dh] -> float32 [B, H, Dh]; caches int8 [N, bs, K, Dh], scales float32 [N, bs, K]."""
    ext = _native(q)
    if ext is not None:
        return ext.paged_decode_attention_int8(q.float().contiguous(), k_cache, v_cache, k_scale, v_scale,
                                               block_tables, ctx_lens, window or 0, scale)
    kc = _gather(k_cache, block_tables) * _gather(k_scale, block_tables)[..., None]  # [B, C, K, Dh]
    vc = _gather(v_cache, block_tables) * _gather(v_scale, block_tables)[..., None]
    return _attend(q, kc, vc, _visible(block_tables, ctx_lens, k_cache.shape[1], window), scale)[0]


def paged_decode_attention_depth(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, ctx_lens: torch.Tensor, depth: torch.Tensor, layer: int,
                                 window: int | None, scale: float,
                                 want_probs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """As paged_decode_attention, a key visible only where depth [N, bs] (uint8) > layer; with want_probs
    also [B, K, C] attention per key position, averaged over each kv head's query heads."""
    ext = _native(q)
    if ext is not None:
        out, probs = ext.paged_decode_attention_depth(q.float().contiguous(), k_cache, v_cache, block_tables,
                                                      ctx_lens, depth, layer, window or 0, scale, want_probs)
        return out, probs if want_probs else None
    visible = _visible(block_tables, ctx_lens, k_cache.shape[1], window) & (depth[block_tables].flatten(1) > layer)
    out, probs = _attend(q, _gather(k_cache, block_tables), _gather(v_cache, block_tables), visible, scale)
    return out, probs.mean(2) if want_probs else None


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache [N, bs, ...] -> float32 [B, C, ...]: each request's blocks in table order."""
    return cache[block_tables].flatten(1, 2).float()


def _visible(block_tables: torch.Tensor, ctx_lens: torch.Tensor, block_size: int,
             window: int | None) -> torch.Tensor:
    """[B, C] bool: key positions below each request's length (and within the window of its query)."""
    kpos = torch.arange(block_tables.shape[1] * block_size, device=block_tables.device)[None, :]
    visible = kpos < ctx_lens[:, None]
    if window is not None:
        visible &= (ctx_lens - 1)[:, None] - kpos < window
    return visible


def _attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, visible: torch.Tensor,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Dh], kc/vc float32 [B, C, K, Dh], visible [B, C] -> (float32 [B, H, Dh], probs [B, K, G, C])."""
    B, H, Dh = q.shape
    K = kc.shape[2]
    scores = torch.einsum("bkgd,bckd->bkgc", q.float().view(B, K, H // K, Dh), kc) * scale
    probs = torch.softmax(scores.masked_fill(~visible[:, None, None], float("-inf")), dim=-1)
    return torch.einsum("bkgc,bckd->bkgd", probs, vc).reshape(B, H, Dh), probs
