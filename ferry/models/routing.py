"""The routing port: how code outside the model sees what its MoE layers do, without hooks or monkeypatches.

A model owns one `RoutingObservers`; its MoE layers report each routing decision to it (`routed`), and the
decoder reports the residual stream after each MoE layer (`layer_done`), only when an observer asks for it
(`wants_stream`: building it costs one [T, D] add per MoE layer). Observers: the expert prefetcher
(ferry.experts.prefetch), the eval recorder (ferry.eval.suite), any metrics. An observer must not change the
tensors it is given; they are the forward's own.

Order within one MoE layer call: the layer asks its ExpertWeights for its experts first (an offloading store
starts its demand reads then, so the disk serves them before any guess), then observers get `routed`, then
the experts compute; `layer_done` follows once the layer's output is known. One forward at a time.
Legend: T tokens, D hidden, A experts per token (top-k)."""
from __future__ import annotations

from typing import Protocol

import torch


class RoutingObserver(Protocol):
    """Something that watches MoE routing. `wants_stream` may change between forwards (read at each layer)."""

    wants_stream: bool

    def routed(self, layer: int, x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor) -> None:
        """MoE layer `layer` (decoder layer index) routed its input x [T, D]: experts top_ids [T, A] with
        weights top_w [T, A]."""
        ...

    def layer_done(self, layer: int, stream: torch.Tensor) -> None:
        """MoE layer `layer` is done: stream [T, D] is the residual stream with its output added (the next
        layer's input before that layer's attention). Only called when wants_stream."""
        ...


class RoutingObservers:
    """The model's fan-out to every observer added, in the order added."""

    def __init__(self) -> None:
        self.observers: list[RoutingObserver] = []

    def add(self, observer: RoutingObserver) -> None:
        self.observers.append(observer)

    def remove(self, observer: RoutingObserver) -> None:
        self.observers.remove(observer)

    @property
    def wants_stream(self) -> bool:
        return any(o.wants_stream for o in self.observers)

    def routed(self, layer: int, x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor) -> None:
        for o in self.observers:
            o.routed(layer, x, top_ids, top_w)

    def layer_done(self, layer: int, residual: torch.Tensor, out: torch.Tensor) -> None:
        """residual [T, D] (attention output already added) + the MoE output out [T, D], built only if wanted."""
        if not self.observers or not self.wants_stream:
            return
        stream = residual + out
        for o in self.observers:
            if o.wants_stream:
                o.layer_done(layer, stream)
