"""Prefix hashes of full KV blocks. Block i's hash covers every token up to the end of block i, chained
through the parent's hash; the token tuple is part of the hashed key, so two blocks share a hash only
if their whole prefixes are equal (up to a 64-bit collision of the parent chain)."""
from __future__ import annotations


def block_hashes(token_ids: list[int], block_size: int, start: int = 0, parent: int | None = None) -> list[int]:
    """Hashes of the full blocks from block index `start` on, chained from `parent` (the hash of block start-1)."""
    out = []
    h = parent if parent is not None else 0
    for i in range(start, len(token_ids) // block_size):
        h = hash((h, tuple(token_ids[i * block_size:(i + 1) * block_size])))
        out.append(h)
    return out
