"""`merge`: cross-layer KV merging in the deeper half of the model (MiniCache).

From layer L // 2 on, adjacent layers (l, l + 1) are merged in pairs (an odd last layer stays exact): per
token, kv head and K or V, the pair stores one shared unit direction (the SLERP midpoint of the two layers'
normalized vectors), each layer's magnitude (a float32 scalar), and up to `retained_slots` exact vectors of layer
l + 1 per block and head for the tokens whose two directions are the most distinct (angle above
--kv-merge-angle; a retained token's shared direction is layer l's own, so both layers stay exact). The layers
below L // 2 are stored like `full`.

Scheduler side: only the block size in bytes changes (every token is kept and read); the layout is
ferry/models/kv/merge.py's, and these sizes are its tensors' (tests check).
"""
from __future__ import annotations

import math

from ferry.kvcache.policies.base import KVPolicy

MAG_BYTES = 4  # float32 magnitude per (token, kv head, K or V, layer)
SLOT_BYTES = 1  # int8 retention slot per (token, kv head, K or V): -1 merged, else the slot of layer l+1's vector


def merge_pairs(num_layers: int) -> list[tuple[int, int]]:
    """(l, l + 1) pairs merged: from the middle layer on."""
    return [(l, l + 1) for l in range(num_layers // 2, num_layers - 1, 2)]


class MergePolicy(KVPolicy):
    name = "merge"
    options = frozenset({"merge_angle", "merge_retain"})

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return merge_pairs(self.shape.num_layers)

    @property
    def num_exact_layers(self) -> int:
        return self.shape.num_layers - 2 * len(self.pairs)

    @property
    def retained_slots(self) -> int:
        """Exact layer-(l+1) vectors a block keeps per kv head and K or V (at most 127: the slot map is int8)."""
        return min(127, math.ceil(self.cfg.merge_retain * self.shape.block_size))

    def pair_bytes_per_block(self) -> int:
        s = self.shape
        rows = s.block_size * s.num_kv_heads  # (token, head) rows of one block, for K and for V each
        directions = 2 * rows * s.head_dim * s.dtype_bytes
        magnitudes = 2 * 2 * rows * MAG_BYTES  # two layers
        retained = 2 * self.retained_slots * s.num_kv_heads * s.head_dim * s.dtype_bytes
        return directions + magnitudes + retained + 2 * rows * SLOT_BYTES

    def device_bytes_per_block(self) -> int:
        s = self.shape
        exact = 2 * self.num_exact_layers * s.block_size * s.num_kv_heads * s.head_dim * s.dtype_bytes
        return exact + len(self.pairs) * self.pair_bytes_per_block()
