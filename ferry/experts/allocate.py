"""Choosing one format per expert so the expert store fits a size (`--expert-bits auto --expert-store-size`).

The problem: minimize sum over experts of share_e x err_e(format_e) subject to sum of record bytes <= size, each
expert's options measured by ferry/experts/bitwidth.py. It is a multiple-choice knapsack; the greedy on each
expert's lower convex hull of (bytes, weighted error) — start every expert at its smallest format, then repeatedly
take the upgrade with the largest error removed per byte that still fits — is optimal for the LP relaxation and
leaves at most one upgrade's worth of bytes unused (Sinha & Zoltners 1979). An upgrade that removes no error is
never taken (an expert the text never routes to stays at the smallest format). Pure Python: no torch."""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from ferry.errors import InvalidRequest
from ferry.experts.bitwidth import ExpertCost, Format, Key


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB ({n} bytes)"


def hull(cost: ExpertCost) -> list[tuple[Format, int, float]]:
    """cost's options on the lower convex hull of (bytes, share x error), smallest first."""
    opts = sorted(cost.options, key=lambda o: (o[1], o[2]))
    kept: list[tuple[Format, int, float]] = []
    for o in opts:
        if kept and (o[1] == kept[-1][1] or o[2] >= kept[-1][2]):  # same bytes, or more bytes and no better
            continue
        while len(kept) >= 2 and _slope(kept[-2], kept[-1]) <= _slope(kept[-1], o):  # kept[-1] not convex
            kept.pop()
        kept.append(o)
    return kept


def _slope(a: tuple[Format, int, float], b: tuple[Format, int, float]) -> float:
    """Error removed per byte going from a to b (b is larger)."""
    return (a[2] - b[2]) / (b[1] - a[1])


def size_bounds(costs: list[ExpertCost]) -> tuple[int, int]:
    """(smallest store: every expert at its smallest format, full precision: every expert dense)."""
    smallest = sum(min(o[1] for o in c.options) for c in costs)
    full = sum(next(o[1] for o in c.options if o[0].bits == 0) for c in costs)
    return smallest, full


def check_size(costs: list[ExpertCost], size: int) -> None:
    """A clear error for a size no auto store can have (or should: full precision fits)."""
    smallest, full = size_bounds(costs)
    if size < smallest:
        raise InvalidRequest(f"--expert-store-size {_mib(size)} is below the smallest store of these experts, "
                             f"{_mib(smallest)} (every expert int4 with one scale per row); give at least that")
    if size >= full:
        raise InvalidRequest(f"--expert-store-size {_mib(size)} holds every expert at full precision "
                             f"({_mib(full)}): use --expert-bits none (lossless) instead, or a size below that")


def allocate(costs: list[ExpertCost], size: int) -> dict[Key, Format]:
    """The format of every expert: total record bytes <= size, weighted error minimized greedily (above)."""
    check_size(costs, size)
    hulls = {c.key: hull(ExpertCost(c.key, c.share, c.rows, [(f, b, c.share * e) for f, b, e in c.options]))
             for c in costs}
    at = {k: 0 for k in hulls}
    left = size - sum(h[0][1] for h in hulls.values())
    heap = [(-_slope(h[0], h[1]), k) for k, h in hulls.items() if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        neg, key = heapq.heappop(heap)
        if neg >= 0:  # no error left to remove per byte anywhere
            break
        h, i = hulls[key], at[key]
        extra = h[i + 1][1] - h[i][1]
        if extra > left:  # later upgrades of this expert need more still
            continue
        left -= extra
        at[key] = i + 1
        if i + 2 < len(h):
            heapq.heappush(heap, (-_slope(h[i + 1], h[i + 2]), key))
    return {k: hulls[k][i][0] for k, i in at.items()}


@dataclass
class BitPlan:
    """What `--expert-bits auto` chose and why: per expert its format and every option measured."""

    costs: list[ExpertCost]
    choice: dict[Key, Format]
    size: int  # the size asked for
    source: str  # what the errors were measured on

    def chosen(self, c: ExpertCost) -> tuple[Format, int, float]:
        return next(o for o in c.options if o[0] == self.choice[c.key])

    @property
    def nbytes(self) -> int:
        return sum(self.chosen(c)[1] for c in self.costs)

    def layer_summary(self) -> list[str]:
        """One line per MoE layer: formats chosen, share-weighted error, bytes."""
        lines = [f"expert bits from {self.source}: {_mib(self.nbytes)} of {_mib(self.size)} asked",
                 f"{'layer':>5}  {'formats chosen':<44} {'weighted error':>14} {'worst error':>11} {'MiB':>8}"]
        for layer in sorted({c.key[0] for c in self.costs}):
            cs = [c for c in self.costs if c.key[0] == layer]
            names = [self.chosen(c)[0].name for c in cs]
            kinds = ", ".join(f"{names.count(n)} {n}" for n in sorted(set(names), key=names.index))
            werr = sum(c.share * self.chosen(c)[2] for c in cs)
            worst = max(self.chosen(c)[2] for c in cs)
            lines.append(f"{layer:>5}  {kinds:<44} {werr:>14.4f} {worst:>11.4f} "
                         f"{sum(self.chosen(c)[1] for c in cs) / 2**20:>8.2f}")
        return lines

    def to_json(self) -> dict:
        experts = [{"layer": c.key[0], "expert": c.key[1], "share": c.share, "rows": c.rows,
                    "chosen": self.chosen(c)[0].name, "bits": self.chosen(c)[0].bits,
                    "group": self.chosen(c)[0].group, "nbytes": self.chosen(c)[1], "error": self.chosen(c)[2],
                    "options": {f.name: {"nbytes": b, "error": e} for f, b, e in c.options}} for c in self.costs]
        smallest, full = size_bounds(self.costs)
        return {"source": self.source, "size_asked": self.size, "nbytes": self.nbytes, "smallest_nbytes": smallest,
                "full_nbytes": full, "weighted_error": sum(c.share * self.chosen(c)[2] for c in self.costs),
                "error": "relative output error ||f_Q(x) - f(x)|| / ||f(x)|| on the recorded inputs",
                "experts": experts}
