"""`ngram`: prompt lookup (no model). The request's last tokens are looked up earlier in its own context, and the
tokens that followed the best match are the guess: the match that agrees with the longest suffix (up to
prompt_lookup_max tokens, at least prompt_lookup_min), the most recent one among equals. Input-grounded text
(summaries, edits of the prompt, code) repeats its input, which is where this pays. vLLM's NgramProposer takes the
earliest match of the longest n; the most recent one follows the current topic more closely.

Each request's context is indexed incrementally (every min_n-gram -> where it starts), so a step costs O(new
tokens + a few candidates) per request rather than a scan of the whole context."""
from __future__ import annotations

from typing import Sequence

from ferry.request import Request

MAX_CANDIDATES = 32  # most recent occurrences of the min_n-gram checked for a longer match
SEP = -1  # separates the segments of a sequence of several texts (no token id is negative)


class ContextIndex:
    """Where each min_n-gram of one token sequence starts, for the tokens seen so far (append-only)."""

    def __init__(self, min_n: int) -> None:
        self.min_n = min_n
        self.size = 0  # tokens indexed
        self.starts: dict[tuple[int, ...], list[int]] = {}

    def update(self, tokens: Sequence[int]) -> None:
        n = self.min_n
        for s in range(max(0, self.size - n + 1), len(tokens) - n + 1):
            self.starts.setdefault(tuple(tokens[s:s + n]), []).append(s)
        self.size = len(tokens)

    def lookup(self, tokens: Sequence[int], max_n: int, k: int) -> list[int]:
        """Up to k tokens that followed the best earlier match of tokens' suffix ([] if none)."""
        if k < 1 or len(tokens) <= self.min_n:
            return []
        self.update(tokens)
        return self.follow(tokens, tokens, max_n, k)

    def follow(self, seq: Sequence[int], query: Sequence[int], max_n: int, k: int) -> list[int]:
        """Up to k tokens that follow, in seq (the indexed sequence), the best match of query's suffix: the
        longest (up to max_n), the most recent among equals. A match followed by nothing, or by SEP, is no
        match; what follows stops at SEP."""
        size, n = len(query), self.min_n
        if k < 1 or size < n:
            return []
        best_end, best_len = -1, 0
        checked = 0
        for s in reversed(self.starts.get(tuple(query[size - n:]), ())):
            end = s + n
            if end >= len(seq) or seq[end] == SEP:
                continue
            m = n
            while m < max_n and end - m - 1 >= 0 and m < size and seq[end - m - 1] == query[size - m - 1]:
                m += 1
            if m > best_len:
                best_end, best_len = end, m
                if m >= max_n:
                    break
            checked += 1
            if checked >= MAX_CANDIDATES:
                break
        if best_end < 0:
            return []
        out = list(seq[best_end:best_end + k])
        return out[:out.index(SEP)] if SEP in out else out

def lookup(tokens: Sequence[int], min_n: int, max_n: int, k: int) -> list[int]:
    """ContextIndex.lookup on a fresh index (one-off calls and tests)."""
    return ContextIndex(min_n).lookup(tokens, max_n, k)


class NgramProposer:
    name = "ngram"

    def __init__(self, min_n: int, max_n: int) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max, got {min_n}, {max_n}")
        self.min_n = min_n
        self.max_n = max_n
        self.indexes: dict[str, ContextIndex] = {}

    def own_lookup(self, req: Request, k: int) -> list[int]:
        index = self.indexes.get(req.req_id)
        if index is None or index.size > req.num_tokens:  # new, or an id reused for other tokens
            index = self.indexes[req.req_id] = ContextIndex(self.min_n)
        return index.lookup(req.all_token_ids, self.max_n, k)

    def propose(self, reqs: Sequence[Request], max_tokens: Sequence[int]) -> list[list[int]]:
        return [self.own_lookup(r, k) for r, k in zip(reqs, max_tokens)]

    def observe(self, req: Request, num_new_tokens: int) -> None:
        pass

    def release(self, req_id: str) -> None:
        self.indexes.pop(req_id, None)
