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
        outs = [CompletionOutput(index=c.index, text=c.visible_text(self.params), token_ids=list(c.req.output_token_ids),
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

    def add(self, request_id: str, prompt: str | None, children: list[Request]) -> None:
        first = children[0]
        g = _Group(request_id, prompt, first.prompt_token_ids, first.params)
        if first.params.prompt_logprobs is not None:
            g.prompt_logprobs = [None] * len(first.prompt_token_ids)
        for i, req in enumerate(children):
            detok = IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.params.skip_special_tokens,
                                           continuation=True)  # " Paris", not "Paris", as vLLM
            g.children.append(_Child(i, req, detok, [] if req.params.logprobs is not None else None))
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
            delta = child.detok.add(req.output_token_ids[-1])
            if req.finished:  # text held back for an incomplete byte sequence is final now
                delta += child.detok.flush()
            child.text += delta
            if child.logprobs is not None and req.req_id in result.logprobs:
                child.logprobs.append(result.logprobs[req.req_id])
            if g.params.stop and child.finish_reason is None and delta:
                hit = find_stop(child.text, len(delta), g.params.stop)
                if hit is not None:
                    idx, stop = hit
                    child.text = child.text[:idx + (len(stop) if g.params.include_stop_str_in_output else 0)]
                    child.finish_reason, child.stop_reason = FinishReason.STOP.value, stop
                    if not req.finished:
                        stopped.append(req.req_id)
            if req.finished and child.finish_reason is None:
                child.finish_reason = req.finish_reason.value
                child.stop_reason = req.stop_reason
            touched[g.request_id] = g
        return [self._emit(g) for g in touched.values()], stopped

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

    def children_of(self, request_id: str) -> list[str]:
        g = self.groups.get(request_id)
        return [c.req.req_id for c in g.children] if g else []
