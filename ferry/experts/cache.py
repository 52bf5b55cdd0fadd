"""The RAM expert cache: fixed slots carved from one ALIGNed slab of at most the budget's bytes.

The slab is allocated once and never grown, so the budget holds by construction; a slot holds one expert
record (layout.py) and is filled by one aligned read. An entry is loading (its slot is being read into)
or done (ready, or failed); pinned entries are being computed with. Only done, unpinned entries can be
evicted; which one, the policy decides. One thread uses it: the forward's (reader threads only fill slots)."""
from __future__ import annotations

from dataclasses import dataclass
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


class ExpertCache:
    def __init__(self, budget_bytes: int, slot_nbytes: int, policy: EvictionPolicy) -> None:
        self.num_slots = budget_bytes // slot_nbytes
        if self.num_slots < 1:
            raise InvalidRequest(f"expert_cache_memory={budget_bytes} bytes holds no expert ({slot_nbytes} bytes "
                                 "each in this store); raise --expert-cache-memory")
        self.slot_nbytes = slot_nbytes
        self.policy = policy
        raw = torch.empty(self.num_slots * slot_nbytes + ALIGN, dtype=torch.uint8)
        start = (-raw.data_ptr()) % ALIGN
        self.slab: torch.Tensor | None = raw[start:start + self.num_slots * slot_nbytes]  # O_DIRECT-aligned
        self.free_slots = list(range(self.num_slots - 1, -1, -1))
        self.entries: dict[Key, Entry] = {}
        self.max_slots_used = 0
        self.num_evictions = 0

    @property
    def nbytes(self) -> int:
        """RAM the cache holds for experts: the slab, whatever is in it."""
        return self.num_slots * self.slot_nbytes

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self.free_slots)

    @property
    def all_free(self) -> bool:
        return not self.entries and len(self.free_slots) == self.num_slots

    def slot(self, index: int) -> torch.Tensor:
        return self.slab[index * self.slot_nbytes:(index + 1) * self.slot_nbytes]

    def lookup(self, key: Key) -> Entry | None:
        return self.entries.get(key)

    def reserve(self, key: Key, protect: set[Key], allow_protected: bool,
                only: set[Key] | None = None, admit: Callable[[Key], bool] | None = None) -> Entry | None:
        """A new loading entry for key in a free slot, or in the slot of an evicted one: done, unpinned, not
        protected (unless allow_protected), among `only` when given, and one `admit` accepts. None when no slot
        can be had now."""
        if not self.free_slots:
            victims = [k for k, e in self.entries.items() if e.done and not e.pins and k not in protect
                       and (only is None or k in only)]
            if not victims and allow_protected:
                victims = [k for k, e in self.entries.items() if e.done and not e.pins]
            if not victims:
                return None
            victim = self.policy.choose_victim(victims)
            if admit is not None and not admit(victim):
                return None
            self.remove(self.entries[victim])
            self.num_evictions += 1
        entry = Entry(key, self.free_slots.pop())
        self.entries[key] = entry
        self.policy.on_insert(key)
        self.max_slots_used = max(self.max_slots_used, self.num_used)
        return entry

    def remove(self, entry: Entry) -> None:
        assert not entry.pins and entry.done, "removing an expert that is in use or being read"
        del self.entries[entry.key]
        self.free_slots.append(entry.slot)
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
