"""Which cached expert to evict. A policy sees accesses and removals and picks a victim among the
candidates the cache offers (ready, unpinned, unprotected experts); it never touches buffers.

Keys are (layer, expert). Layers run in a cycle (layer 0..L-1 for every forward), so an expert's next
possible use is at most one cycle away: that is what the correlation policy's distance measures."""
from __future__ import annotations

import abc
from collections import OrderedDict, defaultdict
from typing import Sequence

Key = tuple[int, int]  # (layer, expert)


class EvictionPolicy(abc.ABC):
    """Base: the do-nothing hooks; subclasses implement choose_victim."""

    name = ""  # the --expert-eviction value

    def on_access(self, key: Key) -> None:
        """key was used by a forward (a hit, or a load it waited for)."""

    def on_insert(self, key: Key) -> None:
        """key got a cache slot (demand load or prefetch)."""

    def on_remove(self, key: Key) -> None:
        """key left the cache."""

    def on_layer(self, layer: int) -> None:
        """The forward reached `layer` (the store started its demand reads)."""

    def on_hints(self, hints: dict[Key, float]) -> None:
        """Predicted next-use probabilities of upcoming experts (the prefetcher's), replacing older ones."""

    @abc.abstractmethod
    def choose_victim(self, candidates: Sequence[Key]) -> Key:
        """The key to evict, one of candidates (never empty)."""

    def admit(self, key: Key, p: float, victim: Key) -> bool:
        """Should a prefetch of key (predicted with probability p) evict victim? Default: yes."""
        return True


class LRUPolicy(EvictionPolicy):
    """Evict the expert used (or inserted) longest ago."""

    name = "lru"

    def __init__(self, moe_layers: Sequence[int] = (), num_experts: int = 1, top_k: int = 1) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def on_access(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    on_insert = on_access

    def on_remove(self, key: Key) -> None:
        self.order.pop(key, None)

    def choose_victim(self, candidates: Sequence[Key]) -> Key:
        allowed = set(candidates)
        for key in self.order:
            if key in allowed:
                return key
        return candidates[0]


class FrequencyCorrelationPolicy(LRUPolicy):
    """Evict the expert with the lowest expected use per layer-step until its next chance:
    score = P(used at its layer's next visit) / (layers until that visit). P is the predictor's hint for
    experts it predicted (correlation or pre-gating), else the expert's measured frequency at its layer
    (uses / visits, smoothed). Ties go to the least recently used."""

    name = "correlation"

    def __init__(self, moe_layers: Sequence[int] = (), num_experts: int = 1, top_k: int = 1) -> None:
        super().__init__(moe_layers, num_experts, top_k)
        self.pos = {layer: i for i, layer in enumerate(moe_layers)}
        self.prior = top_k / max(num_experts, 1)  # P of an expert never seen: its share of the routing
        self.uses: dict[Key, int] = defaultdict(int)
        self.visits: dict[int, int] = defaultdict(int)
        self.current = -1
        self.hints: dict[Key, float] = {}

    def on_access(self, key: Key) -> None:
        super().on_access(key)
        self.uses[key] += 1

    def on_insert(self, key: Key) -> None:
        LRUPolicy.on_access(self, key)

    def on_layer(self, layer: int) -> None:
        self.current = layer
        self.visits[layer] += 1

    def on_hints(self, hints: dict[Key, float]) -> None:
        self.hints = hints

    def _distance(self, layer: int) -> int:
        n = max(len(self.pos), 1)
        if layer not in self.pos or self.current not in self.pos:
            return n
        return (self.pos[layer] - self.pos[self.current] - 1) % n + 1  # next layer: 1, the current one: n

    def score(self, key: Key) -> float:
        p = self.hints.get(key)
        if p is None:
            p = (self.uses[key] + self.prior) / (self.visits[key[0]] + 1)
        return p / self._distance(key[0])

    def choose_victim(self, candidates: Sequence[Key]) -> Key:
        rank = {k: i for i, k in enumerate(self.order)}
        return min(candidates, key=lambda k: (self.score(k), rank.get(k, -1)))

    def admit(self, key: Key, p: float, victim: Key) -> bool:
        """Only when the guess is worth more than what it displaces (sticky routing keeps a layer's experts hot)."""
        return p / self._distance(key[0]) > self.score(victim)


class SwitchedPolicy(EvictionPolicy):
    """Several policies kept up to date side by side (every hook reaches each), one of which decides: so
    `--expert-eviction auto` (ferry/experts/tuner.py) can change the deciding one between steps, and it decides
    from the whole history of accesses rather than from the moment it took over."""

    def __init__(self, policies: dict[str, EvictionPolicy], active: str) -> None:
        self.policies = policies
        self.use(active)

    def use(self, name: str) -> None:
        if name not in self.policies:
            raise ValueError(f"no eviction policy {name!r} here; have {', '.join(self.policies)}")
        self.name, self.active = name, self.policies[name]

    def on_access(self, key: Key) -> None:
        for p in self.policies.values():
            p.on_access(key)

    def on_insert(self, key: Key) -> None:
        for p in self.policies.values():
            p.on_insert(key)

    def on_remove(self, key: Key) -> None:
        for p in self.policies.values():
            p.on_remove(key)

    def on_layer(self, layer: int) -> None:
        for p in self.policies.values():
            p.on_layer(layer)

    def on_hints(self, hints: dict[Key, float]) -> None:
        for p in self.policies.values():
            p.on_hints(hints)

    def choose_victim(self, candidates: Sequence[Key]) -> Key:
        return self.active.choose_victim(candidates)

    def admit(self, key: Key, p: float, victim: Key) -> bool:
        return self.active.admit(key, p, victim)


EVICTION_POLICIES = {"lru": LRUPolicy, "correlation": FrequencyCorrelationPolicy}
