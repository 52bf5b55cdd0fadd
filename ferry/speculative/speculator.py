"""Speculator: the scheduler's handle on speculation. Per step it decides which running requests verify drafts
and how many (a fixed --num-speculative-tokens K, or `auto`: adaptive.py), asks the proposer for them, and after
the step records what was accepted. Requests that ask for logprobs are drafted for like the others: each verified
row gives the logprobs of the token it sampled, the ones a one-token decode step would give."""
from __future__ import annotations

import time
from typing import Sequence

from ferry.request import Request
from ferry.speculative.adaptive import AdaptiveK
from ferry.speculative.base import Proposer, SpecStats


class Speculator:
    routes = False  # route (R2R) mode: drafts are trusted, not verified (ferry/speculative/route.py)

    def __init__(self, proposer: Proposer, num_tokens: int | None, max_rows: int | None = None,
                 max_auto_tokens: int = 8) -> None:
        """num_tokens: draft tokens per request per step at most (None: `auto`, chosen per step up to
        max_auto_tokens). max_rows: no drafts in a step past this many rows (the rows the linear kernels compute
        exactly as a one-row step would; None: no limit)."""
        self.proposer = proposer
        self.max_rows = max_rows
        self.fixed_k = num_tokens
        self.controller = AdaptiveK(num_tokens if num_tokens is not None else max_auto_tokens)
        self.stats = SpecStats()
        self.last_k = 0  # the draft length chosen for the last step (for tests and the bench)

    @property
    def method(self) -> str:
        return self.proposer.name

    def draft(self, reqs: Sequence[Request], budget: int, other_rows: int = 0) -> dict[str, list[int]]:
        """Draft tokens for the decoding requests `reqs` (each at its last known token), within `budget` extra
        rows in all; other_rows: prefill rows expected in the same step (the cost model sees them)."""
        k = self.fixed_k if self.fixed_k is not None else self.controller.choose(len(reqs), other_rows)
        self.last_k = k
        if not reqs or k < 1 or budget < 1:
            return {}
        share = max(1, budget // len(reqs))  # the rows left, shared evenly
        caps = [max(0, min(k, share, self._room(r))) for r in reqs]
        asked = [(r, c) for r, c in zip(reqs, caps) if c > 0]
        start = time.perf_counter()
        proposals = self.proposer.propose([r for r, _ in asked], [c for _, c in asked]) if asked else []
        drafts: dict[str, list[int]] = {}
        for (r, c), p in zip(asked, proposals):
            p = list(p[:min(c, budget)])
            if p:
                drafts[r.req_id] = p
                budget -= len(p)
        self.controller.observe_proposer(sum(map(len, drafts.values())), time.perf_counter() - start)
        return drafts

    @staticmethod
    def _room(req: Request) -> int:
        """Drafts that can still matter: the request ends at max_tokens or the context length."""
        room = req.max_model_len - req.num_tokens - 1 if req.max_model_len else 1 << 30
        if req.params.max_tokens is not None:
            room = min(room, req.params.max_tokens - req.num_output_tokens - 1)
        return room

    def skip_step(self, num_decodes: int = 0) -> None:
        """No room for drafts in this step (num_decodes: the decodes that run without)."""
        self.last_k = 0

    def next_token(self, req_id: str) -> int | None:
        """Route mode: the small model's token after req_id's drafts (None: the target samples it)."""
        return None

    def record(self, req: Request, num_drafted: int, num_accepted: int) -> None:
        """req verified num_drafted drafts and accepted num_accepted (it gained num_accepted + 1 tokens)."""
        self.stats.record(num_drafted, num_accepted)
        self.controller.observe_acceptance(num_drafted, num_accepted)

    def observe(self, req: Request, num_new_tokens: int) -> None:
        self.proposer.observe(req, num_new_tokens)

    def step_done(self, rows: int, seconds: float, verified: bool, decode_only: bool = True) -> None:
        """A step's forward over `rows` rows took `seconds`; verified: some request verified drafts in it;
        decode_only: no prefill chunk in it (only those feed the cost model: a prompt row costs differently)."""
        if decode_only:
            self.controller.observe_step(rows, seconds)
        self.stats.num_steps += verified

    def release(self, req_id: str) -> None:
        self.proposer.release(req_id)
