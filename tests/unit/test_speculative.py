"""Speculative decoding's torch-free half: n-gram lookup, the phrase pool, the adaptive draft length (fake
measurements), and the scheduler + KV manager with a fake proposer and a fake target (rollback, prefix cache,
no leaks)."""
from __future__ import annotations

from ferry.config import SchedulerConfig
from ferry.kvcache.manager import KVCacheManager
from ferry.kvcache.prefix_cache import block_hashes
from ferry.plan import StepResult
from ferry.request import Request, SamplingParams
from ferry.scheduler.policies import FCFSPolicy
from ferry.scheduler.scheduler import Scheduler
from ferry.speculative import Speculator
from ferry.speculative.adaptive import EXPLORE_EVERY, AdaptiveK
from ferry.speculative.ngram import NgramProposer, lookup
from ferry.speculative.phrase import HARVEST_EVERY, PhraseProposer


def test_lookup_takes_the_longest_suffix_and_its_most_recent_match():
    tokens = [1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 5, 2, 3]
    assert lookup(tokens, 2, 4, 3) == [7, 7, 5]  # "2 3" last seen before 7 7 5 (not 9 9 1)
    assert lookup(tokens + [7], 1, 4, 2) == [7, 5]  # "2 3 7" is the longest suffix that occurs
    assert lookup([1, 2, 3, 4], 1, 3, 5) == []  # nothing repeats
    assert lookup([5, 5, 5], 1, 1, 4) == [5]  # follow tokens stop at the end of the context


def test_incremental_index_finds_what_a_fresh_lookup_finds():
    import random
    rng = random.Random(0)
    tokens = [rng.randrange(4) for _ in range(20)]
    proposer = NgramProposer(2, 4)
    r = Request("r", tokens, SamplingParams(), 0.0)
    for _ in range(200):
        assert proposer.propose([r], [3]) == [lookup(r.all_token_ids, 2, 4, 3)]
        r.append_output(rng.randrange(4))
    proposer.release("r")
    assert not proposer.indexes


def test_phrase_pool_offers_phrases_across_requests_in_bounded_memory():
    proposer = PhraseProposer(2, 3, max_tokens=64)
    a = Request("a", [1, 2], SamplingParams(), 0.0)
    b = Request("b", [40, 41, 15, 16], SamplingParams(), 0.0)  # ends with a phrase key of request a's output
    for t in range(10, 10 + HARVEST_EVERY - 1):
        a.append_output(t)
        proposer.observe(a, 1)
    assert proposer.propose([b], [4]) == [[]]  # a's output is not in the pool before a full chunk
    a.append_output(10 + HARVEST_EVERY - 1)
    proposer.observe(a, 1)
    assert proposer.propose([b], [4]) == [[17, 18, 19, 20]]
    c = Request("c", [10 + HARVEST_EVERY - 2, 10 + HARVEST_EVERY - 1], SamplingParams(), 0.0)
    for t in (100, 101, 102):
        a.append_output(t)
    assert proposer.propose([c], [4]) == [[]]  # the rest of a joins at its end
    proposer.release("a")
    assert proposer.propose([c], [4]) == [[100, 101, 102]]  # what follows stops at the end of a's text
    assert not proposer.harvested
    for i in range(20):  # other requests' output pushes a's out: the pool keeps at most max_tokens tokens
        d = Request(f"d{i}", [0], SamplingParams(), 0.0)
        for t in range(500, 510):
            d.append_output(t + i)
        proposer.observe(d, 10)
        proposer.release(d.req_id)
        assert len(proposer.pool) <= 64
    assert proposer.propose([b], [4]) == [[]]


def test_phrase_pool_matches_the_longest_suffix():
    proposer = PhraseProposer(1, 3)
    for i, text in enumerate(([5, 6, 7, 1], [9, 6, 7, 2], [4, 6, 7, 3])):
        r = Request(f"r{i}", text[:1], SamplingParams(), 0.0)
        for t in text[1:]:
            r.append_output(t)
        proposer.observe(r, 1)
        proposer.release(r.req_id)
    q = Request("q", [8, 9, 6, 7], SamplingParams(), 0.0)
    assert proposer.propose([q], [2]) == [[2]]  # "9 6 7" beats the more recent "6 7"
    q2 = Request("q2", [0, 6, 7], SamplingParams(), 0.0)
    assert proposer.propose([q2], [2]) == [[3]]  # equal lengths: the most recent


def test_adaptive_k_speculates_when_rows_are_cheap_and_drafts_land():
    c = AdaptiveK(max_k=8, explore_every=0)
    for rows in range(1, 17):
        c.observe_step(rows, 0.010 + 0.0001 * rows)  # overhead-bound: 16 rows cost ~14% more than 1
    for _ in range(50):
        c.observe_acceptance(4, 3)
    assert c.choose(batch=1) >= 4


def test_adaptive_k_turns_speculation_off_when_compute_bound_or_drafts_miss():
    compute_bound = AdaptiveK(max_k=8, explore_every=0)
    for rows in range(1, 33):
        compute_bound.observe_step(rows, 0.001 * rows)  # each row costs as much as a step
    for _ in range(50):
        compute_bound.observe_acceptance(4, 2)
    assert compute_bound.choose(batch=8) == 0
    missing = AdaptiveK(max_k=8, explore_every=0)
    for rows in range(1, 17):
        missing.observe_step(rows, 0.010 + 0.0005 * rows)
    for _ in range(50):
        missing.observe_acceptance(4, 0)
    assert missing.choose(batch=8) == 0
    assert missing.choose(batch=1) == 0


def test_adaptive_k_explores_now_and_then_while_off():
    c = AdaptiveK(max_k=4, explore_every=EXPLORE_EVERY)
    for rows in range(1, 33):
        c.observe_step(rows, 0.001 * rows)
    for _ in range(50):
        c.observe_acceptance(4, 0)
    picks = [c.choose(batch=8) for _ in range(EXPLORE_EVERY * 2)]
    assert picks.count(1) == 2 and picks.count(0) == 2 * EXPLORE_EVERY - 2


class _Scripted:
    """A proposer whose guesses follow a fixed 'true' continuation, wrong from the third token on."""

    name = "scripted"

    def __init__(self, truth: list[int]) -> None:
        self.truth = truth

    def propose(self, reqs, max_tokens):
        out = []
        for r, k in zip(reqs, max_tokens):
            n = r.num_tokens
            guess = self.truth[n:n + k]
            out.append(guess[:2] + [999] * (len(guess) - 2))
        return out

    def observe(self, req, num_new_tokens):
        pass

    def release(self, req_id):
        pass


def _truth(prompt_len: int, total: int) -> list[int]:
    return list(range(1, prompt_len + 1)) + [100 + i for i in range(total - prompt_len)]


def _target_step(s: Scheduler, truth: list[int]) -> None:
    """The fake target: the true next token of every row; accepts drafts while they are true."""
    plan = s.schedule()
    result = StepResult()
    for r in plan.reqs:
        if not r.sample:
            continue
        pos = r.start_pos + len(r.token_ids) - len(r.draft_token_ids)
        if r.draft_token_ids:
            kept = []
            for d in r.draft_token_ids:
                kept.append(truth[pos + len(kept)])
                if kept[-1] != d:
                    break
            else:
                kept.append(truth[pos + len(kept)])
            result.spec_token_ids[r.req_id] = kept
        else:
            result.sampled_token_ids[r.req_id] = truth[pos]
    s.update(plan, result)


def test_rejected_drafts_are_rolled_back_and_never_enter_the_prefix_cache():
    truth = _truth(6, 60)
    kv = KVCacheManager(num_blocks=64, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, FCFSPolicy(), Speculator(_Scripted(truth), 4))
    s.add(Request("a", truth[:6], SamplingParams(max_tokens=40, temperature=0), 0.0, max_model_len=1000))
    true_hashes = set(block_hashes(truth, 4))
    while s.has_unfinished:
        _target_step(s, truth)
        assert set(kv.pool.cached) <= true_hashes  # only blocks of true tokens are ever indexed
        for rid, table in kv.block_tables.items():  # no block past the computed tokens + the next one
            assert len(table) <= kv.num_blocks_for(s.requests[rid].num_computed_tokens + 1)
    stats = s.speculator.stats
    assert stats.num_draft_tokens > stats.num_accepted_tokens > 0  # drafts were rejected and accepted
    assert kv.all_free and kv.pool.num_used == 0


def test_drafts_stop_at_max_tokens_and_stop_tokens():
    truth = _truth(5, 40)
    kv = KVCacheManager(num_blocks=64, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, FCFSPolicy(), Speculator(_Scripted(truth), 8))
    a = Request("a", truth[:5], SamplingParams(max_tokens=7, temperature=0), 0.0, max_model_len=1000)
    b = Request("b", truth[:5], SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[102]), 0.0,
                max_model_len=1000)
    s.add(a)
    s.add(b)
    while s.has_unfinished:
        _target_step(s, truth)
    assert a.output_token_ids == truth[5:12]
    assert b.output_token_ids == truth[5:8] and b.output_token_ids[-1] == 102
    assert kv.all_free


def test_drafts_take_only_rows_left_within_the_row_limit():
    truth = _truth(3, 40)
    kv = KVCacheManager(num_blocks=64, block_size=4)
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), kv, FCFSPolicy(),
                  Speculator(NgramProposer(1, 2), 8, max_rows=6))
    for i in range(4):
        s.add(Request(f"r{i}", [5, 6, 5, 6, 5], SamplingParams(max_tokens=20, temperature=0), 0.0, max_model_len=1000))
    plan = s.schedule()
    s.update(plan, StepResult({r.req_id: 6 for r in plan.reqs}))
    plan = s.schedule()
    assert plan.num_tokens <= 6 and any(r.draft_token_ids for r in plan.reqs)
