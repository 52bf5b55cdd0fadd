"""Attention over the paged KV cache.

Tokens of one step are laid out flat: first `num_decodes` single-token requests (batched together),
then prefill chunks (one attention call each). Legend: T tokens in the step, H query heads,
K kv heads, G = H / K, Dh head dim, B decode requests, L longest context among them, bs block size.
Prefill attention runs in float32 whatever the weight dtype: its result then does not depend on how a prompt was
cut into chunks (in bfloat16 it does, visibly, and speculative decoding changes the chunks: its output would differ
from the output without it), and where bf16 is emulated float32 is faster anyway.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ferry.ops.paged_attention import paged_decode_attention
from ferry.plan import KVStep


@dataclass
class PrefillChunk:
    q_start: int  # first row of this chunk in the step's flat token layout
    q_len: int  # tokens computed this step
    start_pos: int  # position of the first of them (tokens before it are already in the cache)
    block_ids: torch.Tensor  # [num_blocks] long, the request's block table covering start_pos + q_len
    kv: KVStep = field(default_factory=KVStep)  # the KV policy's decisions for this request in this step


@dataclass
class AttnMetadata:
    """Per-step attention inputs, built once by the runner and shared by every layer."""

    positions: torch.Tensor  # [T] long
    slot_mapping: torch.Tensor  # [T] long: block_id * block_size + offset where each token's K/V goes
    block_size: int
    num_decodes: int  # rows [0, num_decodes) are single-token requests
    decode_block_tables: torch.Tensor  # [B, max_blocks] long, padded with 0 (masked out)
    decode_ctx_lens: torch.Tensor  # [B] long: context length including the new token
    prefills: list[PrefillChunk] = field(default_factory=list)
    decode_kv: list[KVStep] = field(default_factory=list)  # [B] the KV policy's decisions for each decode request
    _masks: dict = field(default_factory=dict)  # (kind, window) -> additive mask, built on first use
    kv_state: Any = None  # the KV policy's state for this step (PolicyKV.begin_step, before the first layer)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, L] additive float32 mask: 0 where the key is visible, -inf elsewhere."""
        key = ("decode", window)
        if key not in self._masks:
            L = self.decode_block_tables.shape[1] * self.block_size
            kpos = torch.arange(L, device=self.positions.device)[None, :]
            qpos = self.positions[: self.num_decodes, None]
            visible = kpos <= qpos
            if window is not None:
                visible &= qpos - kpos < window
            self._masks[key] = torch.zeros(visible.shape, dtype=torch.float32, device=visible.device).masked_fill_(
                ~visible, float("-inf"))[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None) -> torch.Tensor | None:
        """[q_len, ctx] bool mask for chunk i (True = visible), or None when plain causal from 0 applies."""
        chunk = self.prefills[i]
        if chunk.start_pos == 0 and window is None:
            return None
        key = ("prefill", i, window)
        if key not in self._masks:
            ctx = chunk.start_pos + chunk.q_len
            qpos = torch.arange(chunk.start_pos, ctx, device=self.positions.device)[:, None]
            kpos = torch.arange(ctx, device=self.positions.device)[None, :]
            visible = kpos <= qpos
            if window is not None:
                visible &= qpos - kpos < window
            self._masks[key] = visible
        return self._masks[key]


class LayerKV(ABC):
    """One layer's KV as the attention layer sees it: the KV policy's tensor half (ferry/runner/kv/) implements it."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata, scale: float,
               window: int | None) -> torch.Tensor:
        """q [T, H, Dh], k/v [T, K, Dh] of this step: store k/v at meta.slot_mapping, return [T, H*Dh] in q's
        dtype."""


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v: [T, K, Dh] -> cache slots. k_cache: [num_blocks, bs, K, Dh]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttnMetadata, scale: float,
                    window: int | None) -> torch.Tensor:
    """q: [T, H, Dh], k/v: [T, K, Dh] (this step's, already written to the cache). Returns [T, H*Dh] in q's dtype."""
    T, H, Dh = q.shape
    out = torch.empty(T, H, Dh, dtype=q.dtype, device=q.device)
    B = meta.num_decodes
    if B:
        out[:B] = paged_decode_attention(q[:B], k_cache, v_cache, meta.decode_block_tables, meta.decode_ctx_lens,
                                         window, scale).to(q.dtype)
    for i, chunk in enumerate(meta.prefills):
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        if chunk.start_pos == 0:  # nothing cached before: use this step's k/v directly
            kc, vc = k[rows], v[rows]
        else:
            ctx = chunk.start_pos + chunk.q_len
            kc = _gather(k_cache, chunk.block_ids[None])[0, :ctx]
            vc = _gather(v_cache, chunk.block_ids[None])[0, :ctx]
        out[rows] = prefill_attention(q[rows], kc, vc, meta.prefill_mask(i, window), scale).to(q.dtype)
    return out.view(T, H * Dh)


def prefill_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """q [Q, H, Dh], kc/vc [C, K, Dh], mask [Q, C] bool (True: visible) or None (causal from the first key)
    -> float32 [Q, H, Dh]."""
    o = F.scaled_dot_product_attention(
        q.float().transpose(0, 1)[None], kc.float().transpose(0, 1)[None], vc.float().transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    return o[0].transpose(0, 1)


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, bs, K, Dh], block_tables [B, nb] -> [B, nb*bs, K, Dh]."""
    g = cache[block_tables]
    return g.view(g.shape[0], -1, *cache.shape[2:])
