"""Device KV blocks: reference counts, the free queue (LRU order) and the prefix-cache index.

NOTE: a block with ref_count 0 that holds a full, hashed block stays in the prefix-cache index while it
sits in the free queue; it is evicted only when the allocator takes it for someone else. So "free" counts
both empty and cached-but-unused blocks, and the pool is back to all-free once no request holds a block."""
from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # head = evict first
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.num_evictions = 0
        # times each block was handed out: a block whose count has not moved since a request let it go still holds
        # exactly that request's KV (nobody writes a block it does not hold)
        self.generation = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self, n: int) -> list[int]:
        """n blocks from the head of the free queue (evicting their cached contents). Caller checks num_free."""
        if n > len(self.free_queue):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            block, _ = self.free_queue.popitem(last=False)
            h = self.block_hash[block]
            if h is not None:
                if self.cached.get(h) == block:
                    del self.cached[h]
                self.block_hash[block] = None
                self.num_evictions += 1
            self.ref_counts[block] = 1
            self.generation[block] += 1
            out.append(block)
        return out

    def touch(self, blocks: list[int]) -> None:
        """Take a reference on cached blocks (prefix hits), pulling unused ones out of the free queue."""
        for b in blocks:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference on each block. Callers pass a request's blocks in reverse so that the tail of a
        sequence is evicted before its (more shareable) head."""
        for b in blocks:
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} freed twice"
            if self.ref_counts[b] == 0:
                self.free_queue[b] = None

    def lookup(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def cache(self, block: int, block_hash: int) -> None:
        """Register a full block under its prefix hash (first writer wins for duplicate contents)."""
        if self.block_hash[block] is None and block_hash not in self.cached:
            self.block_hash[block] = block_hash
            self.cached[block_hash] = block


class HostBlockPool:
    """Host-memory blocks that hold swapped-out KV. No sharing, no caching. Hands out its lowest free ids first, in
    ascending order, so a swap's blocks tend to be one contiguous group (ferry/runner/kv/storage.py block_runs)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.free_ids = list(range(num_blocks - 1, -1, -1))  # descending: pop() gives the lowest
        self._sorted = True

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free_ids):
            raise RuntimeError(f"asked for {n} host blocks with {len(self.free_ids)} free")
        if not self._sorted:  # frees arrive in runs: timsort merges them in near-linear time
            self.free_ids.sort(reverse=True)
            self._sorted = True
        return [self.free_ids.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        if blocks:
            self.free_ids.extend(blocks)
            self._sorted = False
