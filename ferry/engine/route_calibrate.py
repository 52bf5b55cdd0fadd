"""Calibrates the route (R2R) router offline on a model pair: R2R's recipe made cheap. Both models read held-out
text (teacher-forced: prompt logprobs, one forward per window each); a position is labelled divergent where the
small model's greedy token differs from the large model's; a logistic model over the small model's features there
(ferry/speculative/route.py: top-1 probability, top-1 minus top-2, top-k entropy) is fitted to those labels, so its
score is an estimated chance of divergence and --route-threshold reads as one. R2R labels a token by whether the
small model's choice changes where the continuation goes (a large-model rollout judged by a verifier); plain
disagreement over-counts neutral differences, which errs towards routing more, on the safe side."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ferry.engine.llm import LLM
from ferry.request import SamplingParams
from ferry.speculative.route import FEATURES, TOP_K, Router, features


@dataclass
class Samples:
    """Per scored position: the small model's features and whether the two models' greedy tokens differ."""

    feats: list[tuple[float, float, float]]
    divergent: list[bool]

    @property
    def divergence_rate(self) -> float:
        return sum(self.divergent) / len(self.divergent) if self.divergent else 0.0


def collect(large: LLM, small: LLM, windows: Sequence[list[int]]) -> Samples:
    """Features and divergence labels over every position of each token window (after its first token)."""
    k = min(TOP_K, SamplingParams.MAX_LOGPROBS)
    prompts = [{"prompt_token_ids": list(w)} for w in windows]
    outs_small = small.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=k),
                                use_tqdm=False)
    outs_large = large.generate(prompts, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1),
                                use_tqdm=False)
    samples = Samples([], [])
    for s, g in zip(outs_small, outs_large):
        for lp_s, lp_l in zip(s.prompt_logprobs[1:], g.prompt_logprobs[1:]):
            if lp_s is None or lp_l is None or not lp_s.top or not lp_l.top:
                continue
            samples.feats.append(features([lp for _, lp in lp_s.top]))
            samples.divergent.append(lp_s.top[0][0] != lp_l.top[0][0])
    return samples


def fit(samples: Samples, steps: int = 200) -> Router:
    """The logistic router fitted to samples (standardized features, L-BFGS on the mean log loss)."""
    if len(samples.feats) < 10 or len(set(samples.divergent)) < 2:
        raise ValueError(f"calibration needs both divergent and agreeing positions, got {len(samples.feats)} "
                         f"positions at divergence rate {samples.divergence_rate:.2f}: give more text")
    x = torch.tensor(samples.feats, dtype=torch.float64)  # [N, F]
    y = torch.tensor(samples.divergent, dtype=torch.float64)  # [N]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + 1e-4 * (w * w).sum()
        value.backward()
        return value

    opt.step(loss)
    with torch.no_grad():
        final = float(torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y))
    info = {"features": list(FEATURES), "positions": len(samples.feats),
            "divergence_rate": samples.divergence_rate, "log_loss": final}
    return Router("logistic", tuple(w.detach().tolist()), float(b.detach()), tuple(mean.tolist()),
                  tuple(std.tolist()), info)


def calibrate(large: LLM, small: LLM, windows: Sequence[list[int]]) -> Router:
    """collect() then fit(): the router file for this pair (Router.save)."""
    return fit(collect(large, small, windows))
