"""`route` (R2R, "Roads to Rome", lossy): a small model generates; a router decides, token by token, whether the
small model's token is kept or the large model (the target) must produce that token instead. The target runs only
for a routed token: in that step it catches up on the tokens the small model produced since its last call (one row
per token, the verification layout) and samples the routed position. So most tokens cost only the small model.

R2R's router is a small MLP over the small model's last hidden state, top logits and token embedding, trained on
labels of where the small and large models' continuations diverge. Here it is kept cheap and honest: three
features of the small model's next-token distribution (top-1 probability, top-1 minus top-2, entropy over the top
TOP_K plus the rest as one bucket), and either the uncalibrated score 1 - top-1 probability or a logistic model
calibrated offline on held-out text (ferry/engine/route_calibrate.py: a position is divergent where the two models'
greedy tokens differ). A token goes to the large model when its score (an estimated chance of divergence) is at
least --route-threshold: 0 sends every token (the large model's greedy output, token for token), 1 none (the small
model's). This module is torch-free; the small model's forward is ferry/engine/route.py."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ferry.errors import InvalidRequest
from ferry.request import Request
from ferry.speculative.base import SpecStats
from ferry.speculative.speculator import Speculator

TOP_K = 16  # logprobs of the small model's best tokens the features read
FEATURES = ("top1", "margin", "entropy")
SCORE_EPS = 1e-6  # scores lie in [SCORE_EPS, 1 - SCORE_EPS]: threshold 0 routes every token, 1 none


def features(top_logprobs: Sequence[float]) -> tuple[float, float, float]:
    """(top-1 probability, top-1 minus top-2 probability, entropy in nats over the given tokens plus the remaining
    mass as one bucket) from the small model's top logprobs, best first."""
    probs = [math.exp(lp) for lp in top_logprobs]
    p1 = probs[0] if probs else 0.0
    p2 = probs[1] if len(probs) > 1 else 0.0
    rest = max(0.0, 1.0 - sum(probs))
    entropy = -sum(p * math.log(p) for p in probs + [rest] if p > 0.0)
    return p1, p1 - p2, entropy


@dataclass(frozen=True)
class Router:
    """score(features) = the estimated chance that the small model's token diverges from the large model's.
    kind "top1": 1 - top-1 probability (no calibration); "logistic": sigmoid(bias + weights . standardized features),
    fitted on divergence labels (route_calibrate.py)."""

    kind: str = "top1"
    weights: tuple[float, ...] = ()
    bias: float = 0.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    info: dict = field(default_factory=dict, compare=False)  # what it was fitted on (written to the file)

    def score(self, f: Sequence[float]) -> float:
        if self.kind == "top1":
            s = 1.0 - f[0]
        else:
            z = self.bias + sum(w * (x - m) / sd for w, x, m, sd in zip(self.weights, f, self.mean, self.std))
            s = 1.0 / (1.0 + math.exp(-z)) if z > -60 else 0.0
        return min(1.0 - SCORE_EPS, max(SCORE_EPS, s))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"kind": self.kind, "features": list(FEATURES), "weights": list(self.weights),
                                          "bias": self.bias, "mean": list(self.mean), "std": list(self.std),
                                          "info": self.info}, indent=1))

    @classmethod
    def load(cls, path: str | Path | None) -> Router:
        """The router in a file written by save() (None: the uncalibrated top-1 router)."""
        if path is None:
            return cls()
        try:
            d = json.loads(Path(path).read_text())
            router = cls(d["kind"], tuple(d["weights"]), float(d["bias"]), tuple(d["mean"]), tuple(d["std"]),
                         d.get("info", {}))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InvalidRequest(f"cannot read route_router {path}: {e}; write one with "
                                 f"`python -m bench route --calibrate-only` or leave it out") from None
        if router.kind not in ("top1", "logistic") or (router.kind == "logistic" and not (
                len(router.weights) == len(router.mean) == len(router.std) == len(FEATURES)
                and all(sd > 0 for sd in router.std))):
            raise InvalidRequest(f"route_router {path} is not a router file (kind top1 or logistic with "
                                 f"{len(FEATURES)} weights, means and positive stds)")
        return router


@dataclass
class RouteRun:
    """One request's tokens from the small model in a step: `tokens` kept (the router let them through), then the
    token after them: `next_token` (the small model's, kept too) or, None, the large model's (routed)."""

    tokens: list[int]
    next_token: int | None


@dataclass
class RouteStats(SpecStats):
    """SpecStats plus where each generated token came from."""

    num_small_tokens: int = 0  # tokens the small model produced and the router kept
    num_large_tokens: int = 0  # tokens the large model produced (routed, or decoded without a small-model run)

    @property
    def large_fraction(self) -> float:
        total = self.num_small_tokens + self.num_large_tokens
        return self.num_large_tokens / total if total else 0.0

    def as_dict(self) -> dict:
        return {**super().as_dict(), "num_small_tokens": self.num_small_tokens,
                "num_large_tokens": self.num_large_tokens, "large_fraction": self.large_fraction}


class RouteSpeculator(Speculator):
    """The scheduler's handle on route mode: per step, each greedy decoding request gets a small-model run (up to
    its share of the step's rows), laid in the plan as trusted drafts (ScheduledReq.route)."""

    routes = True

    def __init__(self, proposer, num_tokens: int | None, max_rows: int | None, router: Router,
                 threshold: float) -> None:
        """proposer: ferry/engine/route.py's RouteProposer (route(reqs, max_tokens, decide) -> runs)."""
        super().__init__(proposer, num_tokens, max_rows)
        self.router = router
        self.threshold = threshold
        self.stats = RouteStats()
        self.runs: dict[str, RouteRun] = {}  # runs planned and not yet recorded, by request

    def decide(self, f: Sequence[float]) -> bool:
        """True: the large model produces this token."""
        return self.router.score(f) >= self.threshold

    def draft(self, reqs: Sequence[Request], budget: int, other_rows: int = 0) -> dict[str, list[int]]:
        """Each request's run: the drafts to lay in the plan (the plan's route_next_token is next_token(req_id))."""
        self.last_k = k = self.fixed_k if self.fixed_k is not None else 16
        able = [r for r in reqs if r.params.temperature == 0 and r.params.logprobs is None]
        self.stats.num_large_tokens += len(reqs) - len(able)  # sampled / logprobs requests decode with the target
        if not able:
            return {}
        for r in able:
            self.runs.pop(r.req_id, None)
        share = max(0, budget // len(able))
        caps = [max(0, min(k, share, self._room(r))) for r in able]
        runs = self.proposer.route(able, caps, self.decide)
        drafts: dict[str, list[int]] = {}
        for r, run in zip(able, runs):
            if run.tokens or run.next_token is not None:
                self.runs[r.req_id] = run
                drafts[r.req_id] = run.tokens
            else:  # the router sent the first token to the target: a plain decode step
                self.stats.num_large_tokens += 1
        return drafts

    def next_token(self, req_id: str) -> int | None:
        run = self.runs.get(req_id)
        return None if run is None else run.next_token

    def skip_step(self, num_decodes: int = 0) -> None:
        """No room for runs in this step: its decodes are the large model's."""
        self.last_k = 0
        self.stats.num_large_tokens += num_decodes

    def record(self, req: Request, num_drafted: int, num_accepted: int) -> None:
        """req's planned run ran: its drafts and next token are the small model's, a routed one the target's."""
        run = self.runs.pop(req.req_id, None)
        routed = run is None or run.next_token is None
        if num_drafted:
            self.stats.record(num_drafted, num_accepted)
        self.stats.num_small_tokens += num_drafted + (not routed)
        self.stats.num_large_tokens += routed
