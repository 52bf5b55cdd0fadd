"""Scheduling policies: which waiting request goes first, which running request gives up its KV.
A policy only orders; the scheduler does the work."""
from __future__ import annotations

from typing import Protocol, Sequence

from ferry.request import Request


class SchedulingPolicy(Protocol):
    def order(self, waiting: Sequence[Request]) -> list[Request]:
        """Waiting requests in the order they should be admitted."""
        ...

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        """The running request to preempt when KV blocks run out."""
        ...


class FCFSPolicy:
    """First come, first served; the newest running request is preempted first."""

    def order(self, waiting: Sequence[Request]) -> list[Request]:
        return sorted(waiting, key=lambda r: r.arrival_time)

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=lambda r: r.arrival_time)


class PriorityPolicy:
    """Lower `priority` first, then arrival; the lowest-priority, newest request is preempted first."""

    def order(self, waiting: Sequence[Request]) -> list[Request]:
        return sorted(waiting, key=lambda r: (r.priority, r.arrival_time))

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=lambda r: (r.priority, r.arrival_time))


POLICIES = {"fcfs": FCFSPolicy, "priority": PriorityPolicy}
