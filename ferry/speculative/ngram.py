"""`ngram`: prompt lookup (no model). The request's last n tokens (n from prompt_lookup_max down to
prompt_lookup_min) are looked up earlier in its own context, and the tokens that followed the most recent match are
the guess. Input-grounded text (summaries, edits of the prompt, code) repeats its input, which is where this pays.
vLLM's NgramProposer takes the earliest match; the most recent one follows the current topic more closely."""
from __future__ import annotations

from typing import Sequence

from ferry.request import Request


def lookup(tokens: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of tokens' longest suffix of length in
    [min_n, max_n] ([] if none occurs). O(len(tokens) * max_n) per call, in Python: fine for the contexts of this
    engine; a suffix automaton would make it O(k)."""
    size = len(tokens)
    if k < 1 or size < min_n + 1:
        return []
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = list(tokens[size - n:])
        first = suffix[0]
        # a match must start before the suffix itself and have at least one token after it
        for start in range(size - n - 1, -1, -1):
            if tokens[start] == first and list(tokens[start:start + n]) == suffix:
                follow = start + n
                return list(tokens[follow:min(follow + k, size)])
    return []


class NgramProposer:
    name = "ngram"

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, reqs: Sequence[Request], max_tokens: Sequence[int]) -> list[list[int]]:
        return [lookup(r.all_token_ids, self.min_n, self.max_n, k) for r, k in zip(reqs, max_tokens)]

    def observe(self, req: Request, num_new_tokens: int) -> None:
        pass

    def release(self, req_id: str) -> None:
        pass
