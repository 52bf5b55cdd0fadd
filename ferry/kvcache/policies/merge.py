"""`merge`: cross-layer KV merging in the deeper half of the model (MiniCache).

From layer L // 2 on, adjacent layers (l, l + 1) are merged in pairs (an odd last layer stays exact): per
token, kv head and K or V, the pair stores one shared unit direction (the SLERP midpoint of the two layers'
normalized vectors), each layer's magnitude (a float32 scalar), and up to `retained_slots` exact vectors of layer
l + 1 per block and head for the tokens whose two directions are the most distinct (angle above
--kv-merge-angle; a retained token's shared direction is layer l's own, so both layers stay exact). The layers
below L // 2 are stored like `full`.

Scheduler side: only the block size in bytes changes (every token is kept and read); the layout is
ferry/runner/kv/merge.py's, and these sizes are its tensors' (tests check).
"""
from __future__ import annotations

import math

from dataclasses import dataclass

from ferry.config import KVOptions
from ferry.errors import InvalidRequest
from ferry.kvcache.policies.base import KVPolicy, flag, register_kv_policy
from ferry.plan import BlockTensor


def merge_pairs(num_layers: int) -> list[tuple[int, int]]:
    """(l, l + 1) pairs merged: from the middle layer on."""
    return [(l, l + 1) for l in range(num_layers // 2, num_layers - 1, 2)]


@dataclass(frozen=True)
class MergeOptions(KVOptions):
    merge_angle: float = flag(30.0, float, "degrees between two layers' K (or V) directions above which a token may "
                                           "keep both exact vectors")
    merge_retain: float = flag(0.125, float, "fraction of each block's tokens (per kv head) that can keep exact "
                                             "vectors (the most distinct ones); each costs one vector of memory")

    def __post_init__(self) -> None:
        if not 0 <= self.merge_retain <= 1 or not 0 <= self.merge_angle <= 180:
            raise InvalidRequest("kv_merge_retain must be in [0, 1] and kv_merge_angle in [0, 180] degrees")


@register_kv_policy
class MergePolicy(KVPolicy):
    name = "merge"
    summary = ("merge (layers L/2.. merged in adjacent pairs: one direction, two magnitudes, distinct tokens kept "
               "exact)")
    Options = MergeOptions

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return merge_pairs(self.shape.num_layers)

    @property
    def num_exact_layers(self) -> int:
        return self.shape.num_layers - 2 * len(self.pairs)

    @property
    def retained_slots(self) -> int:
        """Exact layer-(l+1) vectors a block keeps per kv head and K or V (at most 127: the slot map is int8)."""
        return min(127, math.ceil(self.options.merge_retain * self.shape.block_size))

    def block_tensors(self) -> list[BlockTensor]:
        """The exact layers as `full`; per merged pair p (ferry/runner/kv/merge.py has the layout): unit directions,
        float32 magnitudes of both layers, retained exact vectors, and the int8 retention slot per (token, kv head,
        K or V) (-1: merged)."""
        s, P, R = self.shape, len(self.pairs), self.retained_slots
        bs, K, Dh = s.block_size, s.num_kv_heads, s.head_dim
        return [BlockTensor("exact", (self.num_exact_layers, 2), (bs, K, Dh), "model"),
                BlockTensor("dirs", (P,), (2, bs, K, Dh), "model"),
                BlockTensor("mags", (P,), (2, 2, bs, K), "float32"),
                BlockTensor("kept", (P,), (2, R, K, Dh), "model"),
                BlockTensor("slot", (P,), (2, bs, K), "int8", fill=-1)]

    def pair_bytes_per_block(self) -> int:
        """Bytes of one merged pair in a block."""
        names = ("dirs", "mags", "kept", "slot")
        return sum(t.block_bytes(self.shape.dtype_bytes) // max(1, len(self.pairs)) for t in self.block_tensors()
                   if t.name in names)
