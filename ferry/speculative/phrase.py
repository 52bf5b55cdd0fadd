"""`phrase`: an Ouroboros-style phrase pool. Phrases the target verified (every request's output, as it grows) are
kept in one pool shared across requests: the n tokens before a position (n in [prompt_lookup_min,
prompt_lookup_max]) map to the PHRASE_LEN tokens that followed. A request is offered the longest phrase whose key
matches its last tokens, or its own context's n-gram continuation (prompt lookup) when that is longer.
Memory is bounded: at most max_entries keys, least recently used dropped first."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from ferry.request import Request
from ferry.speculative.ngram import NgramProposer

PHRASE_LEN = 8  # tokens kept per phrase


class PhrasePool:
    def __init__(self, min_n: int, max_n: int, max_entries: int = 1 << 16) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"the phrase pool needs 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self.max_entries = max_entries
        self.phrases: OrderedDict[tuple[int, ...], tuple[int, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.phrases)

    def add(self, tokens: Sequence[int], start: int, stop: int) -> None:
        """Index the phrases that begin at positions start..stop-1 of tokens (each with its n-gram keys)."""
        for e in range(max(start, self.min_n), stop):
            phrase = tuple(tokens[e:e + PHRASE_LEN])
            if not phrase:
                continue
            for n in range(self.min_n, min(self.max_n, e) + 1):
                key = tuple(tokens[e - n:e])
                self.phrases[key] = phrase
                self.phrases.move_to_end(key)
        while len(self.phrases) > self.max_entries:
            self.phrases.popitem(last=False)

    def find(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens of the phrase whose key is the longest suffix of tokens ([] if none)."""
        for n in range(min(self.max_n, len(tokens)), self.min_n - 1, -1):
            phrase = self.phrases.get(tuple(tokens[len(tokens) - n:]))
            if phrase is not None:
                return list(phrase[:k])
        return []


class PhraseProposer:
    name = "phrase"

    def __init__(self, min_n: int, max_n: int, max_entries: int = 1 << 16) -> None:
        self.pool = PhrasePool(min_n, max_n, max_entries)
        self.own = NgramProposer(min_n, max_n)  # each request's own context, indexed

    def propose(self, reqs: Sequence[Request], max_tokens: Sequence[int]) -> list[list[int]]:
        out = []
        for r, k in zip(reqs, max_tokens):
            own = self.own.own_lookup(r, k)
            pooled = self.pool.find(r.all_token_ids, k) if len(own) < k else []
            out.append(pooled if len(pooled) > len(own) else own)
        return out

    def observe(self, req: Request, num_new_tokens: int) -> None:
        """Harvest the phrases of req's output that the new tokens completed (a phrase's tokens all verified)."""
        size = req.num_tokens
        lo = max(req.num_prompt_tokens, size - num_new_tokens - PHRASE_LEN + 1)
        self.pool.add(req.all_token_ids, lo, size - PHRASE_LEN + 1)

    def release(self, req_id: str) -> None:
        self.own.release(req_id)
