"""ExpertStore: the demand path. MoE layers get their experts' weights from it; experts missing from the RAM
cache (cache.py, a byte budget) are read from the expert store folder (reads: ferry.experts.reads) and unpacked
into weights (slots.py). Each MoE layer gets a `StoreExperts` (the models' ExpertWeights protocol), so model
code does not know experts live on disk. Guessing later layers' experts is the prefetcher's (prefetch.py),
which learns the routing through the model's routing port; the store gives it the disk when it has room.

One layer call, for the experts its tokens routed to:
  1. when the layer asks (`weights`), reads start for the first READ_AHEAD missing experts of this layer that
     get a slot without evicting one this layer still needs (demand: first in the I/O queue), before the
     layer tells its routing observers (a prefetcher's guesses queue behind these reads);
  2. experts are handed out one at a time, those already in RAM first, so the forward computes with them
     while the others are read (it sums the results in expert order, so tokens match the resident path
     exactly); each is pinned while in use, and more reads start as it is handed out. The forward waits
     (stall time) only when no expert it still needs has been read;
  3. once an expert is computed with, its slot may take a guess (it is a whole forward from its next use):
     the prefetcher submits more guesses then."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch
from torch import nn

from ferry.config import ModelConfig
from ferry.errors import InvalidRequest, ModelLoadError
from ferry.experts.cache import Entry, ExpertCache
from ferry.experts.layout import StoreIndex
from ferry.experts.policies import EvictionPolicy, Key
from ferry.experts.reads import ExpertReads
from ferry.experts.slots import SlotLayout, Weights
from ferry.experts.stats import ExpertStats, PrefetchStats
from ferry.models.layers.mlp import Weight


class StorePrefetcher(Protocol):
    """What the demand path asks of the prefetcher attached to it (ferry/experts/prefetch.py's `Prefetcher`)."""

    stats: PrefetchStats

    def read_guesses(self) -> None:
        """Queue reads of guessed experts into slots the demand path does not need now."""

    def reset_stats(self) -> None: ...

    def clear(self) -> None: ...

    def close(self) -> None: ...


# most demand reads of one layer call started ahead of the forward (read or being read, not yet computed with):
# enough to keep the reader threads busy, few enough that a layer needing more experts than the cache holds streams
# them through a few slots and leaves the rest of the cache to other layers' experts (reused next step), instead
# of evicting them all at its start (a cyclic scan, where every cached expert is gone before its next use)
READ_AHEAD = 3


class ExpertStore:
    """The experts of one expert store folder, for the model it was built for, in a RAM cache of at most
    budget_bytes (None: every expert); `policy` picks what to evict."""

    def __init__(self, folder: str | os.PathLike, cfg: ModelConfig, dtype: torch.dtype, budget_bytes: int | None,
                 policy: EvictionPolicy, allow_direct: bool = True, num_io_threads: int = 2) -> None:
        self.folder = Path(folder)
        self.index = StoreIndex.load(folder)
        self.layout = self.index.layout
        self._check_model(cfg, dtype)
        self.dtype = dtype  # the engine's: what the experts compute in
        self.slots = SlotLayout(self.index, dtype)
        self._init_cache(budget_bytes, policy)
        # a few reads in flight at once: one small read at a time leaves an SSD's queue mostly empty
        self.reads = ExpertReads(self.folder, self.index, self.cache, allow_direct, num_io_threads)
        self._stats.io_mode = self.reads.io_mode
        self.policy = policy
        self.layer_keys: set[Key] = set()  # the experts of the layer running now
        self.done_with: set[Key] = set()  # those of them it has computed with (their slots may take guesses)
        self.prefetcher: StorePrefetcher | None = None  # set by a Prefetcher built for this store
        self._closed = False

    # -- setup ------------------------------------------------------------------------------------

    def _init_cache(self, budget_bytes: int | None, policy: EvictionPolicy) -> None:
        """The slab of slots, from the budget less the slot layout's scratch (both count against it)."""
        scratch_nbytes = self.slots.scratch_nbytes
        sizes = {(layer, e): self.layout.format_of(r).record_nbytes
                 for layer, recs in self.index.experts.items() for e, r in enumerate(recs)}
        budget = sum(sizes.values()) + scratch_nbytes if budget_bytes is None else budget_bytes
        self.cache = ExpertCache(max(budget - scratch_nbytes, 0), sizes, policy)
        self._stats = ExpertStats(num_slots=self.cache.num_slots, cache_nbytes=self.cache.nbytes + scratch_nbytes,
                                  budget_nbytes=budget)

    def _check_model(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        ix, lay = self.index, self.layout
        moe_layers = [l for l in range(cfg.num_layers) if cfg.moe and cfg.moe.sparse_layers[l]]
        if cfg.moe is None:
            raise InvalidRequest(f"{cfg.path} ({cfg.architecture}) has no experts; --expert-store is for MoE models")
        mine = (ix.architecture, ix.num_layers, ix.num_experts, lay.hidden_size, lay.intermediate_size,
                sorted(ix.layer_files))
        theirs = (cfg.architecture, cfg.num_layers, cfg.moe.num_experts, cfg.hidden_size, cfg.moe.intermediate_size,
                  moe_layers)
        if mine != theirs:
            raise ModelLoadError(f"expert store {self.folder} was built for another model: (architecture, layers, "
                                 f"experts, hidden, expert intermediate, MoE layers) = {mine}, the model has {theirs}")
        dense = any(r.bits == 0 for recs in ix.experts.values() for r in recs)
        if dense and lay.torch_dtype != dtype:
            raise InvalidRequest(f"expert store {self.folder} holds {lay.dtype} experts but the engine runs "
                                 f"{str(dtype).removeprefix('torch.')}; use --dtype {lay.dtype} or convert again "
                                 "with that --dtype")

    def layer(self, layer: int) -> "StoreExperts":
        return StoreExperts(self, layer)

    # -- the forward's side -------------------------------------------------------------------------

    def weights(self, layer: int, expert_ids: Sequence[int]) -> Iterator[tuple[int, Weight, Weight]]:
        """Start reading this layer call's missing experts now; the iterator hands out (i, gate_up, down) for
        each position i of expert_ids, in the order they are at hand (see the module docstring)."""
        keys = [(layer, int(e)) for e in expert_ids]
        self.reads.collect()
        cached = {k: self.cache.lookup(k) for k in keys}  # a hit if the same entry is still there when asked for
        self._stats.lookups += len(keys)
        self.layer_keys, self.done_with = set(keys), set()  # none of them can make room for guesses yet
        for entry in cached.values():  # guesses still queued are needed now: ahead of the other guesses
            if entry is not None:
                self.reads.needed_now(entry)
        reading = self._start_reads(keys, READ_AHEAD)  # the disk first: before any bookkeeping
        self.policy.on_layer(layer)
        return self._hand_out(keys, cached, reading)

    def _hand_out(self, keys: list[Key], cached: dict[Key, Entry | None],
                  reading: set[Key]) -> Iterator[tuple[int, Weight, Weight]]:
        remaining = list(range(len(keys)))
        while remaining:
            self.reads.collect()  # an expert already read first, else the first being read, else the next one
            pos = next((p for p in remaining if self._is_ready(keys[p])),
                       next((p for p in remaining if keys[p] in reading), remaining[0]))
            remaining.remove(pos)
            reading.discard(keys[pos])
            later = [keys[p] for p in remaining]
            entry = self._acquire(keys[pos], set(later), cached[keys[pos]])
            try:
                yield (pos, *self._unpack(keys[pos], entry.slot))
            finally:
                entry.pins -= 1
                reading |= self._start_reads(later, READ_AHEAD - len(reading))
                self.done_with.add(keys[pos])  # a whole forward from its next use: guesses may take its slot
                if self.prefetcher is not None:
                    self.prefetcher.read_guesses()

    def _unpack(self, key: Key, slot: int) -> Weights:
        return self.slots.weights(slot, self.cache.slot(slot), self.index.experts[key[0]][key[1]])

    def _is_ready(self, key: Key) -> bool:
        entry = self.cache.lookup(key)
        return entry is not None and entry.done and entry.error is None

    def _start_reads(self, keys: Sequence[Key], limit: int) -> set[Key]:
        """Start demand reads of the keys not cached, while slots can be had without waiting or evicting one of
        keys, at most `limit` of them. The keys whose reads started."""
        started: set[Key] = set()
        for key in keys:
            if len(started) >= limit:
                break
            if self.cache.lookup(key) is not None:
                continue
            entry = self.cache.reserve(key, set(keys), allow_protected=False)
            if entry is None:  # no slot now; the keys after this one are needed later
                break
            self.reads.submit(entry, demand=True)
            started.add(key)
        return started

    def _acquire(self, key: Key, keep: set[Key], cached: Entry | None) -> Entry:
        """key's entry, read and pinned; waits for its read (or for a slot) if needed. A hit when it was cached
        (or being prefetched) before this layer asked and still is."""
        t0 = time.perf_counter()
        while True:
            entry = self.cache.lookup(key)
            if entry is None:
                entry = self.cache.reserve(key, keep, allow_protected=True)
                if entry is None:  # every slot is being read into or used: wait for a read to end
                    self.reads.wait_any()
                    continue
                self.reads.submit(entry, demand=True)
            break
        self._stats.hits += entry is cached
        entry.pins += 1
        self.reads.needed_now(entry)  # a queued guess goes first
        self.reads.wait(entry)
        self._stats.stall_seconds += time.perf_counter() - t0
        if entry.error is not None:
            entry.pins -= 1
            self.cache.remove(entry)
            raise entry.error
        if entry.prefetched:
            entry.prefetched = False
            self._stats.num_prefetches_used += 1
        self.policy.on_access(key)
        return entry

    # -- accounting and shutdown ----------------------------------------------------------------------

    def stats(self) -> ExpertStats:
        s = self._stats
        reads = [f.stats for f in self.reads.files.values()]
        s.bytes_read = sum(r.bytes_read for r in reads)
        s.num_reads = sum(r.num_reads for r in reads)
        s.read_seconds = sum(r.read_seconds for r in reads)
        s.num_evictions = self.cache.num_evictions
        s.max_slots_used = self.cache.max_slots_used
        if self.prefetcher is not None:
            return ExpertStats(**{**vars(s), **vars(self.prefetcher.stats)})
        return ExpertStats(**vars(s))

    def reset_stats(self) -> None:
        """Zero the counters (after the planner's probe, so they describe serving only)."""
        self._stats = ExpertStats(num_slots=self._stats.num_slots, cache_nbytes=self._stats.cache_nbytes,
                                  budget_nbytes=self._stats.budget_nbytes, io_mode=self._stats.io_mode)
        self.cache.num_evictions = self.cache.max_slots_used = 0
        for f in self.reads.files.values():
            f.stats = type(f.stats)()
        if self.prefetcher is not None:
            self.prefetcher.reset_stats()

    def empty(self) -> None:
        """Wait for reads in flight and drop every cached expert (all slots free again), and pending guesses."""
        if self.prefetcher is not None:
            self.prefetcher.clear()
        self.reads.drain()
        self.cache.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.empty()
        self.reads.close()
        self.slots.clear()  # views keep the slab alive
        self.cache.release_slab()
        if self.prefetcher is not None:
            self.prefetcher.close()


class StoreExperts(nn.Module):
    """One MoE layer's experts, served by an ExpertStore (implements models.layers.mlp.ExpertWeights)."""

    def __init__(self, store: ExpertStore, layer: int) -> None:
        super().__init__()
        self.store = store
        self.layer = layer

    def weights(self, expert_ids: Sequence[int]) -> Iterator[tuple[int, Weight, Weight]]:
        return self.store.weights(self.layer, expert_ids)
