"""`--expert-eviction auto` / `--expert-prefetch auto`: which offload setting (eviction policy x prefetcher) runs,
chosen online from what each one measures here: this machine, this model, this budget, this load.

Why measure rather than model: a prefetcher costs CPU time (pre-gating's router products, the reads' own work
on two cores) and a wrong guess evicts an expert that was needed; in the last moe-offload bench "full"
(correlation eviction + pre-gating) was slower than plain on-demand LRU in 6 of the 12 cells below a 100%
budget. So the yardstick is the decode step's forward time per token, the one number that counts all of it;
hit rate, prefetch precision, stall time and read rate are kept beside it to say why (`explain`, the log).

Per regime (decode-only steps of one batch bucket: 1, 2-3, 4-7, ... sequences):
  explore  the candidate settings run in turns, simplest first: after a switch `settle` steps are not measured
           (the cache still holds what the previous setting chose), then `window` steps are. `rounds` rounds,
           every other one in reverse order (a slow drift of the machine's load hits every setting alike); after
           a round, a setting more than `eliminate` slower than the best drops out.
  decide   the setting in force before (after a first decision) unless another beats it clearly, else the simplest
           setting no other beats clearly: clearly = faster by more than `margin`, by more than `z` standard errors
           of the two medians (the noise pooled over the settings), and in every round. Then, if a setting as fast
           as that one within noise reads clearly fewer bytes per token (by more than `fewer_bytes`, in every round),
           it runs instead: bytes per token do not depend on the machine's load, so they tell what 8 noisy steps of
           time cannot (on a shared machine a 15% gain of correlation eviction at batch 16 went unseen). Otherwise a
           setting as fast as on-demand within noise never replaces it, and two settings as fast as each other (and
           reading alike) do not take turns.
  exploit  run it; explore again when the regime drifts (time per token off by more than `drift`, or hit rate
           by more than `hit_drift`, from the first `monitor` steps after the decision, two windows in a row),
           but a move of time alone not within `drift_hold` steps of a decision that such a move led to the same
           choice (4 monitor windows, doubling while it does: a shared machine's load swings would otherwise
           restart the exploration every few dozen steps),
           and every `reexplore` steps in the regime (doubled each time the same setting wins again, up to
           `reexplore_max`).
A new batch bucket counts once `regime_steps` decode steps in a row fall in it (a batch hovering at a bucket's
edge does not switch every step); a regime already decided gets its setting back at once. Prefill and mixed steps
are not measured (their cost is the prompts') and keep the setting in force.

The policy is pure: it reads StepSamples and returns settings. ferry/experts/tuner.py measures the store and
applies its choices between steps, so tokens never depend on it (any setting gives the resident path's tokens)."""
from __future__ import annotations

from typing import Callable, Sequence

from ferry.experts.samples import (
    AutoParams,
    Measured,
    Regime,
    Setting,
    StepSample,
    beats,
    bucket_of,
    choose,
    reads_less,
    spread,
)


def _label(bucket: int) -> str:
    return "batch 1" if bucket == 1 else f"batch {bucket}-{2 * bucket - 1}"


class AutoOffloadPolicy:
    """Chooses the offload setting per regime from measured decode steps. settings: the candidates, simplest
    first (the first is in force until measurements say otherwise); log: told each switch and each decision once,
    as a sentence (the tuner logs it at INFO)."""

    def __init__(self, settings: Sequence[Setting], params: AutoParams = AutoParams(),
                 log: Callable[[str], None] = lambda message: None) -> None:
        if not settings:
            raise ValueError("AutoOffloadPolicy needs at least one setting")
        self.settings = list(dict.fromkeys(settings))
        self.params = params
        self.log = log
        self.current = self.settings[0]
        self.regimes: dict[int, Regime] = {}
        self.regime: Regime | None = None
        self.num_switches = 0
        self._settle = params.settle  # the first steps run on a cold cache: not the first setting's fault
        self._next_bucket, self._next_count = 0, 0  # a batch bucket other than the regime's, steps in a row

    def observe(self, sample: StepSample) -> Setting:
        """A decode-only step ran with `current` and measured `sample`: the setting for the next step."""
        r = self._regime_of(sample.num_seqs)
        if r is None:
            return self.current  # a new batch bucket, not yet settled: not measured
        if r.exploring:
            self._explore(r, sample)
        else:
            self._exploit(r, sample)
        return self.current

    # -- regimes ----------------------------------------------------------------------------------

    def _regime_of(self, num_seqs: int) -> Regime | None:
        """The regime a step of num_seqs sequences belongs to, once its bucket held regime_steps steps in a row."""
        bucket = bucket_of(num_seqs)
        if self.regime is not None and bucket == self.regime.bucket:
            self._next_count = 0
            return self.regime
        if self.regime is not None:
            self._next_count = self._next_count + 1 if bucket == self._next_bucket else 1
            self._next_bucket = bucket
            if self._next_count < self.params.regime_steps:
                return None
        self._next_count = 0
        if bucket not in self.regimes:
            r = self.regimes[bucket] = Regime(bucket, list(self.settings))
            self._start_round(r)
            if len(self.settings) > 1:
                self.log(f"expert offload, {_label(bucket)}: new regime, exploring "
                         f"{', '.join(map(str, self.settings))} ({self.params.window} steps each, "
                         f"{self.params.rounds} rounds)")
        self.regime = self.regimes[bucket]
        return self.regime

    def _start_round(self, r: Regime) -> None:
        """Turns of the round: the first round in r.alive's order, each later one the reverse of the one before
        (so the setting that ended a round starts the next without a switch)."""
        r.order = list(r.alive) if r.round == 0 else [a for a in reversed(r.order) if a in r.alive]
        r.turn = r.turn_steps = 0

    # -- explore ----------------------------------------------------------------------------------

    def _explore(self, r: Regime, s: StepSample) -> None:
        p = self.params
        want = r.order[r.turn]
        if self.current != want:  # back in this regime from another one: its turn goes on, once settled
            self._switch(want, f"{_label(r.bucket)}: exploring, turn of {want}")
            return
        if self._settling():
            return
        r.measured.setdefault(want, Measured()).add(s)
        r.turn_steps += 1
        if r.turn_steps < p.window:
            return
        r.measured[want].end_turn(p.window)
        r.turn, r.turn_steps = r.turn + 1, 0
        if r.turn == len(r.order):
            r.round += 1
            self._eliminate(r)
            if r.round >= p.rounds or len(r.alive) == 1:
                self._decide(r)
                return
            self._start_round(r)
        self._switch(r.order[r.turn], f"{_label(r.bucket)}: exploring, round {r.round + 1}/{p.rounds}")

    def _eliminate(self, r: Regime) -> None:
        """Drop the settings clearly slower than the best by more than `eliminate` (they get no more turns)."""
        best = min(r.alive, key=lambda a: r.measured[a].median)
        m, noise = r.measured[best], spread([r.measured[a] for a in r.alive])
        slow = [a for a in r.alive if r.measured[a].median > m.median * (1 + self.params.eliminate)
                and beats(m, r.measured[a], self.params, noise)]
        r.alive = [a for a in r.alive if a not in slow]

    def _decide(self, r: Regime) -> None:
        incumbent = [r.chosen] if r.chosen in r.alive else []  # it stays unless clearly beaten: no flapping
        chosen = choose(r.measured, incumbent + [a for a in r.alive if a not in incumbent], self.params)
        why = self._why(r, chosen)
        again = r.chosen == chosen and r.interval > 0
        r.interval = min(2 * r.interval, self.params.reexplore_max) if again else self.params.reexplore
        if r.chosen != chosen:
            r.drift_hold = 0
        elif r.time_drift:  # the machine's load moved, not the regime: the next such check waits longer
            r.drift_hold = min(max(2 * r.drift_hold, 4 * self.params.monitor), self.params.reexplore_max)
        r.time_drift = False
        r.chosen, r.why, r.exploring = chosen, why, False
        r.steps_since, r.reference, r.recent, r.drift_windows = 0, None, Measured(), 0
        measured = "; ".join(f"{a}: {r.measured[a].describe()}" + ("" if a in r.alive else " (dropped)")
                             for a in self.settings if a in r.measured)
        switch = f", switching from {self.current}" if chosen != self.current else ""
        self.log(f"expert offload, {_label(r.bucket)}: chose {chosen}{switch} ({why}); next check in {r.interval} "
                 f"steps. Measured: {measured}")
        self._switch(chosen, "", announce=False)

    def _why(self, r: Regime, chosen: Setting) -> str:
        simplest = self.settings[0]
        if chosen == simplest:
            return "no other setting is clearly faster" if len(self.settings) > 1 else "the only candidate"
        c, s = r.measured[chosen], r.measured[simplest]
        ratio = f"{s.median / c.median:.2f}x the speed of {simplest}"
        noise = spread([r.measured[a] for a in r.alive])
        if reads_less(c, s, self.params) and not beats(c, s, self.params, noise):
            return (f"as fast as {simplest} within noise ({ratio}) and reads {1 - c.bytes_per_token / s.bytes_per_token:.0%} "
                    f"fewer bytes per token")
        simpler = self.settings[:self.settings.index(chosen)]
        return ratio + ("; each simpler setting measured clearly slower than another" if len(simpler) > 1 else "")

    # -- exploit ----------------------------------------------------------------------------------

    def _exploit(self, r: Regime, s: StepSample) -> None:
        p = self.params
        if self.current != r.chosen:  # back in this regime: its choice applies at once
            self._switch(r.chosen, f"{_label(r.bucket)}: its choice ({r.why})")
            return
        if self._settling():
            return
        r.steps_since += 1
        r.recent.add(s)
        if len(r.recent.costs) >= p.monitor:
            if r.reference is None:
                r.reference = r.recent
            else:
                off, by_time = self._drift(r.reference, r.recent)
                if by_time and r.steps_since < r.drift_hold:
                    off = None
                r.drift_windows = r.drift_windows + 1 if off else 0
                if r.drift_windows >= 2:
                    r.time_drift = by_time
                    self._explore_again(r, off)
                    return
            r.recent = Measured()
        if r.steps_since >= r.interval:
            self._explore_again(r, f"{r.steps_since} steps since the last choice")

    def _drift(self, ref: Measured, now: Measured) -> tuple[str | None, bool]:
        """Why `now` (a monitor window) is off the decision's first window, or None; and whether only its time per
        token moved (the hit rate does not depend on the machine's load, time does)."""
        if ref.hit_rate is not None and now.hit_rate is not None and \
                abs(now.hit_rate - ref.hit_rate) > self.params.hit_drift:
            return f"hit rate moved from {ref.hit_rate:.0%} to {now.hit_rate:.0%}", False
        if abs(now.median / ref.median - 1) > self.params.drift:
            return f"time per token moved from {1e3 * ref.median:.3f} to {1e3 * now.median:.3f} ms", True
        return None, False

    def _explore_again(self, r: Regime, why: str) -> None:
        """Measure every setting again, the one in force first (no switch to start)."""
        r.exploring, r.measured, r.round = True, {}, 0
        r.alive = [r.chosen] + [a for a in self.settings if a != r.chosen]
        self._start_round(r)
        self.log(f"expert offload, {_label(r.bucket)}: exploring again ({why})")

    # -- switching --------------------------------------------------------------------------------

    def _switch(self, new: Setting, why: str, announce: bool = True) -> None:
        if new == self.current:
            return
        if announce:
            self.log(f"expert offload: {self.current} -> {new} ({why})")
        self.current = new
        self.num_switches += 1
        self._settle = self.params.settle

    def _settling(self) -> bool:
        """True for the first `settle` steps after a switch (not measured)."""
        if self._settle > 0:
            self._settle -= 1
            return True
        return False

    def describe(self) -> str:
        """Every regime: what runs and why, or how far its exploration is."""
        lines = []
        for bucket, r in sorted(self.regimes.items()):
            state = (f"exploring (round {r.round + 1}/{self.params.rounds})" if r.exploring
                     else f"{r.chosen} ({r.why})")
            lines.append(f"  {_label(bucket)}: {state}")
            lines += [f"    {a}: {r.measured[a].describe()}" for a in self.settings if a in r.measured]
        return "\n".join(lines) or "  no decode step yet"
