"""Verification of draft tokens (ferry/runner/verify.py with the sampler): the acceptance rule, the target's
distribution kept exactly for unseeded sampling (chi-square over many draws), and seeded draws that do not depend
on how a position was reached."""
from __future__ import annotations

import pytest
import torch

from ferry.plan import ScheduledReq
from ferry.request import SamplingParams
from ferry.runner.inputs import row_views
from ferry.runner.verify import accept
from ferry.sampling import Sampler
from tests.unit.test_sampler import CHI2_CRIT, chi_square

V = 4
P0 = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)  # the target's distribution at the first position
P1 = torch.tensor([0.5, 0.25, 0.15, 0.1], dtype=torch.float64)  # ... after the draft token


def verifying(req_id: str, draft: list[int], **params) -> ScheduledReq:
    params.setdefault("max_tokens", 100)
    prompt = [3, 1, 2]
    return ScheduledReq(req_id, [prompt[-1]] + draft, len(prompt) - 1, [0], True, SamplingParams(**params), prompt,
                        len(prompt), draft_token_ids=draft)


def test_accept_keeps_the_agreeing_prefix_and_the_targets_next_token():
    assert accept([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accept([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accept([5], [4, 1]) == [4]
    with pytest.raises(ValueError):
        accept([5, 6], [5, 6])


@pytest.mark.parametrize("draft", [0, 3])  # the least and the most likely token as the guess
def test_unseeded_verification_keeps_the_target_distribution(draft):
    sampler = Sampler([], seed=1234)
    logits = torch.stack([P0.log(), P1.log()]).float()
    first = torch.zeros(V, dtype=torch.long)
    second = torch.zeros(V, dtype=torch.long)  # the token after an accepted draft
    batch = 4000
    for chunk in range(5):
        reqs = [verifying(f"r{chunk}-{i}", [draft], temperature=1.0) for i in range(batch)]
        rows = [v for r in reqs for v in row_views(r)]
        tokens, _ = sampler(logits.repeat(batch, 1), rows)
        for i in range(batch):
            kept = accept([draft], tokens[2 * i:2 * i + 2])
            first[kept[0]] += 1
            if len(kept) == 2:
                second[kept[1]] += 1
    assert chi_square(first, P0) < CHI2_CRIT[3], first
    assert chi_square(second, P1) < CHI2_CRIT[3], second
    assert abs(second.sum().item() / first.sum().item() - P0[draft].item()) < 0.02  # accepted with p(draft)


def test_seeded_tokens_do_not_depend_on_verification():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    params = dict(temperature=1.0, seed=42)
    plain = Sampler([])
    want = []
    for i in range(3):  # one token per step, no speculation
        r = verifying("a", [], **params)
        r.all_token_ids = r.all_token_ids + want
        want += plain(logits[i:i + 1], [r])[0]
    spec = Sampler([])
    r = verifying("a", [want[0], (want[1] + 1) % V], **params)  # first draft right, second wrong
    snap = spec.snapshot(["a"])
    tokens, _ = spec(logits, row_views(r))
    kept = accept(r.draft_token_ids, tokens)
    assert kept == want[:2]
    spec.keep_draws(snap, r, len(kept))
    nxt = verifying("a", [], **params)
    nxt.all_token_ids = nxt.all_token_ids + kept
    assert spec(logits[2:3], [nxt])[0] == want[2:]
