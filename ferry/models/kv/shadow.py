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

import torch
import torch.nn.functional as F

from ferry.config import ModelConfig
from ferry.kvcache.policies.shadow import ShadowPolicy
from ferry.models.kv.base import gather_blocks
from ferry.models.kv.lowrank import key_basis, rope_angles, rotate
from ferry.models.kv.tiered import TieredKV, TieredLayer, span_mass
from ferry.models.layers.attention import AttnMetadata, write_kv
from ferry.models.layers.rotary import inv_freq_and_scale

ALWAYS = 1e9  # added to the estimated mass of the outlier blocks a query always reads


class ShadowLayer(TieredLayer):
    def write(self, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata) -> None:
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        o = self.owner
        cos, sin = o.step_angles(meta)
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


class ShadowKV(TieredKV):
    def __init__(self, policy: ShadowPolicy, cfg: ModelConfig, num_blocks: int, num_host_blocks: int,
                 block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(policy, cfg, num_blocks, num_host_blocks, block_size, dtype, device)
        self.cfg, self.rank = cfg, policy.rank
        L, K, Dh, r = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, policy.rank
        self.coeffs = torch.zeros(L, num_blocks, block_size, r, dtype=dtype, device=device)  # beside each device block
        # the fast-tier index, per host block: coefficients, landmark, outlier score
        self.index_coeffs = torch.zeros(L, num_host_blocks, block_size, r, dtype=dtype, device=device)
        self.landmarks = torch.zeros(L, num_host_blocks, K, Dh, dtype=dtype, device=device)
        self.outlier = torch.zeros(L, num_host_blocks, dtype=torch.float32, device=device)
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

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes + sum(t.numel() * t.element_size() for t in self.fast_index_tensors())

    def fast_index_tensors(self) -> list[torch.Tensor]:
        """Fast-tier tensors besides the plain device blocks (what the policy's byte counts add)."""
        return [self.coeffs, self.index_coeffs, self.landmarks, self.outlier]

    def step_angles(self, meta: AttnMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, Dh/2] of the step's positions (once per step for every layer)."""
        if "shadow" not in meta.policy_state:
            meta.policy_state["shadow"] = rope_angles(meta.positions, self.inv_freq)
        return meta.policy_state["shadow"]

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            dev, host = (torch.tensor(x) for x in zip(*pairs))
            dev = dev.to(self.coeffs.device)
            keys = self.storage.kv[:, 0, dev].float()  # [L, n, bs, K, Dh]
            landmarks = keys.mean(dim=2)  # [L, n, K, Dh]
            self.landmarks[:, host] = landmarks.to(self.landmarks.dtype)
            cos = F.cosine_similarity(keys, landmarks[:, :, None], dim=-1)  # [L, n, bs, K]
            self.outlier[:, host] = 1.0 - cos.flatten(2).amin(dim=2)
            self.index_coeffs[:, host] = self.coeffs[:, dev]
        self.storage.swap_out(pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:  # a block back from swap takes its coefficients with it (it may go cold again later)
            host, dev = (torch.tensor(x) for x in zip(*pairs))
            self.coeffs[:, dev.to(self.coeffs.device)] = self.index_coeffs[:, host]
        self.storage.swap_in(pairs)
