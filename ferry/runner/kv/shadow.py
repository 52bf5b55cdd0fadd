"""`shadow` (ShadowKV): resident blocks plus the top-k host blocks by landmark score, with the picked blocks' keys
rebuilt from fast-tier low-rank coefficients and their values read from the host tier.

- Written tokens: K/V go to their device block as usual, and the key's coefficients over the layer's basis
  (lowrank.py; RoPE undone at the token's position) go to the block's coefficient rows beside it.
- A block going cold (swap_out): its host block gets the exact K/V; the fast-tier index gets its coefficients, its
  landmark (the mean of its post-RoPE keys per kv head) and its outlier score (1 - the lowest cosine between one of
  its keys and the landmark: how badly the landmark stands for the block).
- A query (decode, or a prefill chunk as a whole): the landmarks estimate its attention mass per host block (a
  softmax over q . landmark per head, summed over heads); the ceil(top_k / 4) blocks with the worst outlier scores
  are always read and read exactly (their keys from host; ShadowKV keeps outlier chunks exact: a needle among
  ordinary tokens moves its block's mean little but its keys' cosines to it a lot); the rest of the top-k
  have their keys rebuilt (coefficients x basis + offset, RoPE at their positions) and only their values read from
  host. The flow (batched decodes, prefill chunks, resident blocks) is tiered.py's, shared with `spans`.
Legend: L layers, N device blocks, Nh host blocks, bs block size, K kv heads, Dh head dim, r rank, B queries,
n host blocks, k picked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ferry.models.layers.attention import AttnMetadata, write_kv
from ferry.models.layers.rotary import inv_freq_and_scale
from ferry.runner.kv.base import gather_blocks, register_policy_kv
from ferry.runner.kv.lowrank import key_basis, rope_angles, rotate
from ferry.runner.kv.storage import BlockLayout
from ferry.runner.kv.tiered import TieredKV, TieredLayer, TieredStep, span_mass

ALWAYS = 1e9  # added to the estimated mass of the outlier blocks a query always reads


@dataclass
class ShadowStep(TieredStep):
    angles: tuple[torch.Tensor, torch.Tensor]  # cos, sin [T, Dh/2] of the step's positions, for writing coefficients


class ShadowLayer(TieredLayer):
    def write(self, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata) -> None:
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        o = self.owner
        cos, sin = meta.kv_state.angles
        pre = rotate(k, cos, sin, inverse=True).flatten(1) - o.offset[self.layer]  # [T, K*Dh]
        coeffs = o.coeffs[self.layer]  # [N, bs, r]
        coeffs.view(-1, coeffs.shape[-1]).index_copy_(0, meta.slot_mapping, (pre @ o.basis[self.layer]).to(coeffs.dtype))

    def block_scores(self, q: torch.Tensor, host_ids: torch.Tensor, valid: torch.Tensor, top_k: torch.Tensor,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        o = self.owner
        lm = o.landmarks[self.layer, host_ids].float()  # [B, n, K, Dh]
        mass = span_mass(q, lm, lm, scale)  # lo = hi: the bound is q . landmark
        bad = o.outlier[self.layer, host_ids].masked_fill(~valid, -1.0)  # [B, n]
        order = bad.argsort(dim=1, descending=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        exact = (rank < -(-top_k // 4)[:, None]) & valid
        return mass + exact * ALWAYS, exact

    def host_kv(self, host_ids: torch.Tensor, logical: torch.Tensor, exact: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        o, bs = self.owner, self.owner.block_size
        B, k = host_ids.shape
        c = o.index_coeffs[self.layer, host_ids.to(o.index_coeffs.device)].float()  # [B, k, bs, r]
        pre = c @ o.basis[self.layer].T + o.offset[self.layer]  # [B, k, bs, K*Dh]
        pos = logical[..., None] * bs + torch.arange(bs, device=logical.device)  # [B, k, bs]
        cos, sin = rope_angles(pos.to(o.inv_freq.device), o.inv_freq)
        keys = rotate(pre.view(B, k, bs, *self.k_cache.shape[2:]), cos, sin).flatten(1, 2)  # [B, k*bs, K, Dh]
        host = o.storage.host
        if exact is not None and bool(exact.any()):
            b, j = exact.nonzero(as_tuple=True)
            exact_keys = host[self.layer, 0][host_ids[b.cpu(), j.cpu()]].float().to(device)  # [E, bs, K, Dh]
            keys.view(B, k, bs, *keys.shape[2:])[b, j] = exact_keys
        return keys.to(device), gather_blocks(host[self.layer, 1], host_ids).to(device)


@register_policy_kv("shadow")
class ShadowKV(TieredKV):
    def __init__(self, policy: Any, layout: BlockLayout) -> None:
        super().__init__(policy, layout)
        cfg, device = layout.model, layout.device
        self.cfg, self.rank = cfg, policy.rank
        L, K, Dh, r = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, policy.rank
        self.coeffs = self.blocks.device["coeffs"]  # [L, N, bs, r] beside each device block
        # the fast-tier index, per host block: coefficients [L, Nh, bs, r] (copied by swap), landmark [L, Nh, K, Dh],
        # outlier score [L, Nh]
        self.index_coeffs = self.blocks.fast["coeffs"]
        self.landmarks = self.blocks.fast["landmarks"]
        self.outlier = self.blocks.fast["outlier"]
        inv_freq, self.rope_scale = inv_freq_and_scale(cfg.rope, Dh)
        self.inv_freq = inv_freq.to(device)
        # derived from the weights in bind_model (like the model's rotary tables, not KV: not in nbytes); until
        # then the identity basis's first r columns
        self.basis = torch.eye(K * Dh, r, device=device).expand(L, -1, -1).contiguous()  # [L, K*Dh, r]
        self.offset = torch.zeros(L, K * Dh, device=device)
        self.layers = [ShadowLayer(self, l) for l in range(L)]

    def bind_model(self, model: torch.nn.Module) -> None:
        for l, layer in enumerate(model.layers):
            self.basis[l], self.offset[l] = key_basis(self.cfg, layer.attn, layer.input_norm, self.rank,
                                                      self.rope_scale)

    def fast_index_tensors(self) -> list[torch.Tensor]:
        """Fast-tier tensors besides the plain device blocks (what the policy's byte counts add)."""
        return [self.coeffs, self.index_coeffs, self.landmarks, self.outlier]

    def begin_step(self, meta: AttnMetadata) -> ShadowStep:
        return ShadowStep(*self.decode_reads(meta), rope_angles(meta.positions, self.inv_freq))

    def before_swap_out(self, dev: torch.Tensor, host: torch.Tensor) -> None:
        """The landmarks and outlier scores of blocks going cold (their coefficients go with them: the swap copies
        them to the index, and back on swap-in, since a block may go cold again later)."""
        keys = self.storage.kv[:, 0, dev.to(self.coeffs.device)].float()  # [L, n, bs, K, Dh]
        landmarks = keys.mean(dim=2)  # [L, n, K, Dh]
        self.landmarks[:, host] = landmarks.to(self.landmarks.dtype)
        cos = F.cosine_similarity(keys, landmarks[:, :, None], dim=-1)  # [L, n, bs, K]
        self.outlier[:, host] = 1.0 - cos.flatten(2).amin(dim=2)
