"""Block pool and KV cache manager invariants."""
from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from ferry.kvcache.block_pool import BlockPool
from ferry.kvcache.manager import KVCacheManager
from ferry.kvcache.policies import KVShape, make_kv_policy
from ferry.plan import HOLE, ScheduledReq
from ferry.request import Request, SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(), 0.0)


def test_pool_refcounts_and_lru_eviction():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.cache(a[0], 111)
    pool.free(a[::-1])  # a[1] then a[0]: a[1] is evicted first
    assert pool.num_free == 4
    assert pool.lookup(111) == a[0]
    fresh = pool.allocate(3)  # the two never-used blocks, then a[1]; a[0] keeps its cached content
    assert a[1] in fresh and a[0] not in fresh
    assert pool.lookup(111) == a[0]
    pool.touch([a[0]])
    assert pool.num_free == 0 and pool.ref_counts[a[0]] == 1
    pool.free(fresh + [a[0]])
    assert pool.num_free == 4


def test_prefix_hit_shares_blocks_and_leaves_one_token():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", list(range(12)))
    assert kv.allocate_slots(a, 12) is not None
    a.num_computed_tokens = 12
    kv.cache_full_blocks(a)
    b = req("b", list(range(12)))  # same 12 tokens: only 2 blocks may be reused (one token must be computed)
    blocks, n = kv.get_computed_blocks(b)
    assert n == 8 and blocks == kv.block_table(a)[:2]
    b.num_computed_tokens = n
    table = kv.allocate_slots(b, 4, blocks)
    assert table[:2] == kv.block_table(a)[:2] and table[2] != kv.block_table(a)[2]
    assert kv.pool.ref_counts[table[0]] == 2
    kv.free(a)
    kv.free(b)
    assert kv.all_free


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = req("a", list(range(20)))
    assert kv.allocate_slots(a, 20) is None
    assert kv.pool.num_free == 3 and kv.block_table(a) == []


def test_swap_out_and_in_roundtrip():
    kv = KVCacheManager(num_blocks=4, block_size=4, num_host_blocks=4)
    a = req("a", list(range(7)))
    table = list(kv.allocate_slots(a, 7))
    a.num_computed_tokens = 7
    pairs = kv.swap_out(a)
    assert [d for d, _ in pairs] == table and kv.pool.num_free == 4 and kv.host.num_free == 2
    b = req("b", list(range(100, 116)))
    kv.allocate_slots(b, 16)  # b takes every block (a's no longer hold its KV: swap-in must copy)
    kv.free(b)
    back, new_table = kv.swap_in(a, 1)
    assert [h for h, _ in back] == [h for _, h in pairs] and len(new_table) == 2
    assert kv.host.num_free == 4
    kv.free(a)
    assert kv.all_free


def test_compacted_table_gives_back_blocks_and_keeps_its_holes_through_swap():
    policy = make_kv_policy("layer-budget", KVShape(2, 1, 4, 4, 4), budget=0.25)
    kv = KVCacheManager(num_blocks=30, block_size=4, num_host_blocks=30, enable_prefix_caching=False, policy=policy)
    a = req("a", list(range(101)))
    kv.allocate_slots(a, 101)
    a.num_computed_tokens = 100
    step = kv.plan_step(a, 1, kv.block_table(a))  # its first single-token step, after 100 tokens
    assert (step.compaction.kept_blocks, step.compaction.region_blocks) == (7, 25)
    scheduled = ScheduledReq("a", [100], 100, kv.block_table(a), True, a.params, a.all_token_ids, 101, kv=step)
    a.num_computed_tokens = 101
    kv.commit_step(a, scheduled)  # blocks 7..24 go back
    table = kv.block_table(a)
    assert [i for i, b in enumerate(table) if b == HOLE] == list(range(7, 25)) and kv.pool.num_used == 8
    assert kv.plan_step(a, 1, table).compaction is None  # once only
    kv.commit_step(a, scheduled)
    assert kv.pool.num_used == 8
    pairs = kv.swap_out(a)
    assert len(pairs) == 8 and kv.host.num_free == 22 and kv.pool.num_used == 0
    _, back = kv.swap_in(a, 1)
    assert [i for i, b in enumerate(back) if b == HOLE] == list(range(7, 25)) and kv.pool.num_used == 8
    assert kv.host.num_free == 30
    kv.swap_out(a)
    kv.drop_swapped(a)  # finished while swapped out
    assert kv.all_free


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3)), min_size=1, max_size=25), st.integers(0, 2**16))
def test_random_workload_never_exceeds_budget_and_frees_everything(ops, seed):
    rng = random.Random(seed)
    kv = KVCacheManager(num_blocks=12, block_size=4)
    live: list[Request] = []
    for i, (length, prefix) in enumerate(ops):
        tokens = [prefix] * 8 + [rng.randrange(50) for _ in range(length)]
        r = req(str(i), tokens)
        blocks, n = kv.get_computed_blocks(r)
        r.num_computed_tokens = n
        if kv.allocate_slots(r, r.num_tokens - n, blocks) is not None:
            r.num_computed_tokens = r.num_tokens
            kv.cache_full_blocks(r)
            live.append(r)
        assert kv.pool.num_used <= 12
        if live and rng.random() < 0.5:
            kv.free(live.pop(rng.randrange(len(live))))
    for r in live:
        kv.free(r)
    assert kv.all_free
    assert all(c == 0 for c in kv.pool.ref_counts)
