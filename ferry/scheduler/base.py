"""The scheduling policy port: which waiting request goes first, which running request gives up its KV, and (fair)
which running request makes room for a waiting one. A policy only orders and picks; the scheduler does the work."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

from ferry.request import Request


class SchedulingPolicy(ABC):
    """The port every policy implements. order and pick_victim are required; the rest are hooks a policy that
    tracks service (fair) overrides, no-ops here."""

    # swap-in takes back the device blocks a swapped request left if nobody took them (no copy): for a policy that
    # switches often (fair); FCFS and priority keep their schedule exactly as before (KVCacheManager.swap_in)
    reuse_swapped_kv = False

    @abstractmethod
    def order(self, waiting: Sequence[Request], running: Sequence[Request] = ()) -> list[Request]:
        """Waiting requests in the order they should be admitted (running: those holding slots now)."""

    @abstractmethod
    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        """The running request to preempt when KV blocks run out."""

    def displace(self, running: Sequence[Request], waiting: Sequence[Request]) -> tuple[Request, Request] | None:
        """(waiting request, running victim): preempt the victim if the waiting one cannot start otherwise.
        None: nobody waits for a share it is owed."""
        return None

    def charge(self, req: Request) -> None:
        """req's num_computed_tokens advanced in the step just run."""

    def end_step(self) -> None:
        """The step's charges are all in."""

    def release(self, req: Request) -> None:
        """req finished (or was aborted): forget it."""

    def shares(self) -> dict[str, float] | None:
        """Share of the tokens served per client over the policy's window (None: the policy does not track it)."""
        return None
