"""Where a new request goes (pure, no Ray): `least-loaded` sends it to the instance whose KV is least committed
(tokens its requests hold, plus prompt tokens still waiting to be computed, over its KV cache), `cache-aware` (the
default) to the instance that already saw the longest block-aligned prefix of its prompt, unless that instance is
loaded more than CACHE_AWARE_TOLERANCE of a KV cache above the least loaded one (then least-loaded): the prefix's
KV is reused there instead of computed again (as SGLang's router's cache-aware policy, with the load from the
front end's own view, exact and without polling).

PrefixIndex is the front end's memory of what it sent where: per instance the hashes of the prompts' full
blocks, chained (a block's hash covers every token before it), in a bounded LRU. It estimates the instance's
prefix cache (which may have evicted since); an estimate that is wrong costs speed, never output."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

DISPATCH_POLICIES = ("cache-aware", "least-loaded")
CACHE_AWARE_TOLERANCE = 0.25  # of an instance's KV tokens: how much more load a prefix hit may bring
MAX_BLOCKS = 1 << 16  # block hashes remembered per instance


@dataclass(frozen=True)
class Candidate:
    """An instance as the front end sees it when a request arrives."""

    index: int
    load_tokens: int  # KV tokens its requests hold + prompt tokens not computed yet
    capacity_tokens: int  # its KV cache, in tokens
    cached_tokens: int  # of the new prompt: the longest block-aligned prefix sent there before
    in_flight: int

    @property
    def load(self) -> float:
        return self.load_tokens / max(1, self.capacity_tokens)


def pick_instance(candidates: Sequence[Candidate], policy: str = "cache-aware") -> int:
    """The index of the instance a new request goes to (candidates: the live instances that take new requests)."""
    least = min(candidates, key=lambda c: (c.load, c.in_flight, c.index))
    if policy == "least-loaded":
        return least.index
    best = max(candidates, key=lambda c: (c.cached_tokens, -c.load, -c.index))
    if best.cached_tokens and best.load - least.load <= CACHE_AWARE_TOLERANCE:
        return best.index
    return least.index


class PrefixIndex:
    """Hashes of the full blocks of the prompts sent to one instance, most recent last."""

    def __init__(self, block_size: int, max_blocks: int = MAX_BLOCKS) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def _hashes(self, tokens: Sequence[int]) -> list[int]:
        out, h, bs = [], 0, self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            h = hash((h, tuple(tokens[start:start + bs])))
            out.append(h)
        return out

    def match(self, tokens: Sequence[int]) -> int:
        """Tokens of the longest block-aligned prefix of tokens this instance was sent."""
        n = 0
        for h in self._hashes(tokens):
            if h not in self.blocks:
                break
            n += self.block_size
        return n

    def add(self, tokens: Sequence[int]) -> None:
        for h in self._hashes(tokens):
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        while len(self.blocks) > self.max_blocks:
            self.blocks.popitem(last=False)

    def clear(self) -> None:
        self.blocks.clear()
