"""From the engine's cumulative outputs to OpenAI's wire format: per-choice deltas, logprobs, SSE chunks.

The engine yields cumulative RequestOutputs (all text so far); a stream sends only what is new. DeltaTracker
remembers, per choice, how many characters, token ids and logprobs were sent. Text may lag token ids (a stop
string still forming, an incomplete UTF-8 character), so the three are tracked separately."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from ferry.request import CompletionOutput, TokenLogprob

DONE = "data: [DONE]\n\n"
MIN_LOGPROB = -9999.0  # JSON has no -inf; vLLM clamps the same way


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


class TokenTexts:
    """Token id -> its text, cached; logprobs name tokens by text (and by UTF-8 bytes in chat)."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            try:
                text = self._decode([token_id])
            except Exception:  # an id the tokenizer cannot render must not fail the request
                text = ""
            self._cache[token_id] = text
        return text


def visible_logprobs(c: CompletionOutput, texts: TokenTexts) -> CompletionOutput:
    """The choice with the logprobs of tokens that `text` does not show removed. A stop string ends `text`
    before it, but the token that completed it was sampled and has a logprob: the logprob tokens joined then
    read `text` plus the stop string (issue 23: 2 of ~500 completions with logprobs, all ended by a stop string).
    Trailing tokens whose text lies wholly past the end of `text` are dropped; a token the stop string cuts in
    the middle is kept (it is part visible), so only then can the joined tokens run past `text`."""
    if c.logprobs is None or c.finish_reason != "stop" or not isinstance(c.stop_reason, str) or not c.logprobs:
        return c
    lengths = [len(texts(lp.token_id)) for lp in c.logprobs]
    keep, shown = len(lengths), sum(lengths)
    while keep and shown - lengths[keep - 1] >= len(c.text):
        keep -= 1
        shown -= lengths[keep]
    return c if keep == len(lengths) else replace(c, logprobs=c.logprobs[:keep])


def _lp(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) or value < MIN_LOGPROB else float(value)


def completion_logprobs(lps: list[TokenLogprob], texts: TokenTexts, text_offset: int = 0) -> dict[str, Any]:
    """/v1/completions logprobs: parallel lists, top alternatives as {token text: logprob}."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for lp in lps:
        text = texts(lp.token_id)
        tokens.append(text)
        token_logprobs.append(_lp(lp.logprob))
        alternatives: dict[str, float] = {}
        for tid, value in lp.top:
            alternatives.setdefault(texts(tid), _lp(value))
        top.append(alternatives)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(lps: list[TokenLogprob], texts: TokenTexts) -> dict[str, Any]:
    """/v1/chat/completions logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    content = []
    for lp in lps:
        text = texts(lp.token_id)
        content.append({"token": text, "logprob": _lp(lp.logprob), "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": texts(tid), "logprob": _lp(v), "bytes": list(texts(tid).encode("utf-8"))}
                                         for tid, v in lp.top]})
    return {"content": content}


@dataclass
class ChoiceDelta:
    index: int  # the choice index in the response
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None
    stop_reason: str | int | None = None


@dataclass
class _Sent:
    num_chars: int = 0
    num_token_ids: int = 0
    num_logprobs: int = 0
    finished: bool = False


@dataclass
class DeltaTracker:
    """What each choice has already been sent; deltas() returns only what is new."""

    sent: dict[int, _Sent] = field(default_factory=dict)

    def delta(self, index: int, out: CompletionOutput) -> ChoiceDelta | None:
        """The new part of one choice, or None when nothing changed (or it already finished)."""
        s = self.sent.setdefault(index, _Sent())
        if s.finished:
            return None
        text = out.text[s.num_chars:] if len(out.text) > s.num_chars else ""
        token_ids = out.token_ids[s.num_token_ids:]
        logprobs = out.logprobs[s.num_logprobs:] if out.logprobs is not None else None
        finished = out.finish_reason is not None
        if not text and not token_ids and not logprobs and not finished:
            return None
        s.num_chars = max(s.num_chars, len(out.text))
        s.num_token_ids = len(out.token_ids)
        s.num_logprobs = len(out.logprobs) if out.logprobs is not None else 0
        s.finished = finished
        return ChoiceDelta(index, text, token_ids, logprobs, out.finish_reason, out.stop_reason)


class ChunkWriter:
    """SSE chunks of one streamed response (completions or chat), OpenAI's format."""

    def __init__(self, kind: str, response_id: str, model: str, texts: TokenTexts, include_usage: bool) -> None:
        self.chat = kind == "chat"
        self.object = "chat.completion.chunk" if self.chat else "text_completion"
        self.response_id, self.model, self.texts = response_id, model, texts
        self.include_usage = include_usage
        self.created = int(time.time())
        self._offsets: dict[int, int] = {}  # completions text_offset per choice

    def _chunk(self, choices: list[dict[str, Any]]) -> str:
        payload: dict[str, Any] = {"id": self.response_id, "object": self.object, "created": self.created,
                                   "model": self.model, "choices": choices}
        if self.include_usage:
            payload["usage"] = None
        return sse(payload)

    def roles(self, indices: list[int]) -> str:
        """Chat streams open each choice with its role, as OpenAI does."""
        return "".join(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]) for i in indices)

    def deltas(self, deltas: list[ChoiceDelta]) -> str:
        """One chunk per choice, as OpenAI sends them (clients often read only choices[0])."""
        events = []
        for d in deltas:
            if self.chat:
                lp = chat_logprobs(d.logprobs, self.texts) if d.logprobs else None
                choice: dict[str, Any] = {"index": d.index, "delta": {"content": d.text} if d.text else {},
                                          "logprobs": lp, "finish_reason": d.finish_reason}
            else:
                offset = self._offsets.get(d.index, 0)
                lp = completion_logprobs(d.logprobs, self.texts, offset) if d.logprobs else None
                if d.logprobs:
                    self._offsets[d.index] = offset + sum(len(t) for t in lp["tokens"])
                choice = {"index": d.index, "text": d.text, "logprobs": lp, "finish_reason": d.finish_reason}
            if d.finish_reason is not None:
                choice["stop_reason"] = d.stop_reason
            events.append(self._chunk([choice]))
        return "".join(events)

    def usage(self, num_prompt_tokens: int, num_completion_tokens: int) -> str:
        return sse({"id": self.response_id, "object": self.object, "created": self.created, "model": self.model,
                    "choices": [], "usage": usage(num_prompt_tokens, num_completion_tokens)})


def error_event(message: str, type_: str = "server_error", code: str | None = None) -> str:
    """An error after the stream started (headers already sent): one data event carrying OpenAI's error body."""
    return sse({"error": {"message": message, "type": type_, "param": None, "code": code}})
