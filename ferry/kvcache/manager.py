"""Per-request block tables over the block pool: allocation, prefix-cache lookup, swap bookkeeping.
Bookkeeping only: the tensors live in kvcache/storage.py, owned by the runner."""
from __future__ import annotations

from ferry.kvcache.block_pool import BlockPool, HostBlockPool
from ferry.kvcache.prefix_cache import block_hashes
from ferry.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.host = HostBlockPool(num_host_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.block_tables: dict[str, list[int]] = {}
        self.hashes: dict[str, list[int]] = {}  # hashes of the request's full, computed blocks
        self.max_blocks_used = 0  # high-water mark, for tests of the budget

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of full blocks: (block ids, number of tokens they hold). At least one token
        is always left to compute, because the step must produce logits for the last one."""
        if not self.enable_prefix_caching:
            return [], 0
        limit = (req.num_tokens - 1) // self.block_size
        hits = []
        for h in block_hashes(req.all_token_ids[:limit * self.block_size], self.block_size):
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def can_allocate(self, req: Request, num_new_tokens: int, computed_blocks: list[int] = ()) -> bool:
        return self._num_needed(req, num_new_tokens, computed_blocks) <= self.pool.num_free

    def _num_needed(self, req: Request, num_new_tokens: int, computed_blocks: list[int]) -> int:
        table = self.block_tables.get(req.req_id, [])
        have = len(table) + len(computed_blocks)
        want = self.num_blocks_for(req.num_computed_tokens + num_new_tokens)
        # cached hits sitting in the free queue stop being free once we take them
        reclaimed = sum(1 for b in computed_blocks if self.pool.ref_counts[b] == 0)
        return max(0, want - have) + reclaimed

    def allocate_slots(self, req: Request, num_new_tokens: int, computed_blocks: list[int] = ()) -> list[int] | None:
        """Grow req's block table to cover num_computed_tokens + num_new_tokens (taking prefix hits first).
        Returns the whole table, or None (and changes nothing) if there are not enough free blocks."""
        if not self.can_allocate(req, num_new_tokens, computed_blocks):
            return None
        table = self.block_tables.setdefault(req.req_id, [])
        if computed_blocks:
            self.pool.touch(list(computed_blocks))
            table.extend(computed_blocks)
            self.hashes[req.req_id] = block_hashes(req.all_token_ids[:len(table) * self.block_size], self.block_size)
        want = self.num_blocks_for(req.num_computed_tokens + num_new_tokens)
        if want > len(table):
            table.extend(self.pool.allocate(want - len(table)))
        self.max_blocks_used = max(self.max_blocks_used, self.pool.num_used)
        return table

    def cache_full_blocks(self, req: Request) -> None:
        """Index the request's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self.block_tables.get(req.req_id)
        if not table:
            return
        hashes = self.hashes.setdefault(req.req_id, [])
        num_full = min(req.num_computed_tokens // self.block_size, len(table))
        if num_full <= len(hashes):
            return
        new = block_hashes(req.all_token_ids[:num_full * self.block_size], self.block_size,
                           start=len(hashes), parent=hashes[-1] if hashes else None)
        for i, h in enumerate(new, start=len(hashes)):
            self.pool.cache(table[i], h)
        hashes.extend(new)

    def free(self, req: Request) -> None:
        table = self.block_tables.pop(req.req_id, None)
        self.hashes.pop(req.req_id, None)
        if table:
            self.pool.free(table[::-1])

    def block_table(self, req: Request) -> list[int]:
        return self.block_tables.get(req.req_id, [])

    # -- swap (preemption to host memory) --------------------------------------------------------

    def can_swap_out(self, req: Request) -> bool:
        return len(self.block_table(req)) <= self.host.num_free

    def swap_out(self, req: Request) -> list[tuple[int, int]]:
        """Move req's blocks to host blocks: returns (device, host) copies to do before they are reused."""
        table = self.block_table(req)
        host_ids = self.host.allocate(len(table))
        req.swapped_block_ids = host_ids
        pairs = list(zip(table, host_ids))
        self.free(req)
        return pairs

    def swap_in(self, req: Request, num_new_tokens: int) -> tuple[list[tuple[int, int]], list[int]] | None:
        """Fresh device blocks for a swapped-out request plus room for num_new_tokens more:
        ((host, device) copies, block table), or None if they don't fit."""
        host_ids = req.swapped_block_ids or []
        want = max(len(host_ids), self.num_blocks_for(req.num_computed_tokens + num_new_tokens))
        if want > self.pool.num_free:
            return None
        table = self.pool.allocate(want)
        self.block_tables[req.req_id] = table
        self.max_blocks_used = max(self.max_blocks_used, self.pool.num_used)
        pairs = list(zip(host_ids, table))
        self.host.free(host_ids)
        req.swapped_block_ids = None
        return pairs, table

    def drop_swapped(self, req: Request) -> None:
        if req.swapped_block_ids:
            self.host.free(req.swapped_block_ids)
            req.swapped_block_ids = None

    @property
    def all_free(self) -> bool:
        return self.pool.num_free == self.pool.num_blocks and self.host.num_free == self.host.num_blocks
