"""The fair scheduling policy in the scheduler (pure Python, a fake runner that samples token 7): shares of tokens
per client over the window, no starvation, no KV leak, reuse of a preempted request's KV; block groups."""
from __future__ import annotations

from collections import Counter

import pytest

from ferry.config import SchedulerConfig
from ferry.kvcache.block_pool import HostBlockPool
from ferry.kvcache.manager import KVCacheManager
from ferry.plan import StepResult
from ferry.request import Request, RequestStatus, SamplingParams
from ferry.scheduler.fair import FairPolicy, ServiceWindow
from ferry.scheduler.policies import FCFSPolicy
from ferry.scheduler.scheduler import Scheduler

PROMPT, MAX_TOKENS = 8, 40


def req(rid: str, user: str | None, t: float, first: int, n: int = PROMPT, max_tokens: int = MAX_TOKENS) -> Request:
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens, temperature=0), t,
                   max_model_len=10_000, user=user)


def make(policy, slots: int, mode: str = "recompute", num_blocks: int = 256) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=slots, max_num_batched_tokens=64, preemption_mode=mode),
                     KVCacheManager(num_blocks, 4, num_host_blocks=256), policy)


def flood(s: Scheduler, num_flood: int = 24, num_light: int = 12, light_at: int = 10, limit: int = 5000):
    """Client "flood" queues num_flood requests at once; "light" queues num_light at step light_at. Returns, per step,
    tokens sampled per client and whether both clients still had at least max_num_seqs requests (both want every
    slot: equal shares are what fairness owes them)."""
    for i in range(num_flood):
        s.add(req(f"f{i}", "flood", i, 1000 * i))
    sampled, both_busy = [], []
    for k in range(limit):
        if k == light_at:
            for i in range(num_light):
                s.add(req(f"l{i}", "light", 100 + i, 100_000 + 1000 * i))
        if not s.has_unfinished:
            return sampled, both_busy
        left = Counter(r.user for r in s.requests.values())
        both_busy.append(min(left["flood"], left["light"]) >= s.cfg.max_num_seqs)
        plan = s.schedule()
        result = StepResult({r.req_id: 7 for r in plan.reqs if r.sample})
        sampled.append(Counter(s.requests[rid].user for rid in result.sampled_token_ids))
        s.update(plan, result)
    raise AssertionError("did not finish")


@pytest.mark.parametrize("slots", [1, 3, 4])
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_shares_stay_within_the_bound_over_every_window(slots, mode):
    """Over every window of W steps in which both clients want every slot, each gets half the tokens up to
    (quantum + slots + prompt) / (2 * slots * W): the quantum is the lead a client may take before it loses a slot,
    plus one step's tokens and one prompt charged at once. With 4 slots that is within 10% of an equal share."""
    window, quantum = 64, 16
    s = make(FairPolicy(window_steps=window, quantum=quantum), slots, mode)
    sampled, both_busy = flood(s)
    bound = (quantum + slots + PROMPT) / (2 * slots * window)
    deviations = []
    for a in range(10 + window, len(sampled) - window):  # after the light client's first window
        if all(both_busy[a:a + window]):
            got = sum(sampled[a:a + window], Counter())
            deviations.append(abs(got["light"] / sum(got.values()) - 0.5))
    assert len(deviations) > 10, "the workload never kept both clients busy for a window"
    assert max(deviations) <= bound, (max(deviations), bound)
    if slots == 4:
        assert max(deviations) <= 0.05  # each share within 10% of 1/2
    assert s.num_fair_preemptions > 0 and s.kv.all_free and not s.requests


def test_fcfs_serves_the_flood_first():
    """The baseline the policy fixes: under FCFS the light client gets nothing until the flood drains."""
    s = make(FCFSPolicy(), 4)
    sampled, _ = flood(s)
    assert sum(sampled[10:100], Counter())["light"] == 0


def test_nobody_starves():
    """Three clients, one slot, a flood from one; the two others send a request each time their previous one ends
    (a conversation). Every request finishes, every conversation turn starts (first token) within two windows,
    and the allocators end empty."""
    window = 32
    s = make(FairPolicy(window_steps=window, quantum=8), 1, num_blocks=64)
    for i in range(12):
        s.add(req(f"f{i}", "flood", i, 1000 * i))
    turns = {"a": 0, None: 0}
    added: dict[str, int] = {}
    first_token: dict[str, int] = {}
    for k in range(4000):
        for user, n in turns.items():
            if n < 4 and not any(r.user == user for r in s.requests.values()):
                rid = f"{user}-{n}"
                s.add(req(rid, user, 100 + k, 100_000 * (1 + n) + (user is None) * 50_000))
                added[rid], turns[user] = k, n + 1
        if not s.has_unfinished:
            break
        plan = s.schedule()
        result = StepResult({r.req_id: 7 for r in plan.reqs if r.sample})
        for rid in result.sampled_token_ids:
            first_token.setdefault(rid, k)
        s.update(plan, result)
    assert not s.has_unfinished and turns == {"a": 4, None: 4}
    waits = {rid: first_token[rid] - added[rid] for rid in added}
    assert max(waits.values()) <= 2 * window, waits
    assert s.kv.all_free


def test_order_is_round_robin_over_clients_least_served_first():
    policy = FairPolicy()
    policy.window.add("b", 100)
    policy.window.end_step()
    waiting = [req("a1", "a", 1, 0), req("a2", "a", 2, 100), req("b1", "b", 0, 200), req("n1", None, 3, 300)]
    running = [req("b0", "b", -1, 400)]
    assert [r.req_id for r in policy.order(waiting, running)] == ["a1", "n1", "a2", "b1"]


def test_window_forgets_old_steps_and_recompute_is_not_charged_twice():
    window = ServiceWindow(2)
    for n in (5, 7, 11):
        window.add("x", n)
        window.end_step()
    assert window.served("x") == 18
    policy = FairPolicy()
    r = req("r", "x", 0, 0)
    r.num_computed_tokens = 8
    policy.charge(r)
    r.num_computed_tokens = 4  # recomputing after a preemption
    policy.charge(r)
    r.num_computed_tokens = 9
    policy.charge(r)
    policy.end_step()
    assert policy.window.served("x") == 9


def test_shares_name_at_most_eight_clients():
    policy = FairPolicy()
    for i in range(12):
        policy.window.add(f"user{i}", 10 + i)
    policy.window.add("", 1)
    policy.end_step()
    shares = policy.shares()
    assert len(shares) == 9 and "other" in shares and "user11" in shares
    assert abs(sum(shares.values()) - 1) < 1e-9


def _preempted_for_fairness(mode: str) -> tuple[Scheduler, Request]:
    """One slot; "a" runs long enough to be over its share, then "b" arrives and takes the slot."""
    s = make(FairPolicy(window_steps=64, quantum=8), 1, mode, num_blocks=32)
    a = req("a", "a", 0, 0, n=8, max_tokens=30)
    s.add(a)
    for _ in range(12):
        s.update(plan := s.schedule(), StepResult({r.req_id: 7 for r in plan.reqs if r.sample}))
    s.add(req("b", "b", 1, 5000, n=4, max_tokens=3))
    plan = s.schedule()
    assert a.status is RequestStatus.PREEMPTED and s.num_fair_preemptions == 1
    s.update(plan, StepResult({r.req_id: 7 for r in plan.reqs if r.sample}))
    return s, a


def test_preempted_request_finds_its_kv_in_the_prefix_cache_on_recompute():
    s, a = _preempted_for_fairness("recompute")
    computed_before = 8 + 11  # prompt + outputs whose KV was computed
    while a.status is not RequestStatus.RUNNING:
        plan = s.schedule()
        s.update(plan, StepResult({r.req_id: 7 for r in plan.reqs if r.sample}))
    resumed = next(r for r in plan.reqs if r.req_id == "a")
    assert resumed.start_pos == computed_before // 4 * 4  # only the partial last block is recomputed
    while s.has_unfinished:
        plan = s.schedule()
        s.update(plan, StepResult({r.req_id: 7 for r in plan.reqs if r.sample}))
    assert s.kv.all_free


def test_preempted_request_takes_its_blocks_back_without_a_copy_on_swap_in():
    s, a = _preempted_for_fairness("swap")
    swapped_in = []
    while s.has_unfinished:
        plan = s.schedule()
        swapped_in += plan.swap_in
        s.update(plan, StepResult({r.req_id: 7 for r in plan.reqs if r.sample}))
    assert s.kv.num_swap_in_reused == -(-(8 + 11) // 4)  # its blocks were still on the device, nobody took them
    assert not swapped_in  # so nothing is copied back
    assert s.kv.all_free and a.num_output_tokens == 30


def test_host_pool_hands_out_contiguous_ids_and_runs_group_them():
    from ferry.runner.kv.storage import block_runs
    pool = HostBlockPool(16)
    first = pool.allocate(4)
    pool.free([first[2], first[0], first[3], first[1]])
    assert pool.allocate(6) == list(range(6))
    assert block_runs([(3, 9), (5, 0), (6, 1), (7, 2), (9, 3), (10, 4)]) == [(3, 9, 1), (5, 0, 3), (9, 3, 2)]
    assert block_runs([(5, 0), (6, 1), (5, 0)]) == [(5, 0, 2), (5, 0, 1)]  # order kept: a repeated copy stays last


def test_swap_out_gives_contiguous_device_blocks_contiguous_host_blocks():
    kv = KVCacheManager(16, 4, enable_prefix_caching=False, num_host_blocks=16)
    r = req("r", None, 0, 0, n=16)
    table = kv.allocate_slots(r, 16)
    table[:] = [table[2], table[0], table[3], table[1]]  # a table out of block order
    r.num_computed_tokens = 16
    from ferry.runner.kv.storage import block_runs
    pairs = kv.swap_out(r)
    assert len(pairs) == 4 and len(block_runs(pairs)) == 1
    other = req("o", None, 1, 500, n=64)
    kv.allocate_slots(other, 64)  # takes every block: r's blocks no longer hold its KV
    kv.free(other)
    pairs, _ = kv.swap_in(r, 1)
    assert len(pairs) == 4 and len(block_runs(pairs)) == 1 and kv.num_swap_in_reused == 0
