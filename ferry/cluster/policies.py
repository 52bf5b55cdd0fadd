"""Which running request to move where (pure, no Ray): load balancing and draining an instance, from the front
end's own view, with the load measure dispatch uses (dispatch.py): the KV tokens an instance's requests hold plus
the prompt tokens of those still waiting to be computed, over its KV cache. That is Llumnix's "virtual usage" (KV
used plus the demand of the queue): an instance whose long outputs filled its KV, with requests queued behind them,
reads above 1 while another one whose short requests ended reads near 0, even when both hold as many requests.

Output lengths are not known here (max_tokens is a bound, not a forecast): the policy looks at the KV a request
holds now, never at what it has left."""
from __future__ import annotations

from dataclasses import dataclass

BALANCE_GAP = 0.25  # of a KV cache: the usage gap between the most and the least loaded instance that starts a move
SHORT_USAGE = 0.75  # of a KV cache: a source below this has room for its queue: moving off it buys nothing yet
HEADROOM = 0.1  # of a KV cache: kept free on the destination for its own requests' growth (Llumnix's watermark)


@dataclass(frozen=True)
class Running:
    """A request as the front end sees it."""

    request_id: str
    instance: int
    num_tokens: int  # prompt + output so far: the KV a migration copies (and frees on the source)
    num_output_tokens: int  # 0: still in its prompt (nothing streamed yet)


@dataclass(frozen=True)
class Load:
    """An instance's KV as the front end sees it (the same numbers dispatch reads)."""

    tokens: int  # KV tokens its requests hold + prompt tokens not computed yet (may exceed capacity: a queue)
    capacity: int  # its KV cache, in tokens

    @property
    def usage(self) -> float:
        return self.tokens / max(1, self.capacity)


def pick_balance(load: dict[int, Load], running: list[Running], gap: float = BALANCE_GAP,
                 short: float = SHORT_USAGE, headroom: float = HEADROOM) -> tuple[str, int, int] | None:
    """(request, from, to): one request from the instance with the highest KV usage to the one with the lowest,
    when the source is short of KV (usage at least `short`) and the usages differ by `gap` or more. The request is
    the one whose move frees the most KV on the source (the most tokens), among those that fit in the destination's
    free KV less `headroom` (what its own requests grow into) and do not leave it more loaded than the source (no
    ping-pong); None when nothing is worth moving."""
    if len(load) < 2:
        return None
    src = max(load, key=lambda i: (load[i].usage, -i))
    dst = min(load, key=lambda i: (load[i].usage, i))
    s, d = load[src], load[dst]
    if s.usage < short or s.usage - d.usage < gap:
        return None
    fits = [r for r in running if r.instance == src and r.num_output_tokens >= 1
            and d.tokens + r.num_tokens <= (1 - headroom) * d.capacity
            and (d.tokens + r.num_tokens) / max(1, d.capacity) <= (s.tokens - r.num_tokens) / max(1, s.capacity)]
    if not fits:
        return None
    best = max(fits, key=lambda r: (r.num_tokens, r.request_id))
    return best.request_id, src, dst


def pick_drain(index: int, load: dict[int, Load], running: list[Running]) -> list[tuple[str, int]]:
    """(request, to) for every request on instance index, each to the other instance with the lowest KV usage at
    that point (counting the moves before it); the longest requests first, while the destinations are emptiest."""
    others = {i: l.tokens for i, l in load.items() if i != index}
    if not others:
        return []
    capacity = {i: max(1, load[i].capacity) for i in others}
    moves = []
    for r in sorted((r for r in running if r.instance == index), key=lambda r: (-r.num_tokens, r.request_id)):
        dst = min(others, key=lambda i: (others[i] / capacity[i], i))
        others[dst] += r.num_tokens
        moves.append((r.request_id, dst))
    return moves
