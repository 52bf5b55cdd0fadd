"""How many draft tokens to verify per request in a step (`--num-speculative-tokens auto`).

A step that verifies k drafts for each of B requests runs B(k+1) rows and gives each request E(k) tokens, where
with a per-draft acceptance a (the chance a draft is accepted given the ones before it were):
    E(k) = 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a).
Its cost is the target forward over B(k+1) rows plus the proposer's time, from a cost model fitted on the
engine's own step timings: t(M) = c0 + c1 M (least squares over recent steps, decayed), so a batch large enough
that the forward is compute-bound (c1 M dominates) turns speculation off by itself. The controller picks the k
with the most tokens per second, and 0 unless that beats plain decoding by MARGIN: at concurrency 8 speculation
must never make serving slower. Until it has measured enough, it explores: every EXPLORE_EVERY-th step without
speculation tries k = 1, so acceptance and the cost slope keep being measured."""
from __future__ import annotations

from dataclasses import dataclass

DECAY = 0.98  # weight of old observations per new one
MARGIN = 1.05  # speculate only if the model predicts at least 5% more tokens per second
EXPLORE_EVERY = 16  # steps; 0 disables exploration
PRIOR_ACCEPTANCE = 0.5  # before any draft was verified
MIN_OBSERVATIONS = 4.0  # decayed draft positions before the measured acceptance is trusted


@dataclass
class CostModel:
    """t(M) = c0 + c1 M, fitted by exponentially decayed least squares on (rows, seconds) of the steps seen."""

    sw: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, rows: int, seconds: float) -> None:
        for name in ("sw", "sx", "sy", "sxx", "sxy"):
            setattr(self, name, getattr(self, name) * DECAY)
        self.sw += 1.0
        self.sx += rows
        self.sy += seconds
        self.sxx += rows * rows
        self.sxy += rows * seconds

    def predict(self, rows: int) -> float | None:
        """Seconds for a step of `rows` rows (None before any step was seen)."""
        if self.sw <= 0:
            return None
        mean_x, mean_y = self.sx / self.sw, self.sy / self.sw
        var = self.sxx / self.sw - mean_x * mean_x
        slope = max(0.0, (self.sxy / self.sw - mean_x * mean_y) / var) if var > 1e-9 else 0.0
        return max(1e-9, mean_y + slope * (rows - mean_x))


class AdaptiveK:
    """Chooses the draft length of a step from measured acceptance and step costs."""

    def __init__(self, max_k: int, explore_every: int = EXPLORE_EVERY) -> None:
        self.max_k = max_k
        self.explore_every = explore_every
        self.cost = CostModel()
        self.tried = 0.0  # decayed draft positions verified (a position counts if all before it were accepted)
        self.accepted = 0.0  # decayed drafts accepted
        self.draft_seconds_per_token = 0.0  # the proposer's measured cost per draft token per request (draft model)
        self._steps_off = 0

    @property
    def acceptance(self) -> float:
        if self.tried < MIN_OBSERVATIONS:
            return PRIOR_ACCEPTANCE
        return min(self.accepted / self.tried, 0.999)

    def observe_acceptance(self, num_drafted: int, num_accepted: int) -> None:
        """One request verified num_drafted drafts and kept num_accepted of them."""
        self.tried = self.tried * DECAY + min(num_accepted + 1, num_drafted)
        self.accepted = self.accepted * DECAY + num_accepted

    def observe_step(self, rows: int, seconds: float) -> None:
        """The target's forward of a step with this many rows took this long."""
        self.cost.add(rows, seconds)

    def observe_proposer(self, num_draft_tokens: int, seconds: float) -> None:
        """The proposer took this long for this many draft tokens (all requests of a step)."""
        if num_draft_tokens:
            per = seconds / num_draft_tokens
            self.draft_seconds_per_token = per if not self.draft_seconds_per_token else \
                0.9 * self.draft_seconds_per_token + 0.1 * per

    def expected_tokens(self, k: int) -> float:
        a = self.acceptance
        return float(k + 1) if a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)

    def tokens_per_second(self, batch: int, k: int, other_rows: int = 0) -> float | None:
        t = self.cost.predict(batch * (k + 1) + other_rows)
        if t is None:
            return None
        return batch * self.expected_tokens(k) / (t + batch * k * self.draft_seconds_per_token)

    def choose(self, batch: int, other_rows: int = 0) -> int:
        """Draft tokens per request for a step of `batch` decoding requests (and other_rows prefill rows)."""
        if batch < 1 or self.max_k < 1:
            return 0
        base = self.tokens_per_second(batch, 0, other_rows)
        if base is None:
            return 1  # nothing measured yet: a first try
        best_k, best = 0, base * MARGIN
        for k in range(1, self.max_k + 1):
            rate = self.tokens_per_second(batch, k, other_rows)
            if rate is not None and rate > best:
                best_k, best = k, rate
        if best_k == 0:
            self._steps_off += 1
            if self.explore_every and self._steps_off % self.explore_every == 0:
                return 1
        else:
            self._steps_off = 0
        return best_k
