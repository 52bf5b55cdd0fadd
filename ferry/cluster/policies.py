"""Which running request to move where (pure, no Ray): load balancing and draining an instance, from the front
end's own view (requests in flight on each instance, tokens each request has produced and has left)."""
from __future__ import annotations

from dataclasses import dataclass

BALANCE_GAP = 2  # requests in flight between the most and the least loaded instance that start a migration
MIN_TOKENS_LEFT = 16  # a request about to finish is not worth moving


@dataclass(frozen=True)
class Running:
    """A request as the front end sees it."""

    request_id: str
    instance: int
    num_tokens: int  # prompt + output so far: the KV a migration copies
    num_output_tokens: int  # 0: still in its prompt (nothing streamed yet)
    tokens_left: int  # of its max_tokens (the context length when it has none)


def pick_balance(load: dict[int, int], running: list[Running], gap: int = BALANCE_GAP) -> tuple[str, int, int] | None:
    """(request, from, to): one request from the most to the least loaded instance when their loads differ by gap
    or more (one move narrows the gap by 2), the one with the most tokens left per token to copy (it takes the
    most work off the source for the least copying); None when nothing is worth moving."""
    if len(load) < 2:
        return None
    src = max(load, key=lambda i: (load[i], -i))
    dst = min(load, key=lambda i: (load[i], i))
    if load[src] - load[dst] < gap:
        return None
    movable = [r for r in running if r.instance == src and r.num_output_tokens >= 1
               and r.tokens_left >= MIN_TOKENS_LEFT]
    if not movable:
        return None
    best = max(movable, key=lambda r: (r.tokens_left / r.num_tokens, r.request_id))
    return best.request_id, src, dst


def pick_drain(index: int, load: dict[int, int], running: list[Running]) -> list[tuple[str, int]]:
    """(request, to) for every request on instance index, each to the least loaded other instance at that point
    (counting the moves before it); the longest requests first, while the destinations are emptiest."""
    others = {i: n for i, n in load.items() if i != index}
    if not others:
        return []
    moves = []
    for r in sorted((r for r in running if r.instance == index), key=lambda r: (-r.num_tokens, r.request_id)):
        dst = min(others, key=lambda i: (others[i], i))
        others[dst] += 1
        moves.append((r.request_id, dst))
    return moves
