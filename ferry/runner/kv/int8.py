"""`int8`: K and V stored as int8 with one float32 scale per (token, kv head); dequantized when read.

Symmetric absmax quantization per row of Dh values (the granularity of KIVI's per-token values; per-token keys
are coarser than its per-channel keys but need no grouping across tokens, so a block is final when written).
Every token is kept and read: the baseline the lossy retrieval and pruning policies are compared to.
Legend: L layers, N blocks, bs block size, K kv heads, Dh head dim, B decode requests, C context.
"""
from __future__ import annotations

import torch

from typing import Any

from ferry.models.layers.attention import AttnMetadata, LayerKV, prefill_attention
from ferry.ops.paged_attention import available as paged_decode_attention_available, paged_decode_attention_int8
from ferry.runner.kv.base import PolicyKV, register_policy_kv
from ferry.runner.kv.storage import BlockLayout, BlockTensors


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., Dh] -> (int8 [..., Dh], float32 scale [...]) with x ~= q * scale."""
    x = x.float()
    scale = x.abs().amax(dim=-1).clamp_min(1e-8) / 127.0
    return torch.round(x / scale[..., None]).clamp_(-127, 127).to(torch.int8), scale


class Int8Layer(LayerKV):
    def __init__(self, data: torch.Tensor, scales: torch.Tensor) -> None:
        self.data = data  # [2, N, bs, K, Dh] int8: K then V
        self.scales = scales  # [2, N, bs, K] float32

    def _write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        for i, x in enumerate((k, v)):
            q, s = quantize(x)
            self.data[i].view(-1, *self.data.shape[3:]).index_copy_(0, slots, q)
            self.scales[i].view(-1, self.scales.shape[-1]).index_copy_(0, slots, s)

    def _read(self, i: int, block_tables: torch.Tensor) -> torch.Tensor:
        """block_tables [..., nb] -> float32 [..., nb * bs, K, Dh] dequantized K (i=0) or V (i=1)."""
        q = self.data[i][block_tables].float()  # [..., nb, bs, K, Dh]
        q *= self.scales[i][block_tables][..., None]
        return q.flatten(-4, -3)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata, scale: float,
               window: int | None) -> torch.Tensor:
        self._write(k, v, meta.slot_mapping)
        T, H, Dh = q.shape
        out = torch.empty(T, H, Dh, dtype=q.dtype, device=q.device)
        B = meta.num_decodes
        if B and q.device.type == "cpu" and paged_decode_attention_available():
            out[:B] = paged_decode_attention_int8(q[:B], self.data[0], self.data[1], self.scales[0], self.scales[1],
                                                  meta.decode_block_tables, meta.decode_ctx_lens, window,
                                                  scale).to(q.dtype)
        elif B:
            kc, vc = self._read(0, meta.decode_block_tables), self._read(1, meta.decode_block_tables)  # [B, C, K, Dh]
            K = kc.shape[2]
            qg = q[:B].float().view(B, K, H // K, Dh)
            scores = torch.matmul(qg, kc.permute(0, 2, 3, 1)) * scale  # [B, K, G, C]
            scores += meta.decode_mask(window)
            probs = torch.softmax(scores, dim=-1)
            out[:B] = torch.matmul(probs, vc.transpose(1, 2)).view(B, H, Dh).to(q.dtype)
        for i, chunk in enumerate(meta.prefills):
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            ctx = chunk.start_pos + chunk.q_len
            kc, vc = self._read(0, chunk.block_ids)[:ctx], self._read(1, chunk.block_ids)[:ctx]  # [C, K, Dh]
            out[rows] = prefill_attention(q[rows], kc, vc, meta.prefill_mask(i, window), scale).to(q.dtype)
        return out.view(T, H * Dh)


@register_policy_kv("int8")
class Int8KV(PolicyKV):
    def __init__(self, policy: Any, layout: BlockLayout, blocks: BlockTensors | None = None) -> None:
        super().__init__(policy, layout, blocks)
        self.data = self.blocks.device["data"]  # [L, 2, N, bs, K, Dh] int8
        self.scales = self.blocks.device["scales"]  # [L, 2, N, bs, K] float32
        self.layers = [Int8Layer(self.data[l], self.scales[l]) for l in range(self.data.shape[0])]
