"""Route mode's (R2R) torch-free half: the router's features and scores, its file, and the scheduler + KV manager
with a scripted small model and a fake target: per-request routing in one step, what each request gains, the
first token after a prompt, KV given back."""
from __future__ import annotations

import math

import pytest

from ferry.config import SchedulerConfig
from ferry.errors import InvalidRequest
from ferry.kvcache.manager import KVCacheManager
from ferry.plan import StepResult
from ferry.request import Request, SamplingParams
from ferry.runner.verify import routed
from ferry.scheduler.policies import FCFSPolicy
from ferry.scheduler.scheduler import Scheduler
from ferry.speculative.route import SCORE_EPS, RouteRun, RouteSpeculator, Router, features

SMALL_OFFSET, LARGE_OFFSET = 1000, 2000  # token ids the scripted small model / fake target produce


def test_features_and_scores():
    p1, margin, entropy = features([math.log(0.7), math.log(0.2)])
    assert p1 == pytest.approx(0.7) and margin == pytest.approx(0.5)
    assert entropy == pytest.approx(-(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1)))
    top1 = Router()
    assert top1.score((0.7, 0.5, 0.8)) == pytest.approx(0.3)
    assert top1.score((1.0, 1.0, 0.0)) == SCORE_EPS and top1.score((0.0, 0.0, 5.0)) == 1 - SCORE_EPS  # 0/1 endpoints
    fitted = Router("logistic", (-2.0, 0.0, 1.0), 0.5, (0.5, 0.3, 1.0), (0.2, 0.2, 0.5))
    assert fitted.score((0.9, 0.8, 0.2)) < fitted.score((0.3, 0.1, 2.0))  # confident: less likely to diverge


def test_router_file_round_trip_and_bad_files(tmp_path):
    r = Router("logistic", (-1.0, 0.5, 0.25), 0.1, (0.5, 0.3, 1.0), (0.2, 0.2, 0.5), {"positions": 10})
    r.save(tmp_path / "r.json")
    assert Router.load(tmp_path / "r.json") == r
    assert Router.load(None) == Router()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidRequest, match="cannot read route_router"):
        Router.load(tmp_path / "bad.json")


class _ScriptedSmall:
    """The small model: request r's token at position p is SMALL_OFFSET + p, with top-1 probability 0.2 where
    p is in unsure[r] (the top-1 router at threshold 0.5 sends it to the target) and 0.9 elsewhere."""

    name = "route"

    def __init__(self, unsure: dict[str, set[int]]) -> None:
        self.unsure = unsure
        self.released: list[str] = []

    def route(self, reqs, max_tokens, decide) -> list[RouteRun]:
        runs = []
        for r, cap in zip(reqs, max_tokens):
            run, pos = RouteRun([], None), r.num_tokens
            for depth in range(cap + 1):
                p1 = 0.2 if pos + depth in self.unsure[r.req_id] else 0.9
                if decide((p1, p1, 0.0)):
                    break
                if depth < cap:
                    run.tokens.append(SMALL_OFFSET + pos + depth)
                else:
                    run.next_token = SMALL_OFFSET + pos + depth
            runs.append(run)
        return runs

    def observe(self, req, num_new_tokens):
        pass

    def release(self, req_id):
        self.released.append(req_id)


def _step(s: Scheduler) -> list:
    """A fake target: its token at position p is LARGE_OFFSET + p; route requests gain what runner.verify.routed
    gives."""
    plan = s.schedule()
    result = StepResult()
    for r in plan.reqs:
        if r.sample and (r.route_next_token is None or not r.route):
            result.sampled_token_ids[r.req_id] = LARGE_OFFSET + r.start_pos + len(r.token_ids)
    for r in plan.reqs:
        if r.route:
            result.spec_token_ids[r.req_id] = routed(r, result.sampled_token_ids)
    s.update(plan, result)
    return plan.reqs


def test_each_request_routes_on_its_own_and_kv_is_given_back():
    unsure = {"a": {5, 9, 10}, "b": set()}  # a: positions the router sends to the target; b: none
    small = _ScriptedSmall(unsure)
    spec = RouteSpeculator(small, 3, max_rows=16, router=Router(), threshold=0.5)
    kv = KVCacheManager(num_blocks=64, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, FCFSPolicy(), spec)
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=12, temperature=0), 0.0, max_model_len=100)
    b = Request("b", [1, 2, 3, 4], SamplingParams(max_tokens=12, temperature=0), 0.0, max_model_len=100)
    s.add(a)
    s.add(b)
    first = _step(s)  # both prompts end: a's first token (position 5) is routed, b's (position 4) is the small one's
    assert {r.req_id: (r.route, r.route_next_token) for r in first} == {"a": (False, None), "b": (True, 1004)}
    second = {r.req_id: r for r in _step(s)}
    assert second["a"].route and second["b"].route
    assert second["a"].draft_token_ids == [1006, 1007, 1008] and second["a"].route_next_token is None  # 9 routed
    assert second["b"].draft_token_ids == [1005, 1006, 1007] and second["b"].route_next_token == 1008
    while s.has_unfinished:
        _step(s)
    want_a = [SMALL_OFFSET + p if p not in unsure["a"] else LARGE_OFFSET + p for p in range(5, 17)]
    assert a.output_token_ids == want_a
    assert b.output_token_ids == [SMALL_OFFSET + p for p in range(4, 16)]
    assert spec.stats.num_large_tokens == 3 and spec.stats.num_small_tokens == 21
    assert kv.all_free and kv.pool.num_used == 0 and sorted(small.released) == ["a", "b"]


def test_sampled_requests_get_no_run():
    spec = RouteSpeculator(_ScriptedSmall({"c": set()}), 3, max_rows=16, router=Router(), threshold=0.5)
    kv = KVCacheManager(num_blocks=64, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, FCFSPolicy(), spec)
    c = Request("c", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0.7), 0.0, max_model_len=100)
    s.add(c)
    while s.has_unfinished:
        assert not any(r.route for r in _step(s))
    assert c.output_token_ids == [LARGE_OFFSET + p for p in range(3, 7)] and kv.all_free
