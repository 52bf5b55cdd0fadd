"""Synthetic long-context retrieval tasks in the style of RULER.

Each task hides one or more *needles* in a haystack of ordinary text (or, for
``kv``, of other key-value pairs) and ends with a question whose answer is a
short string found only in the needle. The same generators feed the training
mix of the in-house models (``modelkit/``) and ``ferry eval``, so what is
measured is what was taught — at lengths and depths chosen by the caller.

All lengths are in tokens of the model's tokenizer; ``depth`` is where the
target needle sits in the context, 0.0 = start, 1.0 = just before the question.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

TASKS = ("passkey", "multikey", "kv", "vartrack")

_WORDS = (
    "apple river stone cloud tiger maple silver candle harbor violet engine garden falcon "
    "lantern meadow copper rocket willow puzzle castle marble thunder pepper glacier "
    "orchid canyon saddle beacon walnut comet anchor velvet pillow summit jungle"
).split()


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Sample:
    task: str
    prompt_ids: list[int]
    answer: str  # expected continuation, starting with a space
    answer_ids: list[int]
    depth: float


class Haystack:
    """Random contiguous slices of a token stream (the filler text)."""

    def __init__(self, ids: Sequence[int]):
        if len(ids) < 2:
            raise ValueError("haystack needs a non-empty token stream")
        self.ids = ids

    def take(self, n: int, rng: random.Random) -> list[int]:
        if n <= 0:
            return []
        out: list[int] = []
        while len(out) < n:
            start = rng.randrange(len(self.ids))
            out.extend(self.ids[start : start + n - len(out)])
        return out


def _number(rng: random.Random) -> str:
    return str(rng.randrange(10000, 100000))


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(4))


def _hexkey(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789abcdef") for _ in range(6))


def _assemble(
    tok: Tokenizer,
    hay: Haystack,
    rng: random.Random,
    length: int,
    needles: list[str],
    where: list[float],
    question: str,
    answer: str,
    task: str,
    depth: float,
) -> Sample:
    """Put each needle at its fraction ``where[i]`` of filler, so the prompt is ``length`` tokens."""
    q_ids = tok.encode(question)
    n_ids = [tok.encode(" " + n + " ") for n in needles]
    room = length - len(q_ids) - sum(len(x) for x in n_ids)
    if room < 0:
        raise ValueError(f"length {length} is too short for task {task!r}")
    filler = hay.take(room, rng)
    ids: list[int] = []
    at = 0
    for i in sorted(range(len(needles)), key=lambda i: (where[i], i)):
        cut = int(round(where[i] * room))
        ids.extend(filler[at:cut])
        ids.extend(n_ids[i])
        at = cut
    ids.extend(filler[at:])
    return Sample(task, ids + q_ids, answer, tok.encode(answer), depth)


def passkey(tok: Tokenizer, hay: Haystack, rng: random.Random, length: int, depth: float) -> Sample:
    key = _number(rng)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _assemble(tok, hay, rng, length, [needle], [depth],
                     " What is the pass key? The pass key is", f" {key}", "passkey", depth)


def multikey(tok: Tokenizer, hay: Haystack, rng: random.Random, length: int, depth: float) -> Sample:
    words = rng.sample(_WORDS, 4)
    values = [_number(rng) for _ in words]
    needles = [f"One of the special magic numbers for {w} is: {v}." for w, v in zip(words, values)]
    t = rng.randrange(len(words))
    where = [rng.random() for _ in words]
    where[t] = depth
    return _assemble(tok, hay, rng, length, needles, where,
                     f" What is the special magic number for {words[t]}? The special magic number for {words[t]} is:",
                     f" {values[t]}", "multikey", depth)


def kv(tok: Tokenizer, hay: Haystack, rng: random.Random, length: int, depth: float) -> Sample:
    """A long list of ``key: value`` pairs and no filler; find one key's value."""
    q_len = len(tok.encode(" What is the value of key 0a1b2c? The value of key 0a1b2c is")) + 4  # + slack
    pairs: list[tuple[str, str, list[int]]] = []
    used = 0
    keys: set[str] = set()
    while True:
        k, v = _hexkey(rng), _hexkey(rng)
        ids = tok.encode(f" key {k}: value {v}.")
        if used + len(ids) > length - q_len:
            break
        if k not in keys:
            keys.add(k)
            pairs.append((k, v, ids))
            used += len(ids)
    if len(pairs) < 2:
        raise ValueError(f"length {length} is too short for task 'kv'")
    k, v, _ = pairs[min(len(pairs) - 1, int(round(depth * (len(pairs) - 1))))]
    q_ids = tok.encode(f" What is the value of key {k}? The value of key {k} is")
    body = [i for _, _, ids in pairs for i in ids]
    ids = hay.take(length - len(q_ids) - len(body), rng) + body + q_ids  # filler pads to the exact length
    return Sample("kv", ids, f" {v}", tok.encode(f" {v}"), depth)


def vartrack(tok: Tokenizer, hay: Haystack, rng: random.Random, length: int, depth: float) -> Sample:
    """A chain of assignments VAR A = 12345, VAR B = VAR A, ...; name them all."""
    names = []
    while len(names) < 4:
        n = _name(rng)
        if n not in names:
            names.append(n)
    value = _number(rng)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    # The chain stays in order: its first link at `depth`, the others after it.
    where = [depth] + sorted(rng.uniform(depth, 1.0) for _ in needles[1:])
    return _assemble(tok, hay, rng, length, needles, where,
                     f" Find all variables that are assigned the value {value}. Answer: they are",
                     " " + " ".join(names) + ".", "vartrack", depth)


GENERATORS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey, "multikey": multikey, "kv": kv, "vartrack": vartrack,
}


def make_sample(task: str, tok: Tokenizer, hay: Haystack, rng: random.Random, length: int, depth: float) -> Sample:
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    return GENERATORS[task](tok, hay, rng, length, depth)


def is_correct(sample: Sample, generated: str) -> bool:
    """Exact match of the answer at the start of the generated text (whitespace-normalized)."""
    want = " ".join(sample.answer.split())
    got = " ".join(generated.split())
    return got.startswith(want) and (len(got) == len(want) or not got[len(want)].isalnum())
