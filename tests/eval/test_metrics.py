"""Eval metrics and task generators on small inputs with known answers."""
from __future__ import annotations

import math
import random

import pytest

from ferry.eval import metrics
from ferry.eval.tasks import TASKS, Haystack, Sample, is_correct, make_sample


def test_perplexity_known_values():
    assert metrics.perplexity([math.log(0.5)] * 4) == pytest.approx(2.0)
    assert metrics.perplexity([0.0]) == 1.0
    with pytest.raises(ValueError):
        metrics.perplexity([])


def test_unigram_perplexity_known_values():
    assert metrics.unigram_perplexity([1, 2, 3, 4]) == pytest.approx(4.0)  # uniform over 4
    assert metrics.unigram_perplexity([7, 7, 7]) == pytest.approx(1.0)
    # p = (3/4, 1/4): exp(H) with H = -(3/4 ln 3/4 + 1/4 ln 1/4)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert metrics.unigram_perplexity([1, 1, 1, 2]) == pytest.approx(math.exp(h))


def test_acceptance_rate():
    assert metrics.acceptance_rate([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError):
        metrics.acceptance_rate([1], [1, 2])


def test_expert_shares():
    assert metrics.expert_shares([[0, 1], [0, 2], [0, 1]], 4) == [0.5, pytest.approx(2 / 6), pytest.approx(1 / 6), 0.0]


def test_coactivation_recall_learns_a_deterministic_map():
    # layer l expert i always leads to layer l+1 experts (i+1)%8 and (i+2)%8: fully predictable with top-4.
    rng = random.Random(0)
    pairs = []
    for _ in range(200):
        i = rng.randrange(8)
        pairs.append(([i], [(i + 1) % 8, (i + 2) % 8]))
    assert metrics.coactivation_recall(pairs[:100], pairs[100:], 8, k=4) == 1.0
    # k=1 can catch only one of the two: exactly half.
    assert metrics.coactivation_recall(pairs[:100], pairs[100:], 8, k=1) == 0.5


def test_coactivation_recall_at_chance_for_independent_choices():
    rng = random.Random(1)
    pairs = [(rng.sample(range(8), 2), rng.sample(range(8), 2)) for _ in range(4000)]
    assert metrics.coactivation_recall(pairs[:2000], pairs[2000:], 8, k=4) == pytest.approx(0.5, abs=0.04)


class CharTok:
    """One token per character: lengths and positions are easy to check."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


HAY = Haystack(CharTok().encode("the quick brown fox jumps over the lazy dog. " * 50))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_samples_have_exact_length_and_one_findable_answer(task, depth):
    tok = CharTok()
    s = make_sample(task, tok, HAY, random.Random(3), 600, depth)
    assert len(s.prompt_ids) == 600
    text = tok.decode(s.prompt_ids)
    value = s.answer.strip().rstrip(".").split()[0]
    assert value in text  # the answer (or its first variable) is in the context
    assert s.answer_ids == tok.encode(s.answer)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.75, 1.0])
def test_passkey_needle_sits_at_its_depth(depth):
    tok = CharTok()
    s = make_sample("passkey", tok, HAY, random.Random(0), 1000, depth)
    text = tok.decode(s.prompt_ids)
    at = text.index("The pass key is")
    question = text.index(" What is the pass key?")
    assert at / question == pytest.approx(depth, abs=0.07)


def test_vartrack_chain_stays_in_order():
    tok = CharTok()
    s = make_sample("vartrack", tok, HAY, random.Random(5), 800, 0.3)
    text = tok.decode(s.prompt_ids)
    names = s.answer.strip().rstrip(".").split()
    assert len(names) == 4
    first = text.index(f"VAR {names[0]} = ")
    links = [text.index(f"VAR {b} = VAR {a}.") for a, b in zip(names, names[1:])]
    assert first < links[0] < links[1] < links[2]


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        make_sample("nope", CharTok(), HAY, random.Random(0), 500, 0.5)
    with pytest.raises(ValueError, match="depth"):
        make_sample("passkey", CharTok(), HAY, random.Random(0), 500, 1.5)
    with pytest.raises(ValueError, match="too short"):
        make_sample("multikey", CharTok(), HAY, random.Random(0), 50, 0.5)


def test_is_correct():
    s = Sample("passkey", [], " 12345", [], 0.5)
    assert is_correct(s, " 12345. And")
    assert is_correct(s, "12345")
    assert not is_correct(s, " 123456")
    assert not is_correct(s, " 12346")
