"""Feed-forward blocks: the dense SwiGLU MLP and the routed mixture of experts.

Legend: T tokens, D hidden, I intermediate, E experts, A experts per token (top-k)."""
from __future__ import annotations

import itertools
from typing import Iterable, Protocol, Sequence

import torch
from torch import nn

from ferry.config import MoEConfig
from ferry.models.layers.linear import Weight, linear
from ferry.models.routing import RoutingObservers
from ferry.models.scopes import scope
from ferry.ops.fused import silu_mul


def _meta(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class DenseMLP(nn.Module):
    """SwiGLU with gate and up fused into one [2I, D] weight (one matmul instead of two)."""

    def __init__(self, hidden: int, inter: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_up = _meta(2 * inter, hidden)
        self.down = _meta(hidden, inter)
        self.gate_up_bias = _meta(2 * inter) if bias else None
        self.down_bias = _meta(hidden) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_up, self.down, self.gate_up_bias, self.down_bias)


def swiglu(x: torch.Tensor, gate_up: Weight, down: Weight,
           gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
    with scope("gate_up"):
        h = linear(x, gate_up, gate_up_bias)  # [T, 2I]
    with scope("act"):
        h = silu_mul(h)  # [T, I]
    with scope("down"):
        return linear(h, down, down_bias)  # [T, D]


class ExpertWeights(Protocol):
    """Where a MoE layer gets its experts' weights: resident tensors, or an offloading store. Weights only:
    a store that predicts later layers' experts learns the routing through the model's routing port."""

    def weights(self, expert_ids: Sequence[int]) -> Iterable[tuple[int, Weight, Weight]]:
        """(i, gate_up [2I, D], down [D, I]) once for each position i of expert_ids, in the order the weights
        are at hand (an offloading store hands out cached experts while it reads the others). The layer calls
        this before telling routing observers, so a store may start reading the missing experts in the call
        itself; it yields lazily (a pair may be valid only until the next is asked for): iterate to the end."""
        ...


class ResidentExperts(nn.Module):
    """All experts of one layer in memory, stacked: gate_up [E, 2I, D], down [E, D, I] (quantized: a list of E
    QuantLinear each, put in place by ferry.quant.model.install)."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up = _meta(num_experts, 2 * inter, hidden)
        self.down = _meta(num_experts, hidden, inter)

    def weights(self, expert_ids: Sequence[int]) -> list[tuple[int, Weight, Weight]]:
        return [(i, self.gate_up[e], self.down[e]) for i, e in enumerate(expert_ids)]


class MoE(nn.Module):
    """Softmax router -> top-A experts -> weighted sum; plus qwen2_moe's gated shared expert."""

    def __init__(self, cfg: MoEConfig, hidden: int, layer: int, observers: RoutingObservers) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer  # decoder layer index: how observers name this layer
        self.observers = observers  # the model's routing port (ferry.models.routing)
        self.router = _meta(cfg.num_experts, hidden)
        self.experts: ExpertWeights = ResidentExperts(cfg.num_experts, hidden, cfg.intermediate_size)
        self.shared = DenseMLP(hidden, cfg.shared_intermediate_size) if cfg.shared_intermediate_size else None
        self.shared_gate = _meta(1, hidden) if cfg.shared_intermediate_size else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-A expert ids [T, A] and their weights [T, A] (in x's dtype)."""
        probs = torch.softmax(linear(x, self.router).float(), dim=-1)  # [T, E]
        top_w, top_ids = torch.topk(probs, self.cfg.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_ids, top_w.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with scope("router"):
            top_ids, top_w = self.route(x)
        with scope("experts"):  # the routed experts and the shared one (their gate_up/act/down scopes count here)
            return self._experts(x, top_ids, top_w)

    def _experts(self, x: torch.Tensor, top_ids: torch.Tensor, top_w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        flat = top_ids.flatten()  # [T*A]
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.cfg.num_experts).tolist()
        active = [e for e, c in enumerate(counts) if c]
        tokens = order // self.cfg.top_k  # token row of each (token, slot) pair, grouped by expert
        weights = top_w.flatten()[order]
        ends = list(itertools.accumulate(counts[e] for e in active))
        spans = [slice(end - counts[e], end) for e, end in zip(active, ends)]  # each expert's (token, slot) pairs
        done: dict[int, torch.Tensor] = {}  # computed out of order, not yet summed
        summed = 0
        pairs = self.experts.weights(active)  # first: an offloading store starts reading missing experts now
        self.observers.routed(self.layer, x, top_ids, top_w)
        for i, gate_up, down in pairs:
            done[i] = swiglu(x[tokens[spans[i]]], gate_up, down) * weights[spans[i], None]
            while summed in done:  # sum in expert order whatever the compute order: the same bits every time
                out.index_add_(0, tokens[spans[summed]], done.pop(summed))
                summed += 1
        if self.shared is not None:
            out += torch.sigmoid(linear(x, self.shared_gate)) * self.shared(x)
        return out
