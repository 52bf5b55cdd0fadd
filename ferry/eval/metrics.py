"""Quality metrics computed from plain numbers (no engine): each has known answers in the tests."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence


def perplexity(logprobs: Sequence[float]) -> float:
    """exp of the mean negative log-likelihood per token."""
    if not logprobs:
        raise ValueError("perplexity of no tokens")
    return math.exp(-sum(logprobs) / len(logprobs))


def unigram_perplexity(ids: Sequence[int]) -> float:
    """Perplexity of the best unigram model *fitted to these very tokens* (a favourable baseline)."""
    counts = Counter(ids)
    n = len(ids)
    return math.exp(-sum(c * math.log(c / n) for c in counts.values()) / n)


def acceptance_rate(target: Sequence[int], draft_argmax: Sequence[int]) -> float:
    """Share of positions where the draft's greedy token equals the target's (greedy speculative acceptance)."""
    if len(target) != len(draft_argmax) or not target:
        raise ValueError("need two equally long, non-empty token lists")
    return sum(a == b for a, b in zip(target, draft_argmax)) / len(target)


def expert_shares(choices: Sequence[Sequence[int]], num_experts: int) -> list[float]:
    """Share of (token, slot) assignments each expert received; choices is one expert-id list per token."""
    counts = [0] * num_experts
    for row in choices:
        for e in row:
            counts[e] += 1
    total = sum(counts) or 1
    return [c / total for c in counts]


def coactivation_recall(
    fit: Sequence[tuple[Sequence[int], Sequence[int]]],
    test: Sequence[tuple[Sequence[int], Sequence[int]]],
    num_experts: int,
    k: int = 4,
) -> float:
    """How often layer l+1's chosen experts are among the top-k predicted from layer l's choices.

    Pairs are (experts chosen at layer l, experts chosen at layer l+1) for one token. Co-activation counts
    are fitted on ``fit``; a test token's prediction ranks experts j by sum over its layer-l experts i of
    count[i][j] (ties: lower id first). Returns the share of test (token, expert) choices that were predicted.
    """
    count = [[0] * num_experts for _ in range(num_experts)]
    for prev, nxt in fit:
        for i in prev:
            for j in nxt:
                count[i][j] += 1
    hit = total = 0
    for prev, nxt in test:
        score = [sum(count[i][j] for i in prev) for j in range(num_experts)]
        top = set(sorted(range(num_experts), key=lambda j: (-score[j], j))[:k])
        hit += sum(j in top for j in nxt)
        total += len(nxt)
    if total == 0:
        raise ValueError("no test pairs")
    return hit / total
