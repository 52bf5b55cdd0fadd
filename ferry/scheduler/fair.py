"""The fair scheduling policy (`--scheduling-policy fair`, after FastSwitch and VTC's token counters): every client
gets an equal share of the tokens the engine serves, measured over a sliding window of steps.

A client is the OpenAI request's `user` (`Request.user`); requests without one share the client "". Tokens served
are KV tokens computed for the client's requests (prompt and generated), each position charged once: a request
recomputed after a preemption is not charged again, and prefix-cache hits cost nothing.

- Admission (`order`): round robin over clients, the client holding the fewest running slots first, then the one
  served least in the window, then arrival; within a client first come, first served.
- Preemption for fairness (`displace`): when the first request in that order cannot start (no free slot, or too few
  free KV blocks), the newest running request of the most-served client is preempted, if that client holds more
  slots than the waiting one's and was served more than `quantum` tokens more in the window. The quantum is the
  hysteresis that keeps the slots from changing hands every step: with an odd split, the slot moves back and forth
  about every 2 * quantum tokens of difference. The scheduler preempts with the configured mode (recompute or swap).
- Preemption when KV blocks run out (`pick_victim`): the newest request of the most-served client.

Nobody starves: a waiting client's count only decays (it is not served), a running one's grows, so within a window
the waiting one becomes the least served and takes a slot."""
from __future__ import annotations

from collections import Counter, deque
from typing import Sequence

from ferry.request import Request
from ferry.scheduler.base import SchedulingPolicy

WINDOW_STEPS = 256  # the sliding window, in engine steps (steps, not seconds: the same run gives the same schedule)
QUANTUM = 32  # tokens a client must be ahead of a waiting one before one of its slots is taken away
MAX_METRIC_CLIENTS = 8  # /metrics shows the most-served clients by name, the rest as one "other" (bounded labels)


def client_of(req: Request) -> str:
    return req.user or ""


class ServiceWindow:
    """Tokens served per client over the last `num_steps` steps."""

    def __init__(self, num_steps: int) -> None:
        if num_steps < 1:
            raise ValueError(f"the fairness window must hold at least one step, got {num_steps}")
        self.num_steps = num_steps
        self.steps: deque[Counter[str]] = deque()
        self.totals: Counter[str] = Counter()
        self.current: Counter[str] = Counter()

    def add(self, client: str, num_tokens: int) -> None:
        self.current[client] += num_tokens
        self.totals[client] += num_tokens

    def end_step(self) -> None:
        self.steps.append(self.current)
        self.current = Counter()
        if len(self.steps) > self.num_steps:
            for client, n in self.steps.popleft().items():
                self.totals[client] -= n
                if not self.totals[client]:
                    del self.totals[client]

    def served(self, client: str) -> int:
        return self.totals.get(client, 0)


class FairPolicy(SchedulingPolicy):
    reuse_swapped_kv = True  # a fairness switch is often short: the swapped request's blocks are still there
    def __init__(self, window_steps: int = WINDOW_STEPS, quantum: int = QUANTUM) -> None:
        self.window = ServiceWindow(window_steps)
        self.quantum = quantum
        self._charged: dict[str, int] = {}  # req_id -> highest num_computed_tokens charged

    def order(self, waiting: Sequence[Request], running: Sequence[Request] = ()) -> list[Request]:
        held = Counter(client_of(r) for r in running)
        rank: Counter[str] = Counter()
        keyed = []
        for req in sorted(waiting, key=lambda r: r.arrival_time):
            c = client_of(req)
            keyed.append((held[c] + rank[c], self.window.served(c), req.arrival_time, len(keyed), req))
            rank[c] += 1
        return [k[-1] for k in sorted(keyed, key=lambda k: k[:4])]

    def pick_victim(self, candidates: Sequence[Request]) -> Request:
        return max(candidates, key=lambda r: (self.window.served(client_of(r)), r.arrival_time))

    def displace(self, running: Sequence[Request], waiting: Sequence[Request]) -> tuple[Request, Request] | None:
        if not waiting or not running:
            return None
        first = self.order(waiting, running)[0]
        c = client_of(first)
        held = Counter(client_of(r) for r in running)
        owed = [v for v in held if v != c and held[v] > held[c]
                and self.window.served(v) > self.window.served(c) + self.quantum]
        if not owed:
            return None
        v = max(owed, key=lambda v: (self.window.served(v), v))
        victim = max((r for r in running if client_of(r) == v), key=lambda r: r.arrival_time)
        return first, victim

    def charge(self, req: Request) -> None:
        done = self._charged.get(req.req_id, 0)
        if req.num_computed_tokens > done:
            self.window.add(client_of(req), req.num_computed_tokens - done)
            self._charged[req.req_id] = req.num_computed_tokens

    def end_step(self) -> None:
        self.window.end_step()

    def release(self, req: Request) -> None:
        self._charged.pop(req.req_id, None)

    def shares(self) -> dict[str, float]:
        """The MAX_METRIC_CLIENTS most-served clients' shares by name ("" shown as "-"), the others summed as
        "other" (client names come from requests: the label set must stay bounded)."""
        total = sum(self.window.totals.values())
        if not total:
            return {}
        top = self.window.totals.most_common()
        out = {(c or "-")[:64]: n / total for c, n in top[:MAX_METRIC_CLIENTS]}
        rest = sum(n for _, n in top[MAX_METRIC_CLIENTS:])
        if rest:
            out["other"] = out.get("other", 0.0) + rest / total
        return out
