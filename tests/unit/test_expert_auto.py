"""AutoOffloadPolicy (--expert-eviction/--expert-prefetch auto) on a fake machine: measurements are made up per
setting and regime, with seeded noise, so the switching logic is tested without a clock or a disk. It picks the
faster setting, keeps the simplest one when no other is clearly faster, does not flap under noise, and switches
when the batch size or the measurements change."""
from __future__ import annotations

import random
from typing import Callable

import pytest

from ferry.experts.auto import AutoOffloadPolicy
from ferry.experts.samples import AutoParams, Setting, StepSample, bucket_of, candidate_settings

SETTINGS = candidate_settings("auto", "auto")
ON_DEMAND, CORR, PREGATE, FULL = SETTINGS


class FakeMachine:
    """Seconds per token of each setting (a function of the step index, for drift), +-noise uniform; the hit rate
    a setting measures."""

    def __init__(self, cost: Callable[[int, int, Setting], float], noise: float = 0.0, seed: int = 0,
                 hit_rate: Callable[[int, Setting], float] = lambda step, s: 0.5,
                 reads: Callable[[Setting], float] = lambda s: 1000.0, reads_noise: float = 0.0) -> None:
        self.cost, self.noise, self.rng, self.hit_rate = cost, noise, random.Random(seed), hit_rate
        self.reads, self.reads_noise = reads, reads_noise  # bytes read per token of each setting, +-noise uniform
        self.step = 0

    def run(self, policy: AutoOffloadPolicy, steps: int, batch: int = 1) -> list[Setting]:
        """Decode `steps` steps at `batch`; the setting in force at each."""
        trace = []
        for _ in range(steps):
            s = policy.current
            trace.append(s)
            seconds = batch * self.cost(self.step, batch, s) * (1 + self.rng.uniform(-self.noise, self.noise))
            hits = round(100 * self.hit_rate(self.step, s))
            nbytes = batch * self.reads(s) * (1 + (self.rng.uniform(-self.reads_noise, self.reads_noise)
                                                   if self.reads_noise else 0.0))
            policy.observe(StepSample(batch, seconds, lookups=100, hits=hits, stall_seconds=seconds / 10,
                                      bytes_read=round(nbytes), num_predicted=10 * (s.prefetch != "none"),
                                      num_predicted_used=8 * (s.prefetch != "none")))
            self.step += 1
        return trace


def _costs(table: dict[Setting, float]) -> Callable[[int, int, Setting], float]:
    return lambda step, batch, s: table[s]


def test_candidates_are_simplest_first_and_keep_a_fixed_option():
    assert [str(s) for s in SETTINGS] == ["lru+none", "correlation+none", "lru+pregate", "correlation+pregate"]
    assert candidate_settings("lru", "auto") == [Setting("lru", "none"), Setting("lru", "pregate")]
    assert candidate_settings("auto", "correlation") == [Setting("lru", "correlation"),
                                                        Setting("correlation", "correlation")]
    assert candidate_settings("correlation", "pregate") == [FULL]
    assert [bucket_of(n) for n in (1, 2, 3, 4, 7, 8, 16, 31)] == [1, 2, 2, 4, 4, 8, 16, 16]


@pytest.mark.parametrize("seed", range(5))
def test_picks_the_faster_setting_and_stays_on_it(seed):
    log = []
    policy = AutoOffloadPolicy(SETTINGS, log=log.append)
    machine = FakeMachine(_costs({ON_DEMAND: 1.0, CORR: 0.95, PREGATE: 0.7, FULL: 0.8}), noise=0.1, seed=seed)
    trace = machine.run(policy, 1000)
    decided = next(i for i, m in enumerate(log) if "chose" in m)
    assert "chose lru+pregate" in log[decided] and "1.4" in log[decided]  # ~1.43x the speed of lru+none
    explorations = sum("exploring" in m and "->" not in m for m in log)
    assert explorations >= 2  # the first, then a check every reexplore steps (256, 512 when it wins again)
    assert all("chose lru+pregate" in m for m in log if "chose" in m)
    assert trace[-100:] == [PREGATE] * 100
    assert trace.count(PREGATE) > 0.85 * len(trace)  # exploring costs little


def _choices(log: list[str]) -> list[str]:
    return [m.split("chose ")[1].split(" ")[0].strip(",") for m in log if "chose" in m]


@pytest.mark.parametrize("seed", range(5))
def test_never_leaves_the_simplest_setting_for_a_slower_one(seed):
    """The others 3-10% slower, +-10% noise per step: every decision keeps on-demand."""
    log = []
    policy = AutoOffloadPolicy(SETTINGS, log=log.append)
    machine = FakeMachine(_costs({ON_DEMAND: 1.0, CORR: 1.03, PREGATE: 1.05, FULL: 1.1}), noise=0.1, seed=seed)
    trace = machine.run(policy, 3000)
    assert set(_choices(log)) == {"lru+none"} and len(_choices(log)) >= 3
    assert trace[-1] == ON_DEMAND and trace.count(ON_DEMAND) > 0.95 * len(trace)


@pytest.mark.parametrize("seed", range(5))
def test_does_not_flap_between_equally_fast_settings(seed):
    """All four equally fast, +-10% noise: whatever a decision picks, the next ones keep it unless another is
    clearly faster (at most one change over 3000 steps), switches happen only while exploring, and the
    explorations thin out (256, 512, 1024 steps apart as the choice holds)."""
    log = []
    policy = AutoOffloadPolicy(SETTINGS, log=log.append)
    machine = FakeMachine(_costs(dict.fromkeys(SETTINGS, 1.0)), noise=0.1, seed=seed)
    trace = machine.run(policy, 3000)
    choices = _choices(log)
    assert 3 <= len(choices) <= 6
    assert sum(a != b for a, b in zip(choices, choices[1:])) <= 1
    assert policy.num_switches <= 2 * len(SETTINGS) * len(choices)
    assert sum(s != trace[-1] for s in trace) < 0.15 * len(trace)


def test_no_flapping_when_two_settings_trade_places_in_noise():
    """Two settings within 1% of each other and 30% noise: whatever it picks, it stays until the next scheduled
    check (switches only while exploring), and the explorations thin out."""
    log = []
    policy = AutoOffloadPolicy(SETTINGS[:1] + SETTINGS[2:3], log=log.append)
    machine = FakeMachine(_costs({ON_DEMAND: 1.0, PREGATE: 0.99}), noise=0.3, seed=3)
    machine.run(policy, 4000)
    assert policy.num_switches <= 2 * sum("exploring" in m and "->" not in m for m in log) + 2
    assert sum("exploring again" in m for m in log) <= 5


def test_a_new_batch_size_is_a_new_regime_and_a_known_one_comes_back_at_once():
    """Batch 1: pre-gating wins; batch 16: correlation eviction alone wins. Each regime explores once; coming back
    to batch 1 restores its choice after regime_steps steps, without exploring again."""
    log = []
    policy = AutoOffloadPolicy(SETTINGS, log=log.append)
    table = {1: {ON_DEMAND: 1.0, CORR: 1.0, PREGATE: 0.6, FULL: 0.8},
             16: {ON_DEMAND: 0.3, CORR: 0.2, PREGATE: 0.3, FULL: 0.25}}
    machine = FakeMachine(lambda step, batch, s: table[batch][s], noise=0.05)
    machine.run(policy, 100, batch=1)
    assert policy.current == PREGATE
    trace16 = machine.run(policy, 100, batch=16)
    assert trace16[:policy.params.regime_steps] == [PREGATE] * policy.params.regime_steps  # not a regime yet
    assert policy.current == CORR and sum("new regime" in m for m in log) == 2
    n = len(log)
    back = machine.run(policy, 20, batch=1)
    assert back[policy.params.regime_steps] == PREGATE and back[-1] == PREGATE
    assert not any("exploring" in m for m in log[n:]), log[n:]


def test_a_batch_hovering_at_a_bucket_edge_does_not_switch_every_step():
    policy = AutoOffloadPolicy(SETTINGS)
    table = {4: {ON_DEMAND: 1.0, CORR: 1.0, PREGATE: 0.5, FULL: 1.0}, 8: {ON_DEMAND: 0.2, CORR: 1, PREGATE: 1, FULL: 1}}
    machine = FakeMachine(lambda step, batch, s: table[bucket_of(batch)][s])
    machine.run(policy, 100, batch=7)
    switches = policy.num_switches
    for _ in range(100):  # 7, 8, 7, 8, ...: batch 8 never holds regime_steps steps in a row
        machine.run(policy, 1, batch=8)
        machine.run(policy, 1, batch=7)
    assert policy.num_switches == switches and policy.current == PREGATE and list(policy.regimes) == [4]


def test_explores_again_when_the_measurements_drift():
    """After 300 steps the routing changes (a new topic): pre-gating's hit rate falls and it slows down; the policy
    notices from two monitor windows and moves on, long before its scheduled check."""
    log = []
    policy = AutoOffloadPolicy(SETTINGS, AutoParams(reexplore=4096), log=log.append)
    cost = lambda step, batch, s: ({ON_DEMAND: 1.0, CORR: 1.0, PREGATE: 0.6, FULL: 0.9} if step < 300 else
                                   {ON_DEMAND: 1.0, CORR: 0.7, PREGATE: 1.6, FULL: 1.5})[s]
    hit = lambda step, s: 0.6 if step < 300 or s != PREGATE else 0.2
    machine = FakeMachine(cost, noise=0.05, hit_rate=hit)
    trace = machine.run(policy, 500)
    assert trace[299] == PREGATE and trace[-1] == CORR
    again = next(m for m in log if "exploring again" in m)
    assert "hit rate" in again or "time per token" in again
    assert trace.index(CORR, 300) < 300 + 3 * policy.params.monitor + 40


def test_only_decode_steps_in_a_settled_regime_are_measured_and_settle_steps_are_skipped():
    policy = AutoOffloadPolicy(SETTINGS, AutoParams(window=2, settle=1, rounds=1))
    for _ in range(1 + 2):  # the first step is a cold cache: skipped; then the first turn's two steps
        policy.observe(StepSample(1, 1.0))
    assert policy.current == CORR  # the turn ended: next setting
    assert len(policy.regimes[1].measured[ON_DEMAND].costs) == 2


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="window must be >= 1"):
        AutoParams(window=0)
    with pytest.raises(ValueError, match="reexplore_max"):
        AutoParams(reexplore=100, reexplore_max=10)
    with pytest.raises(ValueError, match="at least one setting"):
        AutoOffloadPolicy([])


# bytes read per token: what each setting reads at batch 16 with a quarter of the experts cached (the trained MoE's
# 25% cell: LRU evicts each expert just before its reuse, correlation eviction keeps a quarter of them, pre-gating
# adds the reads of its wrong guesses)
READS = {ON_DEMAND: 1000.0, CORR: 880.0, PREGATE: 1010.0, FULL: 880.0}


@pytest.mark.parametrize("seed", range(5))
def test_as_fast_within_noise_but_clearly_fewer_bytes_wins(seed):
    """Correlation eviction 13% faster, which +-20% noise per step hides in 8 steps 4 times in 10 (time alone kept
    on-demand then); it reads 12% fewer bytes per token (+-5% per step): the first decision takes it and says why,
    and it holds."""
    log = []
    policy = AutoOffloadPolicy(SETTINGS, log=log.append)
    machine = FakeMachine(_costs({ON_DEMAND: 1.0, CORR: 0.87, PREGATE: 1.0, FULL: 0.9}), noise=0.2, seed=seed,
                          reads=READS.get, reads_noise=0.05)
    trace = machine.run(policy, 1500, batch=16)
    choices = _choices(log)
    assert choices[0] == "correlation+none" and "fewer bytes per token" in next(m for m in log if "chose" in m)
    assert sum(c != "correlation+none" for c in choices) <= 1  # time's noise may still win one exploration
    assert trace[-1] == CORR and trace.count(CORR) > 0.7 * len(trace)


def test_fewer_bytes_never_buy_a_clearly_slower_setting():
    """Correlation eviction reads 20% less but takes 30% longer per token (say its bookkeeping on a tiny model):
    time decides, on-demand stays."""
    log = []
    policy = AutoOffloadPolicy(SETTINGS, log=log.append)
    machine = FakeMachine(_costs({ON_DEMAND: 1.0, CORR: 1.3, PREGATE: 1.1, FULL: 1.3}), noise=0.1, seed=1,
                          reads={ON_DEMAND: 1000.0, CORR: 800.0, PREGATE: 1000.0, FULL: 800.0}.get)
    trace = machine.run(policy, 1000)
    assert set(_choices(log)) == {"lru+none"} and trace[-1] == ON_DEMAND


@pytest.mark.parametrize("seed", range(5))
def test_bytes_that_differ_only_by_chance_do_not_move_it(seed):
    """All four equally fast and reading alike on average, but a batch of 1 reads 0 to 2x the mean in a step:
    the bytes rule never fires (time per token alone decides, as in the tests above)."""
    log = []
    policy = AutoOffloadPolicy(SETTINGS, log=log.append)
    machine = FakeMachine(_costs({ON_DEMAND: 1.0, CORR: 1.02, PREGATE: 1.03, FULL: 1.04}), noise=0.1, seed=seed,
                          reads_noise=1.0)
    machine.run(policy, 2000)
    assert len(_choices(log)) >= 3 and _choices(log)[0] == "lru+none"
    assert not any("fewer bytes" in m for m in log)


@pytest.mark.parametrize("seed", range(3))
def test_two_settings_that_read_alike_do_not_take_turns(seed):
    """Correlation eviction with and without pre-gating: as fast and as light as each other, both clearly lighter
    than LRU: whichever the first decision takes, every later one keeps it."""
    log = []
    policy = AutoOffloadPolicy(SETTINGS, log=log.append)
    machine = FakeMachine(_costs({ON_DEMAND: 1.0, CORR: 0.97, PREGATE: 1.0, FULL: 0.97}), noise=0.2, seed=seed,
                          reads=READS.get, reads_noise=0.05)
    machine.run(policy, 3000, batch=16)
    choices = _choices(log)
    assert len(choices) >= 3 and len(set(choices)) == 1 and choices[0] in ("correlation+none", "correlation+pregate")


def test_load_swings_of_the_machine_do_not_keep_it_exploring():
    """On-demand is best throughout, but the machine's load slows every step by 60% for 150 steps out of 300 (the
    other jobs of a shared machine), hit rates unchanged: each swing looks like a drift of time per token. As each
    exploration confirms on-demand, the next time drift waits longer (64, 128, 256... steps): over 3000 steps it
    explores a handful of times (19 times without the hold, 88% of steps on on-demand), not at every swing."""
    log = []
    policy = AutoOffloadPolicy(SETTINGS, log=log.append)
    table = {ON_DEMAND: 1.0, CORR: 1.2, PREGATE: 1.3, FULL: 1.4}
    machine = FakeMachine(lambda step, batch, s: table[s] * (1.6 if step // 150 % 2 else 1.0), noise=0.05)
    trace = machine.run(policy, 3000)
    drifts = [m for m in log if "exploring again (time per token" in m]
    assert 1 <= len(drifts) <= 6
    assert trace.count(ON_DEMAND) > 0.94 * len(trace)


def test_a_hit_rate_drift_is_never_held_back():
    """Time swings that held back the time-drift checks do not hold back a change of routing: once pre-gating's hit
    rate falls (a new topic at step 1500), it explores again within a few monitor windows."""
    log = []
    policy = AutoOffloadPolicy(SETTINGS, AutoParams(reexplore=4096), log=log.append)
    cost = lambda step, batch, s: ({ON_DEMAND: 1.0, CORR: 1.0, PREGATE: 0.6, FULL: 0.9} if step < 1500 else
                                   {ON_DEMAND: 1.0, CORR: 0.7, PREGATE: 1.6, FULL: 1.5})[s] * (2.0 if step // 40 % 2 else 1.0)
    hit = lambda step, s: 0.6 if step < 1500 or s != PREGATE else 0.2
    machine = FakeMachine(cost, noise=0.05, hit_rate=hit)
    trace = machine.run(policy, 1800)
    assert trace[1499] == PREGATE and trace[-1] == CORR
    assert any("exploring again (hit rate" in m for m in log)
    assert trace.index(CORR, 1500) < 1500 + 3 * policy.params.monitor + 40
