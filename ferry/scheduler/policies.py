"""The scheduling policies behind --scheduling-policy: FCFS and priority here, fair (per-client shares) in fair.py."""
from __future__ import annotations

from typing import Sequence

from ferry.request import Request
from ferry.scheduler.base import SchedulingPolicy
from ferry.scheduler.fair import FairPolicy


class FCFSPolicy(SchedulingPolicy):
    """First come, first served; the newest running request is preempted first."""

    def order(self, waiting: Sequence[Request], running: Sequence[Request] = ()) -> list[Request]:
        return sorted(waiting, key=lambda r: r.arrival_time)

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=lambda r: r.arrival_time)


class PriorityPolicy(SchedulingPolicy):
    """Lower `priority` first, then arrival; the lowest-priority, newest request is preempted first."""

    def order(self, waiting: Sequence[Request], running: Sequence[Request] = ()) -> list[Request]:
        return sorted(waiting, key=lambda r: (r.priority, r.arrival_time))

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=lambda r: (r.priority, r.arrival_time))


POLICIES: dict[str, type[SchedulingPolicy]] = {"fcfs": FCFSPolicy, "priority": PriorityPolicy, "fair": FairPolicy}
__all__ = ["FCFSPolicy", "FairPolicy", "POLICIES", "PriorityPolicy", "SchedulingPolicy"]
