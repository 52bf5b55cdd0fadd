"""The front end's migration policies (pure): balance reads the KV committed per instance (as dispatch does) and
moves one request from a source short of KV to the least loaded instance only when the gap is worth it, choosing
the one that frees the most KV without swapping the imbalance; drain sends every
request of an instance to the others, evening their loads; and the migration counters reach /metrics."""
from __future__ import annotations

from ferry.cluster.dispatch import CACHE_AWARE_TOLERANCE, Candidate, PrefixIndex, pick_instance
from ferry.cluster.policies import BALANCE_GAP, SHORT_USAGE, Load, Running, pick_balance, pick_drain
from ferry.engine.stats import EngineStats, MigrationStats
from ferry.server.metrics import ServerMetrics

CAP = 1000  # KV tokens per instance


def _r(rid: str, instance: int, num_tokens: int = 100, out: int = 10) -> Running:
    return Running(rid, instance, num_tokens, out)


def _load(*tokens: int) -> dict[int, Load]:
    return {i: Load(n, CAP) for i, n in enumerate(tokens)}


def test_balance_reads_committed_kv_not_requests_in_flight():
    # the long outputs filled instance 0's KV with 3 requests and a queued prompt; instance 1 holds 4 short ones
    long = [_r(f"long{i}", 0, num_tokens=300, out=236) for i in range(3)] + [_r("queued", 0, num_tokens=200, out=0)]
    short = [_r(f"short{i}", 1, num_tokens=60, out=4) for i in range(4)]
    move = pick_balance(_load(1100, 240), long + short)
    assert move is not None and move[1:] == (0, 1) and move[0].startswith("long")
    # the same requests in flight, with the KV the other way round, moves the other way
    assert pick_balance(_load(240, 1100), [_r(r.request_id, 1 - r.instance, r.num_tokens, r.num_output_tokens)
                                          for r in long + short])[1:] == (1, 0)


def test_balance_waits_for_a_short_source_and_a_gap():
    running = [_r("a", 0, num_tokens=200), _r("b", 0, num_tokens=200)]
    below = int(SHORT_USAGE * CAP) - 1
    assert pick_balance(_load(below, 0), running) is None  # the source still has room for its queue
    near = int(SHORT_USAGE * CAP) + 10
    assert pick_balance(_load(near, near - int(BALANCE_GAP * CAP) + 1), running) is None  # too close to pay
    assert pick_balance(_load(near, 0), running)[1:] == (0, 1)
    assert pick_balance({0: Load(near, CAP)}, running) is None


def test_balance_frees_the_most_kv_that_fits_without_swapping_the_imbalance():
    running = [_r("big", 0, num_tokens=700), _r("mid", 0, num_tokens=400), _r("small", 0, num_tokens=100),
               _r("prompt", 0, num_tokens=900, out=0)]
    # 1200 vs 100: "big" would leave 500 vs 800 (the imbalance swapped), "mid" 800 vs 500
    assert pick_balance(_load(1200, 100), running) == ("mid", 0, 1)
    # the destination's free KV bounds the move (and a request still in its prompt never moves)
    assert pick_balance(_load(1600, 650), running) == ("small", 0, 1)
    assert pick_balance(_load(1600, 950), running) is None


def test_drain_spreads_an_instance_over_the_others():
    running = [_r(f"r{i}", 0, num_tokens=100 + i) for i in range(4)] + [_r("x", 1)]
    moves = pick_drain(0, _load(406, 100, 0), running)
    assert [rid for rid, _ in moves] == ["r3", "r2", "r1", "r0"]  # the longest first
    assert [to for _, to in moves] == [2, 1, 2, 1]  # each to the least loaded at that point (ties: lower index)
    assert pick_drain(0, _load(200), running) == []


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
