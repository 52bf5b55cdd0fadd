"""OffloadTuner: the offload setting in force (eviction policy x prefetcher), fixed or chosen by `auto`.

With `--expert-eviction auto` / `--expert-prefetch auto` it runs AutoOffloadPolicy (auto.py) against the live store:
after each engine step the engine hands it (tokens, sequences, forward seconds); it takes the store's counters
over that step (stats.py), gives decode-only steps to the policy, and applies the setting the policy returns:
the deciding eviction policy (policies.SwitchedPolicy.use) and the prefetcher's predictor (Prefetcher.use).
No forward runs between steps, so a switch never meets a half-done layer, and tokens never depend on it (every
setting gives the resident path's tokens). It reads the store and changes only those two choices; it never
reaches into the runner.

When the cache holds every expert, nothing is read twice and no eviction or guess can help: auto takes its
simplest candidate and measures nothing."""
from __future__ import annotations

import logging
import sys

from ferry.experts.auto import AutoOffloadPolicy
from ferry.experts.policies import EvictionPolicy, SwitchedPolicy
from ferry.experts.predictors import ExpertPredictor
from ferry.experts.samples import AutoParams, Setting, StepSample
from ferry.experts.stats import ExpertStats
from ferry.experts.store import ExpertStore

log = logging.getLogger("ferry")


class OffloadTuner:
    """settings: the candidates, simplest first (one: fixed, nothing measured); why: how they came about (explain).
    predictors: prefetch name -> the predictor the prefetcher uses for it (the store's prefetcher, when one of the
    settings prefetches); explain: every switch and decision is printed to stderr as well as logged."""

    def __init__(self, store: ExpertStore, settings: list[Setting], why: str,
                 predictors: dict[str, ExpertPredictor], explain: bool = False,
                 params: AutoParams = AutoParams()) -> None:
        self.store = store
        self.settings = settings
        self.why = why
        self.predictors = predictors
        self.explain = explain
        self.policy = AutoOffloadPolicy(settings, params, self._say)
        self.applied = settings[0]
        self._last: ExpertStats | None = None  # the store's counters after the previous step
        self.apply(self.applied)

    @property
    def auto(self) -> bool:
        return len(self.settings) > 1

    @property
    def current(self) -> Setting:
        return self.applied

    @property
    def num_switches(self) -> int:
        return self.policy.num_switches

    def step_done(self, num_tokens: int, num_seqs: int, seconds: float) -> None:
        """An engine step computed num_tokens tokens of num_seqs sequences in `seconds` of forward time."""
        if not self.auto:
            return
        now, before = self.store.stats(), self._last
        self._last = now
        if before is None or now.lookups < before.lookups or num_seqs < 1 or num_tokens != num_seqs:
            return  # the first step, counters reset (the planner's probe), or not decode-only: not measured
        sample = StepSample(num_seqs, seconds, now.lookups - before.lookups, now.hits - before.hits,
                            now.stall_seconds - before.stall_seconds, now.bytes_read - before.bytes_read,
                            now.num_predicted - before.num_predicted,
                            now.num_predicted_used - before.num_predicted_used)
        setting = self.policy.observe(sample)
        if setting != self.applied:
            self.apply(setting)

    def apply(self, setting: Setting) -> None:
        """Make `setting` the one in force from the next forward on."""
        policy: EvictionPolicy = self.store.policy
        if isinstance(policy, SwitchedPolicy):
            policy.use(setting.eviction)
        elif policy.name != setting.eviction:
            raise ValueError(f"the store evicts with {policy.name}, not {setting.eviction}")
        prefetcher = self.store.prefetcher
        if prefetcher is not None:
            prefetcher.use(self.predictors[setting.prefetch])
        elif setting.prefetch != "none":
            raise ValueError(f"setting {setting} prefetches but the store has no prefetcher")
        self.applied = setting

    def describe(self) -> str:
        """What `--explain` prints at start, and after it each decision."""
        if not self.auto:
            return f"expert offload: {self.applied} ({self.why})"
        return (f"expert offload: auto among {', '.join(map(str, self.settings))} ({self.why}), chosen per decode "
                f"batch size from measured time per token (ferry/experts/auto.py); now {self.applied}\n"
                + self.policy.describe())

    def _say(self, message: str) -> None:
        log.info("%s", message)
        if self.explain:
            print(message, file=sys.stderr, flush=True)


def resolve(settings: list[Setting], store: ExpertStore) -> tuple[list[Setting], str]:
    """The candidates auto keeps for this store, and why: only the simplest when every expert fits in RAM."""
    if len(settings) == 1:
        return settings, "as asked"
    total = sum(len(records) for records in store.index.experts.values())
    if store.cache.num_slots >= total:
        return settings[:1], (f"auto: the cache holds all {total} experts, so nothing is read twice and no "
                              f"eviction or guess can help")
    return settings, f"the cache holds {store.cache.num_slots} of {total} experts"

