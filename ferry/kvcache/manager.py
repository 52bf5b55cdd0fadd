"""Per-request block tables over the block pool: allocation, prefix-cache lookup, swap bookkeeping, the KV
policy's tiering (blocks that go cold move to host blocks) and its per-step decisions (plan_step). Bookkeeping
only: the tensors are owned by the runner (ferry/runner/kv/).

Block table entries are the plan's (ferry/plan.py): b >= 0 a device block, host_entry(h) a host block (only
policies with a slow tier, such as `spans`, leave those in a running request's table), HOLE a block given back
after the policy compacted the request's tokens into its first blocks (`layer-budget`)."""
from __future__ import annotations

from ferry.kvcache.block_pool import BlockPool, HostBlockPool
from ferry.kvcache.policies.base import KVPolicy
from ferry.kvcache.policies.full import FullPolicy
from ferry.kvcache.prefix_cache import block_hashes
from ferry.plan import HOLE, KVStep, ScheduledReq, host_entry, is_host
from ferry.request import Request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0, policy: KVPolicy | None = None) -> None:
        """policy: the KV policy (left out: full attention over blocks of block_size)."""
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.host = HostBlockPool(num_host_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.policy: KVPolicy = policy if policy is not None else FullPolicy.for_blocks(block_size)
        self.block_tables: dict[str, list[int]] = {}
        self.hashes: dict[str, list[int]] = {}  # hashes of the request's full, computed blocks
        self.max_blocks_used = 0  # high-water mark, for tests of the budget
        self.max_host_blocks_used = 0
        # (device, host) copies of blocks gone cold, for the next plan's swap_out (before any reuse of the device
        # block: the runner does swap_out first)
        self.pending_offloads: list[tuple[int, int]] = []
        self.num_offloaded = 0  # cumulative blocks moved to the slow tier
        self.swapped_blocks: dict[str, list[tuple[int, int]]] = {}  # a swapped request's (device block, generation)
        self.num_swap_in_reused = 0  # cumulative blocks a swap-in took back from the device instead of copying

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
        # cached hits sitting in the free queue stop being free once we take them, unless they go cold (to the
        # host tier) as soon as they are taken
        cold = self._cold_on_arrival(req, len(table), len(computed_blocks))
        reclaimed = sum(1 for i, b in enumerate(computed_blocks, start=len(table))
                        if self.pool.ref_counts[b] == 0 and i not in cold)
        return max(0, want - have) + reclaimed

    def _cold_on_arrival(self, req: Request, start: int, n: int) -> set[int]:
        """Indices start..start+n of prefix hits that the policy sends to host blocks right away (as far as the
        host pool has room): a long cached prefix must not need device blocks for all of it at once."""
        if not n or not self.policy.uses_host_tier:
            return set()
        cold = [i for i in self._cold_blocks(req, start + n) if i >= start]
        return set(cold[:self.host.num_free])

    def _cold_blocks(self, req: Request, num_blocks: int) -> range:
        """The policy's cold blocks for req, under the request's own kv_budget if it has one."""
        return self.policy.for_budget(req.params.kv_budget).cold_blocks(req.num_computed_tokens, num_blocks)

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
            self.offload_cold(req)  # cold hits go to host now (the plan's swap_out copies them before any reuse)
        want = self.num_blocks_for(req.num_computed_tokens + num_new_tokens)
        if want > len(table):
            table.extend(self.pool.allocate(want - len(table)))
        self.max_blocks_used = max(self.max_blocks_used, self.pool.num_used)
        return table

    def plan_step(self, req: Request, num_new_tokens: int, table: list[int]) -> KVStep:
        """The policy's decisions for req computing num_new_tokens over its table this step (under the request's
        own kv_budget if it has one): what travels in the plan to the tensor side."""
        policy = self.policy.for_budget(req.params.kv_budget)
        return policy.plan_step(req.num_computed_tokens, num_new_tokens, table)

    def commit_step(self, req: Request, scheduled: ScheduledReq) -> None:
        """The bookkeeping after a step that computed scheduled.token_ids of req (its num_computed_tokens already
        advanced): index its newly full blocks in the prefix cache, move the blocks gone cold to host blocks, give
        back the blocks the step compacted."""
        self.cache_full_blocks(req)
        self.offload_cold(req)
        if scheduled.kv.compaction is not None:
            self._give_back_compacted(req, scheduled.kv.compaction.kept_blocks, scheduled.kv.compaction.region_blocks)

    def rollback(self, req: Request) -> None:
        """Speculative decoding rejected some of req's tokens: its num_computed_tokens was moved back, so the blocks
        past it are given back (the rejected tokens' slots in its last block are written over by later tokens; a
        block enters the prefix cache only once num_computed_tokens covers it, so rejected tokens never do)."""
        table = self.block_tables.get(req.req_id)
        if not table:
            return
        keep = self.num_blocks_for(req.num_computed_tokens)
        if keep < len(table):
            self.pool.free([b for b in table[keep:][::-1] if b >= 0])
            del table[keep:]

    def cache_full_blocks(self, req: Request) -> None:
        """Index the request's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching or not self.policy.shares_prefix_blocks:
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
            if table[i] >= 0:  # a block already moved to the host tier is not shareable
                self.pool.cache(table[i], h)
        hashes.extend(new)

    def free(self, req: Request) -> None:
        self.free_table(req.req_id)

    def free_table(self, req_id: str) -> None:
        """Give back every block of req_id's table (a request's, or a migration's reservation)."""
        table = self.block_tables.pop(req_id, None)
        self.hashes.pop(req_id, None)
        if table:
            self.pool.free([b for b in table[::-1] if b >= 0])
            self.host.free([host_entry(b) for b in table if is_host(b)])

    def _give_back_compacted(self, req: Request, start: int, stop: int) -> None:
        """The step compacted req's region: its blocks start..stop-1 go back to the pool (HOLE in the table)."""
        table = self.block_tables.get(req.req_id)
        if not table or HOLE in table:
            return
        for i in range(start, stop):
            self.pool.free([table[i]])
            table[i] = HOLE

    # -- migration (a running request's KV handed over from another engine) -------------------------

    def reserve(self, req_id: str, num_blocks: int) -> list[int] | None:
        """Grow req_id's table by num_blocks fresh device blocks before its KV arrives (a live migration's
        destination): the whole table, or None (nothing changed) when they are not free. The table becomes the
        request's when the engine adopts it; free_table gives it back if the migration is called off."""
        if num_blocks > self.pool.num_free:
            return None
        table = self.block_tables.setdefault(req_id, [])
        table.extend(self.pool.allocate(num_blocks))
        self.max_blocks_used = max(self.max_blocks_used, self.pool.num_used)
        return table

    # -- tiering (KV policies with a slow tier) ---------------------------------------------------

    def offload_cold(self, req: Request) -> None:
        """Move req's blocks that the policy calls cold to host blocks (as many as the host pool has room for;
        the rest stay on the device and are read like resident blocks). Called after each step."""
        if not self.policy.uses_host_tier:
            return
        table = self.block_tables.get(req.req_id)
        if not table:
            return
        for i in self._cold_blocks(req, len(table)):
            b = table[i]
            if b < 0:
                continue
            if not self.host.num_free:
                break
            h = self.host.allocate(1)[0]
            self.pending_offloads.append((b, h))
            self.pool.free([b])  # a prefix-cached block keeps its hash until reused: its content is still there
            table[i] = host_entry(h)
            self.num_offloaded += 1
        self.max_host_blocks_used = max(self.max_host_blocks_used, self.host.num_blocks - self.host.num_free)

    def take_offloads(self) -> list[tuple[int, int]]:
        out, self.pending_offloads = self.pending_offloads, []
        return out

    def block_table(self, req: Request) -> list[int]:
        return self.block_tables.get(req.req_id, [])

    # -- swap (preemption to host memory) --------------------------------------------------------

    def can_swap_out(self, req: Request) -> bool:
        return sum(b >= 0 for b in self.block_table(req)) <= self.host.num_free

    def swap_out(self, req: Request) -> list[tuple[int, int]]:
        """Move req's device blocks to host blocks (blocks already there stay): returns (device, host) copies to
        do before the device blocks are reused. Ascending device ids get ascending host ids, so contiguous device
        blocks copy as one group. The device blocks that nobody takes before the swap-in can be taken back instead
        of copied (swap_in with reuse): their (block, generation) is kept to know."""
        table = self.block_tables.pop(req.req_id, [])
        self.hashes.pop(req.req_id, None)
        if not self.policy.uses_host_tier:
            self.swapped_blocks[req.req_id] = [(b, self.pool.generation[b] if b >= 0 else 0) for b in table]
        device = [b for b in table if b >= 0]
        host_of = dict(zip(sorted(device), self.host.allocate(len(device))))
        host_ids = [host_of[b] if b >= 0 else b if b == HOLE else host_entry(b) for b in table]
        req.swapped_block_ids = host_ids
        self.pool.free(device[::-1])
        return sorted((b, h) for b, h in zip(table, host_ids) if b >= 0)  # by device id: runs are groups

    def swap_in(self, req: Request, num_new_tokens: int,
                reuse: bool = False) -> tuple[list[tuple[int, int]], list[int]] | None:
        """Device blocks for a swapped-out request plus room for num_new_tokens more: ((host, device) copies,
        block table), or None if they don't fit. Blocks the policy calls cold stay in their host blocks. With reuse,
        device blocks the request left that nobody was given since are taken back without a copy (FastSwitch's
        reuse: a short preemption costs no copy in; its own blocks only, so the KV is bit for bit the one it swapped
        out, never a prefix-cache twin computed in another batch). Fresh device blocks go to host blocks in
        ascending order of both, so contiguous runs copy as one group. reuse is the fair policy's
        (SchedulingPolicy.reuse_swapped_kv): it changes which blocks stay free, so the schedule, and in bfloat16
        (prefill is not invariant to chunk boundaries, tests/engine/test_speculative_matrix.py) a near-tie token can
        differ from the one FCFS's schedule gives."""
        host_ids = req.swapped_block_ids or []
        want = max(len(host_ids), self.num_blocks_for(req.num_computed_tokens + num_new_tokens))
        keep = set(self._cold_blocks(req, len(host_ids))) if self.policy.uses_host_tier else set()
        keep |= {i for i, h in enumerate(host_ids) if h == HOLE}
        resident = self._resident(self.swapped_blocks.get(req.req_id, []), keep) if reuse else {}
        reclaimed = sum(1 for b in resident.values() if self.pool.ref_counts[b] == 0)
        num_fresh = want - len(keep) - len(resident)
        if num_fresh + reclaimed > self.pool.num_free:
            return None
        self.pool.touch(list(resident.values()))
        fresh = sorted(self.pool.allocate(num_fresh))
        copied = sorted((i for i in range(len(host_ids)) if i not in keep and i not in resident),
                        key=lambda i: host_ids[i])
        device_of = dict(zip(copied + list(range(len(host_ids), want)), fresh))
        device_of.update(resident)
        table = [device_of[i] if i not in keep else HOLE if host_ids[i] == HOLE else host_entry(host_ids[i])
                 for i in range(want)]
        self.block_tables[req.req_id] = table
        self.max_blocks_used = max(self.max_blocks_used, self.pool.num_used)
        self.host.free([host_ids[i] for i in range(len(host_ids)) if i not in keep])
        self.num_swap_in_reused += len(resident)
        self.swapped_blocks.pop(req.req_id, None)
        req.swapped_block_ids = None
        return [(host_ids[i], device_of[i]) for i in copied], table

    def _resident(self, left: list[tuple[int, int]], keep: set[int]) -> dict[int, int]:
        """{table index: device block} of the blocks a swapped-out request left (block, generation) that were not
        handed out since (the pool's generation count unchanged): they still hold its KV."""
        return {i: b for i, (b, gen) in enumerate(left)
                if b >= 0 and i not in keep and self.pool.generation[b] == gen}

    def drop_swapped(self, req: Request) -> None:
        self.swapped_blocks.pop(req.req_id, None)
        if req.swapped_block_ids:
            self.host.free([h for h in req.swapped_block_ids if h != HOLE])
            req.swapped_block_ids = None

    @property
    def all_free(self) -> bool:
        return self.pool.num_free == self.pool.num_blocks and self.host.num_free == self.host.num_blocks
