"""The front end's migration policies (pure): balance moves one request from the most to the least loaded instance
only when the gap is worth it, choosing the one with the most work left per token to copy; drain sends every
request of an instance to the others, evening their loads; and the migration counters reach /metrics."""
from __future__ import annotations

from ferry.cluster.dispatch import CACHE_AWARE_TOLERANCE, Candidate, PrefixIndex, pick_instance
from ferry.cluster.policies import MIN_TOKENS_LEFT, Running, pick_balance, pick_drain
from ferry.engine.stats import EngineStats, MigrationStats
from ferry.server.metrics import ServerMetrics


def _r(rid: str, instance: int, num_tokens: int = 100, out: int = 10, left: int = 200) -> Running:
    return Running(rid, instance, num_tokens, out, left)


def test_balance_moves_only_across_a_large_gap():
    running = [_r("a", 0), _r("b", 0), _r("c", 1)]
    assert pick_balance({0: 2, 1: 1}, running) is None  # one move would just swap the imbalance
    assert pick_balance({0: 3, 1: 1}, running + [_r("d", 0)])[1:] == (0, 1)
    assert pick_balance({0: 3}, running) is None


def test_balance_picks_the_most_work_left_per_token_copied():
    running = [_r("long-copy", 0, num_tokens=1000, left=300), _r("cheap", 0, num_tokens=50, left=300),
               _r("ending", 0, num_tokens=20, left=MIN_TOKENS_LEFT - 1), _r("prompt", 0, num_tokens=10, out=0)]
    assert pick_balance({0: 4, 1: 0}, running) == ("cheap", 0, 1)
    assert pick_balance({0: 2, 1: 0}, running[2:]) is None  # about to finish, or nothing streamed yet


def test_drain_spreads_an_instance_over_the_others():
    running = [_r(f"r{i}", 0, num_tokens=100 + i) for i in range(4)] + [_r("x", 1)]
    moves = pick_drain(0, {0: 4, 1: 1, 2: 0}, running)
    assert [rid for rid, _ in moves] == ["r3", "r2", "r1", "r0"]  # the longest first
    assert [to for _, to in moves] == [2, 1, 2, 1]  # each to the least loaded at that point (ties: lower index)
    assert pick_drain(0, {0: 2}, running) == []


def test_migrations_reach_metrics():
    m = MigrationStats()
    m.count("migrated")
    m.count("migrated")
    m.count("aborted_dst")
    m.num_blocks = 12
    m.pause.observe(0.004)
    m.downtime.observe(0.03)
    text = ServerMetrics(lambda: EngineStats(migrations=m), "m").render().decode()
    for line in ('ferry_migrations_total{model_name="m",outcome="migrated"} 2.0',
                 'ferry_migrations_total{model_name="m",outcome="aborted_dst"} 1.0',
                 'ferry_migrations_total{model_name="m",outcome="aborted_src"} 0.0',
                 'ferry_migration_blocks_total{model_name="m"} 12.0',
                 'ferry_migration_pause_seconds_bucket{le="0.005",model_name="m"} 1.0',
                 'ferry_migration_pause_seconds_count{model_name="m"} 1.0',
                 'ferry_migration_downtime_seconds_bucket{le="0.025",model_name="m"} 0.0',
                 'ferry_migration_downtime_seconds_bucket{le="0.05",model_name="m"} 1.0'):
        assert line in text, line
    assert "ferry_migration" not in ServerMetrics(lambda: EngineStats(), "m").render().decode()


def test_dispatch_goes_to_the_least_committed_kv_unless_a_prefix_hit_is_close_enough():
    cap = 1000
    idle, busy = Candidate(0, 100, cap, 0, 1), Candidate(1, 300, cap, 0, 1)
    assert pick_instance([busy, idle]) == 0 and pick_instance([busy, idle], "least-loaded") == 0
    hit = Candidate(1, 100 + int(CACHE_AWARE_TOLERANCE * cap), cap, 64, 3)  # as loaded as the tolerance allows
    assert pick_instance([idle, hit]) == 1 and pick_instance([idle, hit], "least-loaded") == 0
    far = Candidate(1, 101 + int(CACHE_AWARE_TOLERANCE * cap), cap, 64, 3)
    assert pick_instance([idle, far]) == 0  # the hit is not worth that much more load
    same = [Candidate(0, 0, cap, 0, 2), Candidate(1, 0, cap, 0, 1)]
    assert pick_instance(same) == 1  # equal load: fewer requests in flight


def test_prefix_index_matches_whole_blocks_of_a_prefix_it_was_sent():
    index = PrefixIndex(block_size=4, max_blocks=3)
    assert index.match(list(range(12))) == 0
    index.add(list(range(10)))  # two full blocks; the last 2 tokens are not a block
    assert index.match(list(range(12))) == 8 and index.match(list(range(7))) == 4
    assert index.match([9] + list(range(1, 12))) == 0  # a block's hash covers every token before it
    index.add([100, 101, 102, 103, 104, 105, 106, 107])  # 2 more blocks: the oldest one is dropped (at most 3)
    assert index.match(list(range(12))) == 0 and index.match(list(range(100, 108))) == 8
    index.clear()
    assert index.match(list(range(100, 108))) == 0
