"""The proposer port and the acceptance statistics every speculation method shares."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from ferry.request import Request


class Proposer(Protocol):
    """Guesses the next tokens of running requests. Guesses are only ever verified, never trusted: a bad proposer
    costs speed, not output."""

    name: str

    def propose(self, reqs: Sequence[Request], max_tokens: Sequence[int]) -> list[list[int]]:
        """Up to max_tokens[i] guessed tokens following reqs[i].all_token_ids (fewer, or none, is fine)."""

    def observe(self, req: Request, num_new_tokens: int) -> None:
        """req just gained its last num_new_tokens tokens (verified): learn from them (a phrase pool harvests)."""

    def release(self, req_id: str) -> None:
        """req_id ended: drop what is kept for it (a draft model's KV)."""


@dataclass
class SpecStats:
    """Cumulative counts of one speculation method (for /metrics, bench output and the adaptive controller)."""

    num_steps: int = 0  # steps in which at least one request verified draft tokens
    num_verified_reqs: int = 0  # (request, step) pairs that verified at least one draft token
    num_draft_tokens: int = 0  # draft tokens verified
    num_accepted_tokens: int = 0  # of those, accepted
    num_emitted_tokens: int = 0  # tokens the verifying requests gained (accepted + the target's own one each)
    accepted_by_position: list[int] = field(default_factory=list)  # [i]: drafts accepted at depth i

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.num_verified_reqs += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        self.num_emitted_tokens += num_accepted + 1
        while len(self.accepted_by_position) < num_drafted:
            self.accepted_by_position.append(0)
        for i in range(num_accepted):
            self.accepted_by_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / verified draft tokens (0 before any)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verifying request gains per step (accepted drafts + 1); 0 before any."""
        return self.num_emitted_tokens / self.num_verified_reqs if self.num_verified_reqs else 0.0

    def as_dict(self) -> dict:
        return {"num_steps": self.num_steps, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length,
                "accepted_by_position": list(self.accepted_by_position)}
