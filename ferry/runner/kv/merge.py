"""`merge`: layers below L // 2 stored like `full`; from there on, adjacent layers (l, l + 1) share one tensor of
unit directions (MiniCache). Sizes and the pairing: ferry/kvcache/policies/merge.py.

Per pair p and block, for K (i = 0) and V (i = 1):
    dirs  [P, N, 2, bs, K, Dh]   one unit direction per (token, head): the SLERP midpoint of the two layers'
                                 directions, or layer l's own direction for a retained token
    mags  [P, N, 2, 2, bs, K]    float32 magnitude per layer (0: l, 1: l + 1), K/V, token, head
    kept  [P, N, 2, R, K, Dh]    layer l+1's exact vectors of the retained tokens (R slots per block and head)
    slot  [P, N, 2, bs, K]       int8: the kept slot of a retained token, -1 for a merged one
so a merged pair costs one layer's K/V plus magnitudes, retention slots and the slot map.

Writing: layer l stores its own direction and magnitude (so its queries of this step see their own K/V
exactly); layer l + 1 then reads that direction back, and per token either merges (direction := SLERP midpoint,
t = 1/2, i.e. normalize(a + b)) or, if the angle is above --kv-merge-angle and the block still has a slot for
that head, retains (direction stays layer l's, layer l+1's exact vector goes to a kept slot). Within one write
the most distinct tokens of a block get its free slots first; across writes (decode) first come, first served.
A slot count is never stored: a block's retained tokens before this write hold slots 0..n-1, and n is counted
from the slot map at the offsets written before (blocks are filled from offset 0, so later offsets of a reused
block are stale and ignored). Reading: layer l = direction * magnitude_l (exact where retained), layer l + 1 =
direction * magnitude_{l+1}, or its kept vector where retained; parallel vectors reconstruct exactly.
Legend: L layers, P merged pairs, N blocks, bs block size, R kept slots, T tokens, K kv heads, Dh head dim.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ferry.models.layers.attention import AttnMetadata, LayerKV
from ferry.runner.kv.base import PolicyKV, register_policy_kv
from ferry.runner.kv.dense import attend_dense
from ferry.runner.kv.full import PagedLayer
from ferry.runner.kv.storage import BlockLayout, BlockTensors


class MergeLayer(LayerKV):
    """Layer `first` (second=False) or `first + 1` (second=True) of merged pair p."""

    def __init__(self, owner: MergeKV, p: int, second: bool) -> None:
        self.owner, self.p, self.second = owner, p, second
        self.dirs, self.mags, self.kept, self.slot = (t[p] for t in owner.pair_tensors)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata, scale: float,
               window: int | None) -> torch.Tensor:
        self.write(k, v, meta.slot_mapping)
        return attend_dense(q, meta, scale, window, self.read)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        bs = self.dirs.shape[2]
        b, o = slots // bs, slots % bs
        for i, x in enumerate((k, v)):
            x = x.float()  # [T, K, Dh]
            norm = x.norm(dim=-1)  # [T, K]
            unit = x / norm.clamp_min(1e-12)[..., None]
            self.mags[b, int(self.second), i, o] = norm
            if not self.second:
                self.dirs[b, i, o] = unit.to(self.dirs.dtype)
                self.slot[b, i, o] = -1
            else:
                self._merge(b, o, i, x, unit)

    def _merge(self, b: torch.Tensor, o: torch.Tensor, i: int, x: torch.Tensor, unit: torch.Tensor) -> None:
        """Layer l+1's x [T, K, Dh] (unit: its directions) into the pair, beside layer l's stored directions."""
        a = self.dirs[b, i, o].float()  # layer l's directions, written this step
        angle = torch.acos((a * unit).sum(-1).clamp(-1.0, 1.0))  # [T, K]
        mid = a + unit
        mid_norm = mid.norm(dim=-1, keepdim=True)
        merged = torch.where(mid_norm > 1e-6, mid / mid_norm.clamp_min(1e-6), a)  # SLERP at t = 1/2
        want = angle > math.radians(self.owner.merge_angle)
        slot = self._used_slots(b, o, i) + rank_in_block(b, angle, want)
        keep = want & (slot < self.kept.shape[2])
        self.dirs[b, i, o] = torch.where(keep[..., None], a, merged).to(self.dirs.dtype)
        self.slot[b, i, o] = torch.where(keep, slot, -1).to(torch.int8)
        t, h = keep.nonzero(as_tuple=True)
        self.kept[b[t], i, slot[t, h], h] = x[t, h].to(self.kept.dtype)
        self.owner.num_retained += len(t)
        self.owner.num_merged += int(keep.numel()) - len(t)

    def _used_slots(self, b: torch.Tensor, o: torch.Tensor, i: int) -> torch.Tensor:
        """[T, K]: kept slots already taken in each token's block, by tokens written in earlier steps."""
        bs = self.dirs.shape[2]
        first = torch.full((self.dirs.shape[0],), bs, dtype=torch.long, device=b.device)
        first.scatter_reduce_(0, b, o, "amin")  # first offset this write touches, per block
        earlier = torch.arange(bs, device=b.device)[None, :, None] < first[b][:, None, None]  # [T, bs, 1]
        return ((self.slot[b, i] >= 0) & earlier).sum(1)  # [T, K]

    def read(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """block_ids [..., nb] -> float32 K, V [..., nb * bs, K, Dh] of this layer."""
        out = []
        for i in (0, 1):
            x = self.dirs[block_ids, i].float() * self.mags[block_ids, int(self.second), i][..., None]
            if self.second and self.kept.shape[2]:
                s = self.slot[block_ids, i].long()  # [..., nb, bs, K]
                kept = self.kept[block_ids, i]  # [..., nb, R, K, Dh]
                exact = torch.gather(kept, -3, s.clamp(min=0)[..., None].expand(*s.shape, kept.shape[-1]))
                x = torch.where((s >= 0)[..., None], exact.float(), x)
            out.append(x.flatten(-4, -3))
        return out[0], out[1]


def rank_in_block(b: torch.Tensor, angle: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """[T, K] rank of each wanted (token, head) among the wanted ones of its block in this write, most distinct
    first. A block's tokens are contiguous in the step (one request writes it, in order)."""
    T = b.shape[0]
    run = torch.cat((b.new_zeros(1), (b[1:] != b[:-1]).long().cumsum(0)))  # [T] run id, non-decreasing
    key = run[:, None] * 8.0 + torch.where(want, -angle, 7.0)  # angle <= pi < 4: runs stay apart, wanted first
    order = key.argsort(dim=0, stable=True)  # [T, K]
    taken = want.gather(0, order).long().cumsum(0)  # in sorted order
    starts = torch.where(torch.cat((torch.ones(1, dtype=torch.bool, device=b.device), b[1:] != b[:-1])),
                         torch.arange(T, device=b.device), 0).cummax(0).values  # first row of each row's run
    before = (taken - want.gather(0, order).long()).gather(0, starts[:, None].expand_as(taken))
    rank = torch.empty_like(taken)
    rank.scatter_(0, order, taken - before - 1)
    return rank


@register_policy_kv("merge")
class MergeKV(PolicyKV):
    def __init__(self, policy: Any, layout: BlockLayout, blocks: BlockTensors | None = None) -> None:
        super().__init__(policy, layout, blocks)
        self.merge_angle = policy.options.merge_angle
        self.exact = self.blocks.device["exact"]  # [Le, 2, N, bs, K, Dh]: the layers stored like `full`
        self.pair_tensors = [self.blocks.device[n] for n in ("dirs", "mags", "kept", "slot")]  # see the docstring
        first = {l: p for p, (l, _) in enumerate(policy.pairs)}
        second = {l + 1: p for p, (l, _) in enumerate(policy.pairs)}
        num_layers = layout.model.num_layers
        exact_ids = [l for l in range(num_layers) if l not in first and l not in second]
        self.layers: list[LayerKV] = []
        for l in range(num_layers):
            if l in first or l in second:
                self.layers.append(MergeLayer(self, first.get(l, second.get(l)), l in second))
            else:
                j = exact_ids.index(l)
                self.layers.append(PagedLayer(self.exact[j, 0], self.exact[j, 1]))
        self.num_merged = 0  # (token, head, K/V) rows merged / retained by the second layers of pairs, cumulative
        self.num_retained = 0
