"""ExpertStore: experts read from an expert store folder on demand into a RAM cache under a byte budget,
with prediction-driven prefetch (reads themselves: ferry.experts.reads). Each MoE layer gets a `StoreExperts`
(the models' ExpertWeights protocol), so model code does not know experts live on disk.

One layer call, for the experts its tokens routed to:
  1. reads start for the first READ_AHEAD missing experts of this layer that get a slot without evicting one
     this layer still needs (demand: first in the I/O queue);
  2. the predictor learns from this routing and guesses the next MoE layers' experts. Guesses are read while
     the disk has little else to do: at most GUESSES_QUEUED per reader thread queued or in flight, behind any
     demand read, each reserving its slot (a free one, or one of an expert the running layer is done with: a
     whole forward from its next use) only when submitted, so a guess never evicts an expert that may be
     needed sooner;
  3. experts are handed out one at a time, those already in RAM first, so the forward computes with them
     while the others are read (it sums the results in expert order, so tokens match the resident path
     exactly); each is pinned while in use, and more reads start as it is handed out. The forward waits
     (stall time) only when no expert it still needs has been read;
  4. predictors that read the residual stream guess again once the layer is done (after_layer); the newer
     guesses replace the pending ones."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ferry.config import ModelConfig
from ferry.errors import InvalidRequest, ModelLoadError
from ferry.experts.cache import Entry, ExpertCache
from ferry.experts.confidence import ConfidenceGate
from ferry.experts.layout import StoreIndex
from ferry.experts.policies import EvictionPolicy, Key
from ferry.experts.predictors import ExpertPredictor
from ferry.experts.reads import ExpertReads
from ferry.experts.stats import ExpertStats
from ferry.ops.quant import QuantLinear

# most demand reads of one layer call started ahead of the forward (read or being read, not yet computed with):
# enough to keep the reader threads busy, few enough that a layer needing more experts than the cache holds streams
# them through a few slots and leaves the rest of the cache to other layers' experts (reused next step), instead
# of evicting them all at its start (a cyclic scan, where every cached expert is gone before its next use)
READ_AHEAD = 3
# most guessed reads queued or in flight per reader thread: the disk stays busy through a layer's attention, and
# guesses hold few slots before they are read
GUESSES_QUEUED = 2


class ExpertStore:
    def __init__(self, folder: str | os.PathLike, cfg: ModelConfig, dtype: torch.dtype, budget_bytes: int | None,
                 policy: EvictionPolicy, predictor: ExpertPredictor, allow_direct: bool = True,
                 num_io_threads: int = 2) -> None:
        self.folder = Path(folder)
        self.index = StoreIndex.load(folder)
        self.layout = self.index.layout
        self._check_model(cfg, dtype)
        self.dtype = dtype  # the engine's: what the experts compute in
        self._init_cache(budget_bytes, dtype, policy)
        # a few reads in flight at once: one small read at a time leaves an SSD's queue mostly empty
        self.reads = ExpertReads(self.folder, self.index, self.cache, allow_direct, num_io_threads)
        self._stats.io_mode = self.reads.io_mode
        self.policy = policy
        self.predictor = predictor
        self._predicted: dict[int, set[int]] = {}  # MoE layer -> experts predicted for its next call (and read)
        self._guesses: dict[int, dict[int, tuple[float, int]]] = {}  # every guess: expert -> (probability, distance)
        self._layer_keys: set[Key] = set()  # the experts of the layer running now
        self._done_with: set[Key] = set()  # those of them it has computed with
        self._guesses_pending: list[tuple[Key, float]] = []  # guesses not read yet, in order: (key, probability)
        self.confidence = ConfidenceGate()
        self.prefetch_width: int | None = None  # most guessed experts read ahead per layer (None: all; the planner's)
        self.prefetch_depth = 1  # MoE layers ahead to read guessed experts for (the planner's)
        self._closed = False

    # -- setup ------------------------------------------------------------------------------------

    def _init_cache(self, budget_bytes: int | None, dtype: torch.dtype, policy: EvictionPolicy) -> None:
        slot_nbytes = self.index.slot_nbytes
        quantized = any(r.bits for recs in self.index.experts.values() for r in recs)
        # bfloat16 runs quantized experts in place (fused kernels); other dtypes dequantize them into one
        # scratch pair, paid from the budget too
        self._fused = dtype == torch.bfloat16
        scratch = quantized and not self._fused
        self._scratch = (torch.empty(self.layout.gate_up_shape, dtype=dtype),
                         torch.empty(self.layout.down_shape, dtype=dtype)) if scratch else None
        scratch_nbytes = sum(t.nbytes for t in self._scratch) if scratch else 0
        total = len(self.index.layer_files) * self.index.num_experts * slot_nbytes + scratch_nbytes
        budget = total if budget_bytes is None else budget_bytes
        self.cache = ExpertCache(max(budget - scratch_nbytes, 0), slot_nbytes, policy)
        self._weights: dict[tuple[int, int], tuple] = {}  # (slot, bits) -> _unpack's views over the slot
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

    def weights(self, layer: int, expert_ids: Sequence[int], x: torch.Tensor,
                top_ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        keys = [(layer, int(e)) for e in expert_ids]
        self.reads.collect()
        cached = {k: self.cache.lookup(k) for k in keys}  # a hit if the same entry is still there when asked for
        self._stats.lookups += len(keys)
        self._layer_keys, self._done_with = set(keys), set()  # none of them can make room for guesses yet
        for entry in cached.values():  # guesses still queued are needed now: ahead of the other guesses
            if entry is not None:
                self.reads.needed_now(entry)
        reading = self._start_reads(keys, READ_AHEAD)  # the disk first: before any bookkeeping
        self._score_prediction(layer, set(k[1] for k in keys))
        self.predictor.observe(layer, x, top_ids)
        ahead = self.predictor.predict_ahead(layer, x, top_ids, self.prefetch_depth) if self.prefetch_width != 0 else {}
        guessed, probs = self._choose(layer, ahead)
        self.policy.on_layer(layer, {(t, e): p for t, guess in ahead.items() for e, p in guess.items()})
        self._guess(guessed, probs)
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
                self._done_with.add(keys[pos])  # a whole forward from its next use: guesses may take its slot
                self._read_guesses()

    def after_layer(self, layer: int, stream: torch.Tensor) -> None:
        """`layer` is done and its output added to the residual stream [T, D]: predictors that read the stream
        guess the next layers' experts now; their reads may take free slots or this layer's (a whole forward
        from their next use)."""
        if self.prefetch_width == 0 or not self.predictor.needs_stream:
            return
        ahead = self.predictor.predict_after(layer, stream, self.prefetch_depth)
        guessed, probs = self._choose(layer, ahead)
        self.policy.on_hints({(t, e): p for t, guess in ahead.items() for e, p in guess.items()})
        self._guess(guessed, probs)

    def _choose(self, layer: int, ahead: dict[int, dict[int, float]]) -> tuple[list[Key], dict[Key, float]]:
        """The guesses to read, nearest layer first, then likeliest first: at most prefetch_width per layer,
        and only those the confidence gate admits. Every guess is kept for scoring once its layer routes."""
        guessed, probs = [], {}
        pos = self.predictor.moe_layers.index(layer)
        for target, guess in ahead.items():
            distance = self.predictor.moe_layers.index(target) - pos
            ranked = sorted(guess.items(), key=lambda kv: -kv[1])
            chosen = [e for e, p in ranked if self.confidence.keep(p, distance)][:self.prefetch_width]
            self._predicted[target] = set(chosen)  # a nearer layer's later guess replaces this one
            self._guesses[target] = {e: (p, distance) for e, p in ranked}
            guessed += [(target, e) for e in chosen]
            probs.update({(target, e): guess[e] for e in chosen})
        return guessed, probs

    def _guess(self, guessed: list[Key], probs: dict[Key, float]) -> None:
        """The experts to prefetch, in order, replacing older guesses (a newer guess sees more). They are read
        while the disk has little else to do (_read_guesses), each reserving its slot only when its read is
        submitted."""
        self._guesses_pending = [(k, probs[k]) for k in guessed]
        self._read_guesses()

    def _read_guesses(self) -> None:
        """Submit pending guesses while fewer than GUESSES_QUEUED reads per reader thread are queued or in
        flight. Demand reads go ahead of them in the pool's queue."""
        while self._guesses_pending and self.reads.pending() < GUESSES_QUEUED * self.reads.num_threads:
            entry = self._next_guess()
            if entry is None:
                return
            self.reads.submit(entry, demand=False)

    def _next_guess(self) -> Entry | None:
        """The next pending guess not cached, in a free slot or the slot of an expert the running layer is done
        with, if the policy admits it over that expert (a guess never displaces one that may be needed sooner).
        None when there is none, or no slot for it now."""
        protect = {k for k, _ in self._guesses_pending} | (self._layer_keys - self._done_with)
        while self._guesses_pending:
            key, p = self._guesses_pending[0]
            if self.cache.lookup(key) is not None:
                self._guesses_pending.pop(0)
                continue
            entry = self.cache.reserve(key, protect, allow_protected=False, only=self._done_with,
                                       admit=lambda victim: self.policy.admit(key, p, victim))
            if entry is None:
                return None
            self._guesses_pending.pop(0)
            entry.prefetched = True
            self._stats.num_prefetches += 1
            return entry
        return None

    def _unpack(self, key: Key, slot: int) -> tuple[torch.Tensor | QuantLinear, torch.Tensor | QuantLinear]:
        """(gate_up, down) of a read expert: views into its slot (dense), fused-kernel linears over its slot
        (quantized, bfloat16), or dequantized into the scratch pair (quantized, other dtypes)."""
        bits = self.index.experts[key[0]][key[1]].bits
        if bits and not self._fused:
            return self.layout.record_format(bits).unpack(self.cache.slot(slot), *self._scratch)
        if (slot, bits) not in self._weights:  # views of a slot's bytes: made once, valid whatever it holds
            mem = self.cache.slot(slot)
            self._weights[(slot, bits)] = self.layout.record_format(bits).weights(mem) if bits else \
                self.layout.views(mem)
        return self._weights[(slot, bits)]

    def _is_ready(self, key: Key) -> bool:
        entry = self.cache.lookup(key)
        return entry is not None and entry.done and entry.error is None

    def _score_prediction(self, layer: int, used: set[int]) -> None:
        if type(self.predictor) is ExpertPredictor or self.prefetch_width == 0 or layer == self.predictor.moe_layers[0]:
            return  # no prediction, or the first MoE layer (no layer before it in this forward to predict from)
        predicted = self._predicted.pop(layer, set())
        for e, (p, distance) in self._guesses.pop(layer, {}).items():
            self.confidence.record(p, distance, e in used)
        self._stats.num_needed += len(used)
        self._stats.num_predicted += len(predicted)
        self._stats.num_predicted_used += len(predicted & used)

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
        return ExpertStats(**vars(s))

    def reset_stats(self) -> None:
        """Zero the counters (after the planner's probe, so they describe serving only)."""
        self._stats = ExpertStats(num_slots=self._stats.num_slots, cache_nbytes=self._stats.cache_nbytes,
                                  budget_nbytes=self._stats.budget_nbytes, io_mode=self._stats.io_mode)
        self.cache.num_evictions = self.cache.max_slots_used = 0
        for f in self.reads.files.values():
            f.stats = type(f.stats)()

    def empty(self) -> None:
        """Wait for reads in flight and drop every cached expert (all slots free again)."""
        self._guesses_pending.clear()
        self.reads.drain()
        self.cache.clear()
        self._predicted.clear()
        self._guesses.clear()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.empty()
        self.reads.close()
        self._weights.clear()  # views keep the slab alive
        self.cache.release_slab()
        self.predictor.close()


class StoreExperts(nn.Module):
    """One MoE layer's experts, served by an ExpertStore (implements models.layers.mlp.ExpertWeights)."""

    def __init__(self, store: ExpertStore, layer: int) -> None:
        super().__init__()
        self.store = store
        self.layer = layer

    def weights(self, expert_ids: Sequence[int], x: torch.Tensor,
                top_ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        return self.store.weights(self.layer, expert_ids, x, top_ids)
