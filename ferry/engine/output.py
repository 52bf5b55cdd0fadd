"""Turns scheduler progress into RequestOutputs: incremental detokenization, stop strings, logprobs, and
the grouping of an n > 1 request's children into one output."""
from __future__ import annotations

from dataclasses import dataclass, field

from ferry.plan import StepResult
from ferry.request import CompletionOutput, FinishReason, Request, RequestOutput, SamplingParams, TokenLogprob
from ferry.detokenizer import IncrementalDetokenizer, find_stop
from ferry.tokenizer import Tokenizer


@dataclass
class _Child:
    index: int
    req: Request
    detok: IncrementalDetokenizer
    logprobs: list[TokenLogprob] | None
    text: str = ""
    num_tokens: int = 0  # output tokens detokenized (a step may bring several: speculative decoding)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def visible_text(self, params: SamplingParams) -> str:
        if self.finish_reason is not None or not params.stop:
            return self.text
        hold = max(len(s) for s in params.stop) - 1  # a stop string may still be forming at the end
        return self.text[:len(self.text) - hold] if hold else self.text


@dataclass
class _Group:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[_Child] = field(default_factory=list)
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)

    def output(self) -> RequestOutput:
        outs = [CompletionOutput(index=c.index, text=c.visible_text(self.params), token_ids=c.req.output_token_ids[:c.num_tokens],
                                 finish_reason=c.finish_reason, logprobs=c.logprobs, stop_reason=c.stop_reason)
                for c in self.children]
        cached = min(c.req.num_cached_prompt_tokens for c in self.children)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished, cached, self.error,
                             self.prompt_logprobs)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.groups: dict[str, _Group] = {}
        self.child_group: dict[str, _Group] = {}  # child req_id -> its group

    def add(self, request_id: str, prompt: str | None, children: list[Request],
            prior_logprobs: list[TokenLogprob] | None = None) -> None:
        """children may already hold output tokens (a resumed request): their text is made from them at the first
        step, as if they had just been sampled; prior_logprobs are theirs, when the request asks for logprobs."""
        first = children[0]
        g = _Group(request_id, prompt, first.prompt_token_ids, first.params)
        if first.params.prompt_logprobs is not None:
            g.prompt_logprobs = [None] * len(first.prompt_token_ids)
        for i, req in enumerate(children):
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params.skip_special_tokens,
                                           continuation=True)  # " Paris", not "Paris", as vLLM
            logprobs = list(prior_logprobs or []) if req.params.logprobs is not None else None
            g.children.append(_Child(i, req, detok, logprobs))
            self.child_group[req.req_id] = g
        self.groups[request_id] = g

    def process(self, progressed: list[Request], result: StepResult) -> tuple[list[RequestOutput], list[str]]:
        """Outputs of the groups that moved, and child ids that a stop string ended (the engine finishes them)."""
        touched: dict[str, _Group] = {}
        stopped: list[str] = []
        for req_id, (first_pos, lps) in result.prompt_logprobs.items():
            g = self.child_group.get(req_id)
            if g is not None and g.prompt_logprobs is not None:  # a recomputed prompt writes the same values again
                g.prompt_logprobs[first_pos:first_pos + len(lps)] = lps
        for req in progressed:
            g = self.child_group.get(req.req_id)
            if g is None:
                continue
            child = g.children[int(req.seed_offset)]
            lps = result.spec_logprobs.get(req.req_id) or ([result.logprobs[req.req_id]]
                                                           if req.req_id in result.logprobs else [])
            new = req.output_token_ids[child.num_tokens:]
            for i, token in enumerate(new):
                if child.logprobs is not None and i < len(lps):  # one per output token (a step may verify several)
                    child.logprobs.append(lps[i])
                child.num_tokens += 1
                delta = child.detok.add(token)
                if req.finished and i == len(new) - 1:  # text held back for an incomplete byte sequence is final now
                    delta += child.detok.flush()
                child.text += delta
                if self._stopped_by_string(child, g.params, delta):
                    if not req.finished:
                        stopped.append(req.req_id)
                    break  # tokens after the stop string (verified drafts of the same step) are not output
            if req.finished and child.finish_reason is None:
                child.finish_reason = req.finish_reason.value
                child.stop_reason = req.stop_reason
            touched[g.request_id] = g
        return [self._emit(g) for g in touched.values()], stopped

    @staticmethod
    def _stopped_by_string(child: _Child, params: SamplingParams, delta: str) -> bool:
        """Whether the text just added completes a stop string (then the child's text ends there)."""
        if not params.stop or child.finish_reason is not None or not delta:
            return False
        hit = find_stop(child.text, len(delta), params.stop)
        if hit is None:
            return False
        idx, stop = hit
        child.text = child.text[:idx + (len(stop) if params.include_stop_str_in_output else 0)]
        child.finish_reason, child.stop_reason = FinishReason.STOP.value, stop
        return True

    def fail(self, req_id: str, reason: FinishReason, error: str | None = None) -> RequestOutput | None:
        """End one child (abort / error); returns its group's output."""
        g = self.child_group.get(req_id)
        if g is None:
            return None
        child = next(c for c in g.children if c.req.req_id == req_id)
        if child.finish_reason is None:
            child.finish_reason = reason.value
        if error:
            g.error = error
        return self._emit(g)

    def _emit(self, g: _Group) -> RequestOutput:
        out = g.output()
        if out.finished:
            self.groups.pop(g.request_id, None)
            for c in g.children:
                self.child_group.pop(c.req.req_id, None)
        return out

    def carried(self, request_id: str) -> tuple[str | None, list[TokenLogprob] | None]:
        """An n = 1 request's prompt text and the logprobs of its output so far (what a migration carries)."""
        g = self.groups[request_id]
        logprobs = g.children[0].logprobs
        return g.prompt, list(logprobs) if logprobs is not None else None

    def drop(self, request_id: str) -> None:
        """Forget a request without an output (it moved to another engine, which streams it from here on)."""
        g = self.groups.pop(request_id, None)
        for c in g.children if g else ():
            self.child_group.pop(c.req.req_id, None)

    def children_of(self, request_id: str) -> list[str]:
        g = self.groups.get(request_id)
        return [c.req.req_id for c in g.children] if g else []
