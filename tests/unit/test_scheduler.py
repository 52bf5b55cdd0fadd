"""The scheduler in isolation (pure Python): a fake runner returns a fixed token every step."""
from __future__ import annotations

from ferry.config import SchedulerConfig
from ferry.kvcache.manager import KVCacheManager
from ferry.plan import StepResult
from ferry.request import FinishReason, Request, RequestStatus, SamplingParams
from ferry.scheduler.policies import FCFSPolicy, PriorityPolicy
from ferry.scheduler.scheduler import Scheduler


def make(num_blocks=64, block_size=4, policy=FCFSPolicy(), **cfg) -> Scheduler:
    return Scheduler(SchedulerConfig(**cfg), KVCacheManager(num_blocks, block_size), policy)


def req(rid, n_prompt, max_tokens=4, t=0.0, priority=0, first=1) -> Request:
    return Request(rid, list(range(first, first + n_prompt)), SamplingParams(max_tokens=max_tokens, temperature=0), t,
                   max_model_len=10_000, priority=priority)


def step(s: Scheduler, token: int = 7):
    plan = s.schedule()
    result = StepResult({r.req_id: token for r in plan.reqs if r.sample})
    return plan, s.update(plan, result)


def run_all(s: Scheduler, limit=1000):
    for _ in range(limit):
        if not s.has_unfinished:
            return
        step(s)
    raise AssertionError("did not finish")


def test_chunked_prefill_respects_budget_and_mixes_decodes():
    s = make(max_num_batched_tokens=10)
    s.add(req("a", 3, max_tokens=5))
    step(s)  # a prefilled
    s.add(req("b", 25))
    plan, _ = step(s)
    sizes = {r.req_id: len(r.token_ids) for r in plan.reqs}
    assert sizes == {"a": 1, "b": 9} and plan.num_tokens <= 10
    assert not next(r for r in plan.reqs if r.req_id == "b").sample  # mid-prompt chunk: no sampling
    plan, _ = step(s)
    assert {r.req_id: len(r.token_ids) for r in plan.reqs} == {"a": 1, "b": 9}
    run_all(s)
    assert s.kv.all_free


def test_whole_prompts_waits_for_a_step_with_room_instead_of_splitting():
    s = make(max_num_batched_tokens=10, whole_prompts=True)
    for rid, n, first in (("a", 6, 1), ("b", 6, 100), ("c", 25, 200)):  # no prefix hits among them
        s.add(req(rid, n, first=first))
    sizes = lambda plan: {r.req_id: len(r.token_ids) for r in plan.reqs}  # noqa: E731
    assert sizes(step(s)[0]) == {"a": 6}  # b would be split 4 + 2: it waits
    # c is longer than any step: chunked as before
    assert sizes(step(s)[0]) == {"a": 1, "b": 6, "c": 3}
    run_all(s)
    assert s.kv.all_free
    s = make(max_num_batched_tokens=10)
    s.add(req("a", 6)); s.add(req("b", 6, first=100))
    assert sizes(step(s)[0]) == {"a": 6, "b": 4}


def test_requests_finish_at_max_tokens_and_eos():
    s = make()
    a, b = req("a", 5, max_tokens=3), req("b", 5, max_tokens=50)
    b.eos_token_ids = frozenset({7})
    s.add(a)
    s.add(b)
    run_all(s)
    assert a.output_token_ids == [7, 7, 7] and a.finish_reason is FinishReason.LENGTH
    assert b.output_token_ids == [7] and b.finish_reason is FinishReason.STOP
    assert s.kv.all_free


def test_preemption_recompute_when_blocks_run_out():
    s = make(num_blocks=6, block_size=4)  # 24 tokens of KV for two requests that want 2 x 16
    s.add(req("a", 8, max_tokens=8, t=0))
    s.add(req("b", 8, max_tokens=8, t=1))
    run_all(s)
    assert s.num_preemptions > 0
    assert all(r.status is RequestStatus.FINISHED for r in (s.requests.values()))
    assert s.kv.all_free and s.kv.max_blocks_used <= 6


def test_preemption_swap_keeps_computed_tokens():
    s = Scheduler(SchedulerConfig(preemption_mode="swap"), KVCacheManager(6, 4, num_host_blocks=8), FCFSPolicy())
    a, b = req("a", 8, max_tokens=8, t=0), req("b", 8, max_tokens=8, t=1)
    s.add(a)
    s.add(b)
    swapped_out = swapped_in = 0
    while s.has_unfinished:
        plan, _ = step(s)
        swapped_out += len(plan.swap_out)
        swapped_in += len(plan.swap_in)
    # every block swapped out comes back: copied in, or taken back from the device where it still sat
    assert swapped_out > 0 and swapped_in + s.kv.num_swap_in_reused == swapped_out
    assert a.num_output_tokens == b.num_output_tokens == 8
    assert s.kv.all_free


def test_abort_at_any_time_frees_blocks():
    s = make(max_num_batched_tokens=4)
    for i in range(5):
        s.add(req(str(i), 10, max_tokens=20, t=i))
    for k in range(12):
        step(s)
        s.finish(str(k % 5), FinishReason.ABORT)
    run_all(s)
    assert s.kv.all_free and not s.requests


def test_priority_policy_admits_by_priority():
    s = make(max_num_seqs=1, policy=PriorityPolicy())
    s.add(req("late-important", 3, t=5, priority=0))
    s.add(req("early", 3, t=1, priority=1))
    plan, _ = step(s)
    assert [r.req_id for r in plan.reqs] == ["late-important"]


def test_max_num_seqs_caps_running():
    s = make(max_num_seqs=2)
    for i in range(4):
        s.add(req(str(i), 3, t=i))
    plan, _ = step(s)
    assert len(plan.reqs) == 2 and len(s.running) == 2
