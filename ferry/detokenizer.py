"""Streaming detokenization and stop strings.

- IncrementalDetokenizer: turns output token ids into text one token at a time, with the prefix/read-offset
  method of HF text-generation-inference and vLLM: each step decodes only a short window of recent tokens,
  so add() is O(1) amortized, while the concatenated output equals tokenizer.decode(output_ids) exactly
  (sentencepiece `▁` spaces, byte fallback, multi-byte characters split over tokens, skipped special tokens).
- find_stop: the earliest stop string that overlaps the newly added text.
"""
from __future__ import annotations

import logging

from ferry.tokenizer import REPLACEMENT_CHAR, Tokenizer, _clean_up

logger = logging.getLogger(__name__)


class IncrementalDetokenizer:
    """Streams the text of output tokens, one token at a time.

    Concatenating every add() return plus flush() equals tokenizer.decode(output_ids, skip_special_tokens)
    exactly. Text is held back while it ends with an incomplete multi-byte character (U+FFFD); flush() releases
    whatever is still held (call it when the request finishes; it returns "" in the common case).

    continuation=True instead returns the text the output adds after the prompt, decoding a few prompt tokens
    as context: the first token of a sentencepiece model then keeps its leading space (" Paris" after
    "The capital of France is"), as vLLM and the transformers pipeline do, so prompt text + output text reads
    right. With continuation=False (the default) sentencepiece tokenizers drop the first output token's
    leading space, exactly as tokenizer.decode(output_ids) does.
    """

    _CONTEXT_TOKENS = 5  # prompt tokens decoded as context in continuation mode (as vLLM)

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        *,
        continuation: bool = False,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = [int(t) for t in prompt_token_ids[-self._CONTEXT_TOKENS :]] if continuation else []
        self._ids: list[int] = context
        self._context_len = len(context)
        # Window: ids[prefix_offset:read_offset] were already turned into text (prefix_text);
        # ids[read_offset:] are not emitted yet.
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)
        self._context_text = self._prefix_text
        self._raw_parts: list[str] = []  # emitted text before the streaming clean-up (for _resync)
        self._pieces: list[str] = []
        self._text: str | None = ""
        self._cleanup = tokenizer._cleanup
        self._raw_all = ""  # clean-up mode only: all raw text, and its cleaned part emitted so far
        self._clean_emitted = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer._decode_raw(ids, self.skip_special_tokens) if ids else ""

    @property
    def output_token_ids(self) -> list[int]:
        return self._ids[self._context_len :]

    def add(self, token_id: int) -> str:
        """Adds one output token; returns the text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        if self.tokenizer._byte_ids and self._in_byte_run():
            return ""  # an open run of byte-fallback tokens: its text is only final once the run ends
        new_text = self._decode(self._ids[self._prefix_offset :])
        if new_text.endswith(REPLACEMENT_CHAR) or len(new_text) <= len(self._prefix_text):
            # An incomplete UTF-8 sequence, or a token that adds no text (yet): keep the window, emit nothing.
            return ""
        return self._emit(self._advance(new_text), final=False)

    def flush(self) -> str:
        """Releases the text still held back (a trailing incomplete character decodes to U+FFFD, as in decode())."""
        raw = ""
        if self._read_offset < len(self._ids):
            raw = self._advance(self._decode(self._ids[self._prefix_offset :]))
        return self._emit(raw, final=True)

    def _advance(self, new_text: str) -> str:
        """The text new_text (the window decoded) adds past the held prefix; the window moves past it."""
        raw = new_text[len(self._prefix_text) :] if new_text.startswith(self._prefix_text) else self._resync()
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return raw

    @property
    def text(self) -> str:
        """All output text returned so far."""
        if self._text is None:
            self._text = "".join(self._pieces)
            self._pieces = [self._text]
        return self._text

    def _in_byte_run(self) -> bool:
        """Whether the last token the decoder will see is a byte-fallback token."""
        tok = self.tokenizer
        for i in range(len(self._ids) - 1, self._read_offset - 1, -1):
            tid = self._ids[i]
            if tid < 0 or tid >= tok._backend_vocab or (self.skip_special_tokens and tid in tok._special_ids):
                continue  # dropped before the decoder runs: does not end a run
            return tid in tok._byte_ids
        return False

    def _resync(self) -> str:
        """The window's text does not extend the previous window's (rare): diff the full decode against the raw
        text emitted so far instead."""
        full = self._decode(self._ids)
        if self._context_len:
            if not full.startswith(self._context_text):
                logger.debug("detokenizer: the prompt context decodes differently; skipping a token's text")
                return ""
            full = full[len(self._context_text) :]
        done = "".join(self._raw_parts)
        if full.startswith(done):
            return full[len(done) :]
        logger.debug("detokenizer: emitted text diverged from the full decode; skipping a token's text")
        return ""

    def _emit(self, raw: str, final: bool) -> str:
        if raw:
            self._raw_parts.append(raw)
        out = self._release(raw, final) if self._cleanup else raw
        if out:
            self._pieces.append(out)
            self._text = None
        return out

    def _release(self, raw: str, final: bool) -> str:
        """transformers' clean_up_tokenization, streamed: clean the whole raw text minus a tail that could begin a
        pattern, and emit what the cleaned text gained. O(length) per token, but only tokenizers whose decode()
        cleans up (transformers 5 skips it for BPE models, i.e. nearly every LLM) take this path."""
        self._raw_all += raw
        cut = len(self._raw_all)
        if not final:
            # Every pattern starts with a space and is at most 4 long: cut before any space in the last 3
            # characters, repeatedly, so no pattern occurrence can straddle the cut.
            while True:
                i = self._raw_all.find(" ", max(0, cut - 3), cut)
                if i == -1:
                    break
                cut = i
        cleaned = _clean_up(self._raw_all[:cut])
        if not cleaned.startswith(self._clean_emitted):
            logger.debug("detokenizer: clean-up changed text already emitted; emitting nothing for this token")
            return ""
        out = cleaned[len(self._clean_emitted) :]
        self._clean_emitted = cleaned
        return out


def find_stop(text: str, new_len: int, stops: list[str]) -> tuple[int, str] | None:
    """Where the earliest stop string occurs in text, looking only at matches that overlap the last new_len
    characters (so a stop string split across tokens is found once its last piece arrives).

    Returns (index, stop) or None; ties at the same index go to the stop listed first. Empty stops are ignored.
    """
    if new_len <= 0 or not stops:
        return None
    n = len(text)
    new_start = n - min(new_len, n)
    best: tuple[int, str] | None = None
    for stop in stops:
        if not stop:
            continue
        idx = text.find(stop, max(0, new_start - len(stop) + 1))
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    return best
