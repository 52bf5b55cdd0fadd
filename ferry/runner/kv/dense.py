"""Attention over a layer's whole context read back as dense K/V tensors: for KV layouts that have no paged
kernel of their own (merge's direction + magnitude pairs) and for wrappers that mask what a query reads
(layer-budget). `read(block_ids)` turns block ids [..., nb] into float32 K and V [..., nb * bs, K, Dh].
Legend: T tokens in the step, B decode requests, C context, H query heads, K kv heads, G = H / K, Dh head dim.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ferry.models.layers.attention import AttnMetadata, prefill_attention

Reader = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def decode_probs(q: torch.Tensor, kc: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, Dh], kc [B, C, K, Dh], additive mask broadcastable to [B, K, G, C] -> probs [B, K, G, C]."""
    B, H, Dh = q.shape
    K = kc.shape[2]
    scores = torch.matmul(q.float().view(B, K, H // K, Dh), kc.permute(0, 2, 3, 1)) * scale
    return torch.softmax(scores + mask, dim=-1)


def weighted_values(probs: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
    """probs [B, K, G, C], vc [B, C, K, Dh] -> [B, H, Dh]."""
    B, K, G, _ = probs.shape
    return torch.matmul(probs, vc.transpose(1, 2)).reshape(B, K * G, -1)


def attend_dense(q: torch.Tensor, meta: AttnMetadata, scale: float, window: int | None,
                 read: Reader) -> torch.Tensor:
    """q [T, H, Dh] over the context of every request (this step's K/V already stored) -> [T, H * Dh]."""
    T, H, Dh = q.shape
    out = torch.empty(T, H, Dh, dtype=q.dtype, device=q.device)
    B = meta.num_decodes
    if B:
        kc, vc = read(meta.decode_block_tables)  # [B, C, K, Dh]
        out[:B] = weighted_values(decode_probs(q[:B], kc, meta.decode_mask(window), scale), vc).to(q.dtype)
    for i, chunk in enumerate(meta.prefills):
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        ctx = chunk.start_pos + chunk.q_len
        kc, vc = read(chunk.block_ids)
        out[rows] = prefill_attention(q[rows], kc[:ctx], vc[:ctx], meta.prefill_mask(i, window), scale).to(q.dtype)
    return out.view(T, H * Dh)
