"""What AutoOffloadPolicy (auto.py) reasons with: offload settings, one decode step's measurements, a setting's
samples in one regime (median time per token and its standard error, bytes read per token turn by turn, hit rate,
precision, stall, read rate), and the choice among them: the simplest setting no other beats clearly, unless one as
fast within noise reads clearly fewer bytes."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class Setting:
    """One offload setting: an eviction policy and a prefetcher, by their option names."""

    eviction: str  # lru | correlation
    prefetch: str  # none | correlation | pregate

    def __str__(self) -> str:
        return f"{self.eviction}+{self.prefetch}"


# `auto` explores these, simplest first: prefetch off before on, LRU before correlation. Correlation prefetch stays
# available by name but is not a candidate: every candidate costs exploration steps, and pre-gating (the next
# layers' own routers on the stream) is the prefetcher the bench measures (precision 75-100% in every cell)
AUTO_EVICTIONS = ("lru", "correlation")
AUTO_PREFETCHES = ("none", "pregate")


def candidate_settings(eviction: str, prefetch: str) -> list[Setting]:
    """The settings `auto` chooses among for these options (an option not auto stays as given), simplest first."""
    evictions = AUTO_EVICTIONS if eviction == "auto" else (eviction,)
    prefetches = AUTO_PREFETCHES if prefetch == "auto" else (prefetch,)
    return [Setting(e, p) for p in prefetches for e in evictions]


@dataclass(frozen=True)
class StepSample:
    """What one decode-only engine step measured: its forward time, and the store's counters over it."""

    num_seqs: int  # sequences in the step (one token each)
    seconds: float  # the step's forward time
    lookups: int = 0  # experts the step's MoE layers needed
    hits: int = 0  # of which in RAM (or being read by a prefetch) when asked for
    stall_seconds: float = 0.0  # time the forward waited for reads
    bytes_read: int = 0
    num_predicted: int = 0  # experts guessed
    num_predicted_used: int = 0  # of which the layer used


@dataclass(frozen=True)
class AutoParams:
    """Knobs of AutoOffloadPolicy (see the module docstring); counts are decode steps of one regime."""

    # a first exploration of the four auto settings costs ~40 decode steps at most (4 x 2 x (4 + 1)), fewer when a
    # setting is dropped after the first round: short next to a server's life, and 8 steps per setting tell a 15%
    # difference from +-10% noise per step (tests/unit/test_expert_auto.py)
    window: int = 4  # steps measured per turn
    settle: int = 1  # steps skipped after a switch
    rounds: int = 2
    eliminate: float = 0.2  # after a round, drop a setting this much slower than the best (and clearly so)
    margin: float = 0.05  # "clearly faster": by more than this share...
    z: float = 2.5  # ...and by more than z standard errors (2.0 picked an equally fast setting 1 time in 8)
    # "clearly fewer bytes": bytes read per token lower by more than this share overall and in every round, and by
    # more than z_bytes standard errors. Bytes per token hardly depend on the machine's load, time per token does: on a shared
    # machine 8 steps per setting cannot tell a 10-15% gain from noise (the trained MoE at 25%, batch 16: correlation
    # eviction 26% hits, 12% fewer bytes and 17% faster than LRU's 0% hits, and auto stayed on LRU), the bytes can
    fewer_bytes: float = 0.05
    z_bytes: float = 4.0  # a batch of 1 reads 0 to a few experts a step: at 2.5 (and 3.5) chance alone fired (sims)
    monitor: int = 16  # steps per drift check while exploiting
    drift: float = 0.3  # time per token off the reference by this share: the regime moved
    hit_drift: float = 0.15  # hit rate off the reference by this much (absolute): the routing moved
    reexplore: int = 256  # steps from a decision to the next check, doubled while the choice holds...
    reexplore_max: int = 4096  # ...up to this
    regime_steps: int = 3  # steps in a row in a new batch bucket before it counts

    def __post_init__(self) -> None:
        for name in ("window", "rounds", "monitor", "reexplore", "regime_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"AutoParams.{name} must be >= 1, got {getattr(self, name)}")
        if self.settle < 0 or self.reexplore_max < self.reexplore:
            raise ValueError("AutoParams: need settle >= 0 and reexplore_max >= reexplore")


@dataclass
class Measured:
    """One setting's samples in one regime."""

    costs: list[float] = field(default_factory=list)  # seconds per token, per step
    turns: list[float] = field(default_factory=list)  # the median of each exploration turn's costs, in order
    turn_bytes: list[float] = field(default_factory=list)  # bytes read per token in each turn, in order
    step_bytes: list[float] = field(default_factory=list)  # bytes read per token, per step
    seconds: float = 0.0
    tokens: int = 0
    lookups: int = 0
    hits: int = 0
    stall_seconds: float = 0.0
    bytes_read: int = 0
    num_predicted: int = 0
    num_predicted_used: int = 0
    _turn_start: tuple[int, int] = (0, 0)  # bytes_read and tokens when the current turn began

    def add(self, s: StepSample) -> None:
        self.costs.append(s.seconds / s.num_seqs)
        self.step_bytes.append(s.bytes_read / s.num_seqs)
        self.seconds += s.seconds
        self.tokens += s.num_seqs
        self.lookups += s.lookups
        self.hits += s.hits
        self.stall_seconds += s.stall_seconds
        self.bytes_read += s.bytes_read
        self.num_predicted += s.num_predicted
        self.num_predicted_used += s.num_predicted_used

    def end_turn(self, num_steps: int) -> None:
        self.turns.append(statistics.median(self.costs[-num_steps:]))
        bytes_before, tokens_before = self._turn_start
        self.turn_bytes.append((self.bytes_read - bytes_before) / max(self.tokens - tokens_before, 1))
        self._turn_start = (self.bytes_read, self.tokens)

    @property
    def median(self) -> float:
        return statistics.median(self.costs) if self.costs else math.inf

    def stderr(self, spread: float) -> float:
        """Standard error of the median, given the relative spread of one step's cost (see `spread`)."""
        return 1.2533 * spread * self.median / math.sqrt(len(self.costs)) if self.costs else math.inf

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.tokens if self.tokens else math.inf

    def bytes_stderr(self) -> float:
        """Standard error of the mean bytes per token over the steps (a batch of 1 reads 0 or several experts a
        step: its bytes vary a lot from step to step, a batch of 16's hardly)."""
        n = len(self.step_bytes)
        return statistics.stdev(self.step_bytes) / math.sqrt(n) if n > 1 else math.inf

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None

    def describe(self) -> str:
        precision = (f", precision {self.num_predicted_used / self.num_predicted:.0%}" if self.num_predicted else "")
        hit = f"hit rate {self.hit_rate:.0%}" if self.hit_rate is not None else "no lookups"
        rate = self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return (f"{1e3 * self.median:.3f} ms/token over {len(self.costs)} steps, {hit}{precision}, stall "
                f"{1e3 * self.stall_seconds / max(self.tokens, 1):.3f} ms/token, reads {rate:.2f} GB/s")


def spread(measured: Sequence[Measured]) -> float:
    """The relative spread of one step's cost (1.4826 x the median absolute deviation from each setting's median,
    in units of it: sigma for normal noise), pooled over the settings: the machine's noise is common to all of them,
    and a handful of steps per setting would give a noisy estimate of their own."""
    deviations = [abs(c / m.median - 1) for m in measured if m.costs and m.median > 0 for c in m.costs]
    return 1.4826 * statistics.median(deviations) if deviations else 0.0


def beats(b: Measured, a: Measured, p: AutoParams, noise: float) -> bool:
    """b is clearly faster than a: by more than the margin, by more than z standard errors (noise: `spread`), and
    in every round (turn by turn: a burst of load during one turn does not make a winner)."""
    gap = a.median - b.median
    return (b.median < a.median * (1 - p.margin) and gap > p.z * math.hypot(a.stderr(noise), b.stderr(noise))
            and all(tb < ta for ta, tb in zip(a.turns, b.turns)))


def reads_less(b: Measured, a: Measured, p: AutoParams) -> bool:
    """b reads clearly fewer bytes per token than a: by more than `fewer_bytes`, by more than z_bytes standard errors of
    the two means (the steps' own variation: routing, not load), and by more than `fewer_bytes` in every round."""
    gap = a.bytes_per_token - b.bytes_per_token
    return (b.bytes_per_token < a.bytes_per_token * (1 - p.fewer_bytes)
            and gap > p.z_bytes * math.hypot(a.bytes_stderr(), b.bytes_stderr())
            and all(tb < ta * (1 - p.fewer_bytes) for ta, tb in zip(a.turn_bytes, b.turn_bytes)))


def as_fast(b: Measured, a: Measured, p: AutoParams, noise: float) -> bool:
    """b is as fast as a within noise: its median no more than `margin` slower, and a does not beat it clearly."""
    return b.median <= a.median * (1 + p.margin) and not beats(a, b, p, noise)


def choose(measured: dict[Setting, Measured], candidates: Sequence[Setting], p: AutoParams) -> Setting:
    """The simplest candidate (candidates: simplest first; the setting in force first when exploring again) that no
    other beats clearly (the fastest one is never beaten, so there always is one); then, among candidates as fast
    as it within noise that no other beats clearly, one that reads clearly fewer bytes per token than it, if any:
    the first in order that no other such one reads clearly less than (so two that read alike do not take turns)."""
    noise = spread([measured[c] for c in candidates])
    unbeaten = [c for c in candidates if not any(beats(measured[b], measured[c], p, noise)
                                                 for b in candidates if b != c)]
    timed = unbeaten[0] if unbeaten else min(candidates, key=lambda c: measured[c].median)
    lighter = [c for c in unbeaten if reads_less(measured[c], measured[timed], p)
               and as_fast(measured[c], measured[timed], p, noise)]
    for c in lighter:
        if not any(reads_less(measured[b], measured[c], p) for b in lighter if b != c):
            return c
    return timed


@dataclass
class Regime:
    """One batch bucket's exploration state and decision."""

    bucket: int
    alive: list[Setting]  # candidates still explored: simplest first (exploring again: the one in force first)
    measured: dict[Setting, Measured] = field(default_factory=dict)
    exploring: bool = True
    round: int = 0
    order: list[Setting] = field(default_factory=list)  # this round's turns
    turn: int = 0
    turn_steps: int = 0
    chosen: Setting | None = None
    why: str = ""
    steps_since: int = 0  # decode steps measured since the decision
    interval: int = 0  # steps from the decision to the next exploration
    reference: Measured | None = None  # the first monitor window after the decision
    recent: Measured = field(default_factory=Measured)
    drift_windows: int = 0  # consecutive monitor windows off the reference
    drift_hold: int = 0  # steps after a decision in which a move of time per token alone does not explore again
    time_drift: bool = False  # this exploration began because time per token alone moved


def bucket_of(num_seqs: int) -> int:
    """The regime of a decode step: its batch size rounded down to a power of two."""
    return 1 << (max(num_seqs, 1).bit_length() - 1)
