"""The prefetcher: guesses which experts the next MoE layers will route to and reads them into the store's
cache while the disk has little else to do. It owns the predictor, the confidence gate and the guess queue;
it learns the routing as a routing observer of the model (ferry.models.routing), never from the store.

Per MoE layer call (the store has already started that layer's demand reads):
  1. `routed`: the guesses made for this layer are scored against what it routed (precision / recall, and the
     confidence gate's bins); the predictor learns from the routing and guesses the next MoE layers' experts;
     those the gate admits (at most `width` per layer, for up to `depth` layers ahead) replace the pending
     guesses, and the eviction policy gets them as hints;
  2. guesses are read behind any demand read: at most GUESSES_QUEUED per reader thread queued or in flight,
     each reserving its slot (a free one, or one of an expert the running layer is done with: a whole forward
     from its next use) only when submitted, so a guess never evicts an expert that may be needed sooner. The
     store calls `read_guesses` each time it is done with an expert;
  3. `layer_done`: predictors that read the residual stream (pre-gating) guess again once the layer's output
     is added to it; the newer guesses replace the pending ones.
Legend: T tokens, D hidden, A experts per token."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ferry.experts.cache import Entry
from ferry.experts.confidence import ConfidenceGate
from ferry.experts.policies import Key
from ferry.experts.predictors import ExpertPredictor, PreGatePredictor
from ferry.experts.stats import PrefetchStats
from ferry.experts.store import ExpertStore

# most guessed reads queued or in flight per reader thread: the disk stays busy through a layer's attention, and
# guesses hold few slots before they are read
GUESSES_QUEUED = 2


class Prefetcher:
    """Prefetches for `store` (and attaches itself to it: the store hands it the disk when it has room).
    width: most guessed experts read per layer (None: all the gate admits; 0: none); depth: MoE layers ahead.
    Both are the planner's (ferry.experts.planner)."""

    def __init__(self, store: ExpertStore, predictor: ExpertPredictor, width: int | None = None,
                 depth: int = 1, choices: Sequence[ExpertPredictor] = ()) -> None:
        self.store = store
        self.predictor = predictor
        self.choices = list(dict.fromkeys([predictor, *choices]))  # the predictors `use` may switch to
        self.width = width
        self.depth = depth
        self._gates = {p: ConfidenceGate() for p in self.choices}  # each predictor's probabilities measured apart
        self.confidence = self._gates[predictor]
        self.stats = PrefetchStats()
        self._predicted: dict[int, set[int]] = {}  # MoE layer -> experts predicted for its next call (and read)
        self._guesses: dict[int, dict[int, tuple[float, int]]] = {}  # every guess: expert -> (probability, distance)
        self._pending: list[tuple[Key, float]] = []  # guesses not read yet, in order: (key, probability)
        store.prefetcher = self

    def bind(self, model: nn.Module) -> None:
        """Watch `model`'s routing, and give the predictor what it reads from the loaded model: the MoE
        layers' routers and their input norms (pre-gating)."""
        layers = sorted(self.store.index.layer_files)
        for predictor in self.choices:
            if isinstance(predictor, PreGatePredictor):
                predictor.set_routers({l: model.layers[l].mlp.router for l in layers},
                                      {l: (model.layers[l].post_attn_norm.weight, model.layers[l].post_attn_norm.eps)
                                       for l in layers})
        model.routing.add(self)

    def use(self, predictor: ExpertPredictor) -> None:
        """Guess with `predictor` (one of choices) from the next forward on (--expert-prefetch auto switches
        between steps, ferry/experts/tuner.py). The old one's pending guesses and unscored predictions go, and
        the eviction policy forgets its hints; reads in flight land as usual."""
        if predictor not in self._gates:
            raise ValueError(f"{type(predictor).__name__} is not one of this prefetcher's choices")
        if predictor is self.predictor:
            return
        self.clear()
        self.store.policy.on_hints({})
        self.predictor, self.confidence = predictor, self._gates[predictor]

    # -- the routing port (ferry.models.routing.RoutingObserver) ------------------------------------

    @property
    def wants_stream(self) -> bool:
        return self.width != 0 and self.predictor.needs_stream

    def routed(self, layer: int, x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor) -> None:
        """MoE layer `layer` routed its input x [T, D] to top_ids [T, A]: score, learn, guess ahead."""
        self._score(layer, set(top_ids.flatten().tolist()))
        self.predictor.observe(layer, x, top_ids)
        ahead = self.predictor.predict_ahead(layer, x, top_ids, self.depth) if self.width != 0 else {}
        guessed, probs = self._choose(layer, ahead)
        hints = {(t, e): p for t, guess in ahead.items() for e, p in guess.items()}
        if hints:  # else the hints made from the stream after the previous layer still stand
            self.store.policy.on_hints(hints)
        self._guess(guessed, probs)

    def layer_done(self, layer: int, stream: torch.Tensor) -> None:
        """`layer` is done and its output added to the residual stream [T, D]: predictors that read the stream
        guess the next layers' experts now; their reads may take free slots or this layer's (a whole forward
        from their next use)."""
        ahead = self.predictor.predict_after(layer, stream, self.depth)
        guessed, probs = self._choose(layer, ahead)
        self.store.policy.on_hints({(t, e): p for t, guess in ahead.items() for e, p in guess.items()})
        self._guess(guessed, probs)

    # -- guesses ------------------------------------------------------------------------------------

    def _choose(self, layer: int, ahead: dict[int, dict[int, float]]) -> tuple[list[Key], dict[Key, float]]:
        """The guesses to read, nearest layer first, then likeliest first: at most width per layer, and only
        those the confidence gate admits. Every guess is kept for scoring once its layer routes."""
        guessed, probs = [], {}
        pos = self.predictor.moe_layers.index(layer)
        for target, guess in ahead.items():
            distance = self.predictor.moe_layers.index(target) - pos
            ranked = sorted(guess.items(), key=lambda kv: -kv[1])
            chosen = [e for e, p in ranked if self.confidence.keep(p, distance)][:self.width]
            self._predicted[target] = set(chosen)  # a nearer layer's later guess replaces this one
            self._guesses[target] = {e: (p, distance) for e, p in ranked}
            guessed += [(target, e) for e in chosen]
            probs.update({(target, e): guess[e] for e in chosen})
        return guessed, probs

    def _guess(self, guessed: list[Key], probs: dict[Key, float]) -> None:
        """The experts to prefetch, in order, replacing older guesses (a newer guess sees more)."""
        self._pending = [(k, probs[k]) for k in guessed]
        self.read_guesses()

    def read_guesses(self) -> None:
        """Submit pending guesses while fewer than GUESSES_QUEUED reads per reader thread are queued or in
        flight. Demand reads go ahead of them in the pool's queue."""
        reads = self.store.reads
        while self._pending and reads.pending() < GUESSES_QUEUED * reads.num_threads:
            entry = self._next_guess()
            if entry is None:
                return
            reads.submit(entry, demand=False)

    def _next_guess(self) -> Entry | None:
        """The next pending guess not cached, in a free slot or the slot of an expert the running layer is done
        with, if the policy admits it over that expert (a guess never displaces one that may be needed sooner).
        None when there is none, or no slot for it now."""
        store = self.store
        protect = {k for k, _ in self._pending} | (store.layer_keys - store.done_with)
        while self._pending:
            key, p = self._pending[0]
            if store.cache.lookup(key) is not None:
                self._pending.pop(0)
                continue
            entry = store.cache.reserve(key, protect, allow_protected=False, only=store.done_with,
                                        admit=lambda victim: store.policy.admit(key, p, victim))
            if entry is None:
                return None
            self._pending.pop(0)
            entry.prefetched = True
            self.stats.num_prefetches += 1
            return entry
        return None

    def _score(self, layer: int, used: set[int]) -> None:
        """The guesses made for `layer` against the experts it routed to."""
        if type(self.predictor) is ExpertPredictor or self.width == 0 or layer == self.predictor.moe_layers[0]:
            return  # no prediction, or the first MoE layer (no layer before it in this forward to predict from)
        predicted = self._predicted.pop(layer, set())
        for e, (p, distance) in self._guesses.pop(layer, {}).items():
            self.confidence.record(p, distance, e in used)
        self.stats.num_needed += len(used)
        self.stats.num_predicted += len(predicted)
        self.stats.num_predicted_used += len(predicted & used)

    # -- the store's calls ----------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget pending guesses and the predictions awaiting their layer (the store empties its cache)."""
        self._pending.clear()
        self._predicted.clear()
        self._guesses.clear()

    def reset_stats(self) -> None:
        self.stats = PrefetchStats()

    def close(self) -> None:
        """The store closes: the predictors may save what they learned."""
        for predictor in self.choices:
            predictor.close()
