"""Verification of draft tokens (speculative decoding): which of a request's guesses the target keeps.

Row i of a request's verification is sampled exactly as a one-token decode after its first i drafts would be
(the same logits, penalties, temperature, top-k/p and, for a seeded request, the same uniform: the sampler's
per-request generator gives the n-th output token its n-th draw, and the draws of rejected rows are taken back).
The request keeps its drafts while they equal the target's own samples, then the target's sample at the first
difference (or after the last draft): so greedy and seeded output is the output without speculation, token for
token. For an unseeded sampled request the drafts are deterministic guesses (q = one-hot), and keeping draft x
when the target's sample is x accepts it with probability p(x) and otherwise gives a token drawn from p without x,
renormalized: that is standard rejection sampling (Leviathan et al.; vLLM's rejection sampler with one-hot draft
probabilities), so the output keeps the target's distribution exactly."""
from __future__ import annotations

from typing import Sequence

from ferry.plan import ScheduledReq


def accept(drafts: Sequence[int], sampled: Sequence[int]) -> list[int]:
    """The tokens a request gains: drafts[i] while it equals sampled[i] (the target's sample after drafts[:i]),
    then the target's sample at the first difference, or sampled[len(drafts)] after the last draft.
    len(sampled) == len(drafts) + 1."""
    if len(sampled) != len(drafts) + 1:
        raise ValueError(f"{len(drafts)} drafts need {len(drafts) + 1} samples, got {len(sampled)}")
    out = []
    for d, s in zip(drafts, sampled):
        out.append(s)
        if s != d:
            return out
    out.append(sampled[-1])
    return out


def routed(r: ScheduledReq, sampled: dict[str, int]) -> list[int]:
    """The tokens a route (R2R) request gains: every draft (the router let them through: lossy, not verified), then
    route_next_token, or the target's sample after the last draft (taken out of `sampled`) where it was routed."""
    last = r.route_next_token if r.route_next_token is not None else sampled.pop(r.req_id)
    return list(r.draft_token_ids) + [last]
