"""Which experts the next MoE layer will route to, guessed while the current one runs.

A predictor sees every MoE layer's input and routing (`observe`) and returns, for the next MoE layer,
a probability per expert it expects (`predict`); the prefetcher (prefetch.py) reads the likeliest ones.
Legend: T tokens, D hidden, E experts, A experts per token."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ferry.errors import InvalidRequest


class ExpertPredictor:
    """Base: predicts nothing (on-demand loading only)."""

    name = "none"  # the --expert-prefetch value

    def __init__(self, moe_layers: Sequence[int], num_experts: int, top_k: int) -> None:
        self.moe_layers = list(moe_layers)
        self.next_layer = dict(zip(self.moe_layers, self.moe_layers[1:] + self.moe_layers[:1]))
        self.num_experts = num_experts
        self.top_k = top_k

    def observe(self, layer: int, x: torch.Tensor, top_ids: torch.Tensor) -> None:
        """layer's input x [T, D] and its routing top_ids [T, A]."""

    def predict(self, layer: int, x: torch.Tensor, top_ids: torch.Tensor) -> dict[int, float]:
        """expert -> probability of use at the MoE layer after `layer`, from layer's input and routing."""
        return {}

    def predict_ahead(self, layer: int, x: torch.Tensor, top_ids: torch.Tensor,
                      depth: int) -> dict[int, dict[int, float]]:
        """MoE layer -> (expert -> probability), for up to `depth` MoE layers after `layer` in this forward,
        nearest first, made when `layer` starts. Here: the next layer only."""
        guess = self.predict(layer, x, top_ids)
        return {self.next_layer[layer]: guess} if guess else {}

    def predict_after(self, layer: int, stream: torch.Tensor, depth: int) -> dict[int, dict[int, float]]:
        """As predict_ahead, made once `layer` is done, from its output added to the residual stream [T, D]
        (the next layer's input, but for that layer's attention). Only predictors with needs_stream get it."""
        return {}

    needs_stream = False

    def close(self) -> None:
        """The engine shuts down (a learned predictor may save what it learned)."""


def _union_probs(scores: torch.Tensor, top_k: int) -> dict[int, float]:
    """scores [T, E] (a distribution per token) -> P(expert used by at least one token), over each token's
    top-A guesses (a guess's chance: A x its score, at most 1)."""
    w, ids = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1)  # [T, A]
    unused = torch.ones_like(scores).scatter_(1, ids, (1 - w * top_k).clamp_(min=0))  # P(a token skips e)
    return {e: p for e, p in enumerate((1 - unused.prod(dim=0)).tolist()) if p > 0}


class CorrelationPredictor(ExpertPredictor):
    """Co-activation counts between layer l's and the next MoE layer's experts, learned online:
    counts[l][a, b] = tokens routed to a at l and to b at the next layer. A token's guess for the next layer
    is the count row-sum of its current experts, normalized; learned statistics can be saved as JSON."""

    name = "correlation"

    def __init__(self, moe_layers: Sequence[int], num_experts: int, top_k: int) -> None:
        super().__init__(moe_layers, num_experts, top_k)
        self.counts = {l: torch.zeros(num_experts, num_experts, dtype=torch.float64) for l in self.moe_layers}
        self._prev: tuple[int, torch.Tensor] | None = None  # (layer, one-hot routing [T, E]) of the last layer seen
        self.path: Path | None = None  # where the statistics persist between runs (persist_to)

    def persist_to(self, path: str | Path) -> None:
        """Start from the statistics saved at path (if any), and save them there at close()."""
        self.path = Path(path)
        if self.path.exists():
            self.load(self.path)

    def close(self) -> None:
        if self.path is not None:
            self.save(self.path)

    def _one_hot(self, top_ids: torch.Tensor) -> torch.Tensor:
        oh = torch.zeros(top_ids.shape[0], self.num_experts, dtype=torch.float64)
        return oh.scatter_(1, top_ids.long(), 1.0)

    def observe(self, layer: int, x: torch.Tensor, top_ids: torch.Tensor) -> None:
        cur = self._one_hot(top_ids)
        if self._prev is not None:
            prev_layer, prev = self._prev
            if self.next_layer.get(prev_layer) == layer and prev.shape[0] == cur.shape[0] and layer != self.moe_layers[0]:
                self.counts[prev_layer] += prev.T @ cur  # [E, T] @ [T, E]
        self._prev = (layer, cur)

    def predict(self, layer: int, x: torch.Tensor, top_ids: torch.Tensor) -> dict[int, float]:
        if layer == self.moe_layers[-1]:
            return {}  # the next MoE layer belongs to the next forward: other tokens
        rows = self._one_hot(top_ids) @ self.counts[layer]  # [T, E]
        total = rows.sum(-1, keepdim=True)
        if not bool((total > 0).any()):
            return {}  # nothing learned yet: no guess rather than a random one
        return _union_probs(rows / total.clamp(min=1), self.top_k)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"num_experts": self.num_experts, "moe_layers": self.moe_layers,
                                          "counts": {str(l): c.tolist() for l, c in self.counts.items()}}))

    def load(self, path: str | Path) -> None:
        try:
            d = json.loads(Path(path).read_text())
            if d["num_experts"] != self.num_experts or d["moe_layers"] != self.moe_layers:
                raise InvalidRequest(f"{path} holds statistics of another model ({d['num_experts']} experts, "
                                     f"MoE layers {d['moe_layers']}); this one has {self.num_experts}, {self.moe_layers}")
            self.counts = {int(l): torch.tensor(c, dtype=torch.float64) for l, c in d["counts"].items()}
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InvalidRequest):
                raise
            raise InvalidRequest(f"{path} is not a saved correlation table ({type(e).__name__}: {e})") from None


class PreGatePredictor(ExpertPredictor):
    """Apply the next MoE layers' routers to the residual stream as soon as this layer's output is added to it
    (Read-ME's pre-gating, SmallThinker's pre-attention router), normalized as each of those layers will
    (its post-attention RMSNorm): the next layer's router input differs from it only by that layer's attention.
    On ferry-tiny-moe (as of commit 0bfb0b4) this is right for 72% of top-2 guesses at batch 1; the layer's own
    input (before its experts' output is added) gave 63%."""

    name = "pregate"
    needs_stream = True

    def __init__(self, moe_layers: Sequence[int], num_experts: int, top_k: int) -> None:
        super().__init__(moe_layers, num_experts, top_k)
        self.routers: dict[int, torch.Tensor] = {}  # MoE layer -> router weight, transposed [D, E], once loaded
        self.norms: dict[int, tuple[torch.Tensor, float]] = {}  # MoE layer -> its router input's RMSNorm (weight, eps)

    def set_routers(self, routers: dict[int, torch.Tensor], norms: dict[int, tuple[torch.Tensor, float]]) -> None:
        """Float32 copies (E x D and D per layer: small), so guessing converts only the stream."""
        self.routers = {l: r.detach().float().T.contiguous() for l, r in routers.items()}  # [D, E]
        self.norms = {l: (w.detach().float(), eps) for l, (w, eps) in norms.items()}

    def predict_after(self, layer: int, stream: torch.Tensor, depth: int) -> dict[int, dict[int, float]]:
        """Each of the next `depth` layers' routers applied to the normalized stream."""
        i = self.moe_layers.index(layer)
        out = {}
        for target in self.moe_layers[i + 1:i + 1 + depth]:
            if target in self.routers:
                weight, eps = self.norms[target]
                x = F.rms_norm(stream.float(), (stream.shape[-1],), weight, eps)  # [T, D]
                out[target] = _union_probs(torch.softmax(x @ self.routers[target], dim=-1), self.top_k)
        return out


PREDICTORS = {"none": ExpertPredictor, "correlation": CorrelationPredictor, "pregate": PreGatePredictor}
