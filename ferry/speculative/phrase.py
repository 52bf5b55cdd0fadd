"""`phrase`: an Ouroboros-style phrase pool. The text the target verified (every request's output) is kept in one
pool shared across requests: a bounded corpus of segments, indexed like a request's own context (ngram.py). A
request is offered what followed, in the pool, the longest match of its last tokens (n in [prompt_lookup_min,
prompt_lookup_max]), or its own context's n-gram continuation (prompt lookup) when that is longer.

A request's output joins the pool in chunks of HARVEST_EVERY tokens while it runs and the rest when it ends, each
chunk with the max_n tokens before it (its first keys): a few dict operations per token, not per step. Memory is
bounded: past max_tokens the older half of the corpus is dropped."""
from __future__ import annotations

from typing import Sequence

from ferry.request import Request
from ferry.speculative.ngram import SEP, ContextIndex, NgramProposer

HARVEST_EVERY = 32  # a running request's verified output joins the pool in chunks of this many tokens


class PhrasePool:
    def __init__(self, min_n: int, max_n: int, max_tokens: int = 1 << 20) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"the phrase pool needs 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self.max_tokens = max_tokens
        self.corpus: list[int] = []  # segments, each followed by SEP
        self.index = ContextIndex(min_n)

    def __len__(self) -> int:
        return len(self.corpus)

    def add(self, segment: Sequence[int]) -> None:
        """Keep segment (verified tokens) as one more text of the pool."""
        self.corpus.extend(segment)
        self.corpus.append(SEP)
        if len(self.corpus) > self.max_tokens:
            self.corpus = self.corpus[len(self.corpus) - self.max_tokens // 2:]
            self.index = ContextIndex(self.min_n)
        self.index.update(self.corpus)

    def find(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens that followed, in the pool, the longest match of tokens' suffix ([] if none)."""
        return self.index.follow(self.corpus, tokens, self.max_n, k)


class PhraseProposer:
    name = "phrase"

    def __init__(self, min_n: int, max_n: int, max_tokens: int = 1 << 20) -> None:
        self.pool = PhrasePool(min_n, max_n, max_tokens)
        self.own = NgramProposer(min_n, max_n)  # each request's own context, indexed
        self.harvested: dict[str, tuple[Request, int]] = {}  # running request -> its tokens in the pool so far

    def propose(self, reqs: Sequence[Request], max_tokens: Sequence[int]) -> list[list[int]]:
        out = []
        for r, k in zip(reqs, max_tokens):
            own = self.own.own_lookup(r, k)
            pooled = self.pool.find(r.all_token_ids, k) if len(own) < k else []
            out.append(pooled if len(pooled) > len(own) else own)
        return out

    def observe(self, req: Request, num_new_tokens: int) -> None:
        """req's output grew by verified tokens: a full chunk of them joins the pool."""
        _, done = self.harvested.setdefault(req.req_id, (req, req.num_prompt_tokens))
        if req.num_tokens - done >= HARVEST_EVERY:
            self._harvest(req, done)
            self.harvested[req.req_id] = (req, req.num_tokens)

    def release(self, req_id: str) -> None:
        """req_id ended: the rest of its output joins the pool."""
        self.own.release(req_id)
        req, done = self.harvested.pop(req_id, (None, 0))
        if req is not None and req.num_tokens > done:
            self._harvest(req, done)

    def _harvest(self, req: Request, done: int) -> None:
        self.pool.add(req.all_token_ids[max(0, done - self.pool.max_n):])
