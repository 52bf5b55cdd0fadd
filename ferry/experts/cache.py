"""The RAM expert cache: slots carved from one ALIGNed slab of at most the budget's bytes.

The slab is allocated once and never grown, so the budget holds by construction; a slot holds one expert
record (layout.py) and is filled by one aligned read. Records of one size share a class of slots: a store with
one format has one class; a mixed-bit store (`--expert-bits auto`) has one per record size, each given a slot and
then the share of the budget its experts have of the store's bytes, so that a small int4 expert does not take a
slot sized for a dense one (a budget below one slot of every size: slots of the largest size, for any record). An entry is loading (its slot is being read into) or done (ready, or failed); pinned entries are being
computed with. Only done, unpinned entries of the incoming expert's class can be evicted; which one, the policy
decides. One thread uses it: the forward's (reader threads only fill slots)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable

import torch

from ferry.errors import InvalidRequest
from ferry.experts.policies import EvictionPolicy, Key
from ferry.tiers.disk import ALIGN


@dataclass(eq=False)
class Entry:
    key: Key
    slot: int
    done: bool = False  # the read finished (ready, or error set)
    ticket: int = -1  # the read filling it (ferry.tiers.read_pool)
    error: Exception | None = None
    pins: int = 0  # forwards computing with it right now
    prefetched: bool = False  # loaded by a prefetch and not used since


def carve(budget_bytes: int, counts: dict[int, int]) -> tuple[list[int], dict[int, int]]:
    """(the size of each slot, record size -> the slot size it takes), from the record sizes' counts (record bytes ->
    experts of that size). Each size gets a slot, then the rest of the budget in proportion to its experts' bytes;
    a budget too small for one slot of every size has slots of the largest size, which take any record."""
    big = max(counts)
    if sum(counts) > budget_bytes:
        if budget_bytes < big:
            raise InvalidRequest(f"expert_cache_memory={budget_bytes} bytes holds no expert of {big} bytes "
                                 f"({counts[big]} such in this store); raise --expert-cache-memory")
        return [big] * (budget_bytes // big), {size: big for size in counts}
    total = sum(size * n for size, n in counts.items())
    per_size = {size: max(1, int(budget_bytes * size * n / total) // size) for size, n in counts.items()}
    while sum(size * n for size, n in per_size.items()) > budget_bytes:  # the slots given above the shares
        per_size[max((s for s in per_size if per_size[s] > 1), key=per_size.get)] -= 1
    return [size for size in sorted(per_size) for _ in range(per_size[size])], {size: size for size in counts}


class ExpertCache:
    def __init__(self, budget_bytes: int, sizes: int | dict[Key, int], policy: EvictionPolicy) -> None:
        """sizes: every expert's record bytes (one int: all the same)."""
        record = (lambda key: sizes) if isinstance(sizes, int) else sizes.__getitem__
        self.sizes, slot_of = carve(budget_bytes, {sizes: 1} if isinstance(sizes, int) else Counter(sizes.values()))
        self.size_of = lambda key: slot_of[record(key)]  # the size of the slots key's record takes
        self.offsets = [0] + list(accumulate(self.sizes))[:-1]  # slot -> its byte offset in the slab
        self.free_slots: dict[int, list[int]] = {size: [] for size in self.sizes}  # record size -> free slots
        for index in reversed(range(len(self.sizes))):
            self.free_slots[self.sizes[index]].append(index)
        self.num_slots = len(self.sizes)
        self.slot_nbytes = max(self.sizes)  # the largest record: a slot of any class holds at most this
        self.policy = policy
        raw = torch.empty(self.nbytes + ALIGN, dtype=torch.uint8)
        start = (-raw.data_ptr()) % ALIGN
        self.slab: torch.Tensor | None = raw[start:start + self.nbytes]  # O_DIRECT-aligned (records ALIGN-sized)
        self.entries: dict[Key, Entry] = {}
        self.max_slots_used = 0
        self.num_evictions = 0

    @property
    def nbytes(self) -> int:
        """RAM the cache holds for experts: the slab, whatever is in it."""
        return self.offsets[-1] + self.sizes[-1]

    @property
    def num_used(self) -> int:
        return self.num_slots - sum(map(len, self.free_slots.values()))

    @property
    def all_free(self) -> bool:
        return not self.entries and self.num_used == 0

    def address(self, index: int) -> int:
        """Where slot `index` starts in memory (the reads write there)."""
        return self.slab.data_ptr() + self.offsets[index]

    def slot(self, index: int) -> torch.Tensor:
        return self.slab[self.offsets[index]:self.offsets[index] + self.sizes[index]]

    def lookup(self, key: Key) -> Entry | None:
        return self.entries.get(key)

    def reserve(self, key: Key, protect: set[Key], allow_protected: bool,
                only: set[Key] | None = None, admit: Callable[[Key], bool] | None = None) -> Entry | None:
        """A new loading entry for key in a free slot, or in the slot of an evicted one: done, unpinned, not
        protected (unless allow_protected), among `only` when given, and one `admit` accepts. None when no slot
        can be had now."""
        size = self.size_of(key)
        free = self.free_slots[size]
        if not free:
            mine = [(k, e) for k, e in self.entries.items() if e.done and not e.pins and self.sizes[e.slot] == size]
            victims = [k for k, e in mine if k not in protect and (only is None or k in only)]
            if not victims and allow_protected:
                victims = [k for k, _ in mine]
            if not victims:
                return None
            victim = self.policy.choose_victim(victims)
            if admit is not None and not admit(victim):
                return None
            self.remove(self.entries[victim])
            self.num_evictions += 1
        entry = Entry(key, free.pop())
        self.entries[key] = entry
        self.policy.on_insert(key)
        self.max_slots_used = max(self.max_slots_used, self.num_used)
        return entry

    def remove(self, entry: Entry) -> None:
        assert not entry.pins and entry.done, "removing an expert that is in use or being read"
        del self.entries[entry.key]
        self.free_slots[self.sizes[entry.slot]].append(entry.slot)
        self.policy.on_remove(entry.key)

    def clear(self) -> None:
        """Drop every entry (their reads finished); pinned or loading entries are a caller bug, reported."""
        busy = [e.key for e in self.entries.values() if e.pins or not e.done]
        if busy:
            raise RuntimeError(f"experts {busy} are still pinned or being read; a forward did not release them")
        for e in list(self.entries.values()):
            self.remove(e)

    def release_slab(self) -> None:
        """Give the slab's memory back (after clear())."""
        self.slab = None
