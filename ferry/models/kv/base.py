"""The KV policy interface, tensor side: the block tensors a policy keeps and how each layer reads them.

The model's attention layer calls `layer_kv.attend(q, k, v, meta, scale, window)` and knows nothing else: the
policy writes this step's K/V the way it stores them (plain, quantized, ...) and returns the attention output
over whatever part of each request's context it decides a query reads. The runner calls `swap_out` / `swap_in`
with the plan's block copies (preemption, and blocks a policy moved to the slow tier) before the forward.
The scheduler-side half of each policy is ferry/kvcache/policies/<name>.py.
A policy that prunes tokens between layers (`lazy`) sets `changes_rows` on a layer: after that layer the decoder
hands it the next layer's input and applies the `RowChange` it returns (which rows go on, which come back).
Legend: T tokens in the step, H query heads, K kv heads, Dh head dim, D hidden size.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from ferry.kvcache.storage import KVStorage
from ferry.models.layers.attention import AttnMetadata


@dataclass
class RowChange:
    """The rows the next layers compute, when a KV policy drops or brings back tokens between layers."""

    keep: torch.Tensor  # [T'] long: current rows that go on, in this order (every row whose logits are needed)
    revived: torch.Tensor | None  # [A, D] next-layer inputs of tokens brought back, appended after the kept rows
    meta: AttnMetadata  # the next layers' metadata for those T' + A rows (positions, slots, the policy's state)


class LayerKV(ABC):
    changes_rows: bool = False  # True: the decoder calls next_rows after this layer

    def next_rows(self, x: torch.Tensor, meta: AttnMetadata, needed: torch.Tensor,
                  peek: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> RowChange | None:
        """x [T, D]: the next layer's input for the current rows; needed [T] bool: rows whose logits are asked for
        (they must be kept); peek(): the next layer's queries (scaled) [T, H, Dh] and keys [T, K, Dh] for x, if the
        policy ranks rows by that layer's attention. None: every row goes on unchanged."""
        return None

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttnMetadata, scale: float,
               window: int | None) -> torch.Tensor:
        """q [T, H, Dh], k/v [T, K, Dh] of this step: store k/v at meta.slot_mapping, return [T, H*Dh] in q's
        dtype."""


class PolicyKV(ABC):
    """Owns every layer's KV tensors, in both tiers. Allocated once from the byte budgets, never grown."""

    layers: list[LayerKV]

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Fast-tier bytes held (KV blocks plus any index or scales): what --kv-cache-memory pays for."""

    @property
    @abstractmethod
    def host_nbytes(self) -> int:
        """Slow-tier bytes held (swap space, offloaded spans)."""

    @abstractmethod
    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy device blocks to host blocks: (device, host) pairs."""

    @abstractmethod
    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy host blocks to device blocks: (host, device) pairs."""

    def bind_model(self, model: torch.nn.Module) -> None:
        """Called once with the loaded model, before any step: a policy that derives state from the weights (shadow's
        key basis) takes it here. Default: nothing."""


class StorageKV(PolicyKV):
    """A policy whose K/V live in one plain KVStorage (ferry/kvcache/storage.py), plus whatever it adds."""

    storage: KVStorage

    @property
    def nbytes(self) -> int:
        return self.storage.nbytes

    @property
    def host_nbytes(self) -> int:
        return self.storage.host_nbytes

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        self.storage.swap_out(pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        self.storage.swap_in(pairs)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, bs, K, Dh], block_ids [..., n] -> [..., n * bs, K, Dh] (a copy)."""
    return cache[block_ids].flatten(-4, -3)
