"""The only contract between the scheduler and the runner. Plain data, no torch.

StepPlan: what to compute this step (scheduler -> runner).
StepResult: what came out (runner -> scheduler).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ferry.request import SamplingParams, TokenLogprob


@dataclass
class ScheduledReq:
    req_id: str
    token_ids: list[int]  # the tokens whose KV this step computes (a prefill chunk, or one decode token)
    start_pos: int  # position of token_ids[0] = the request's num_computed_tokens before this step
    # the request's whole block table, covering start_pos + len(token_ids): device blocks, and (KV policies with a
    # slow tier) host block h as -1 - h for spans gone cold; this step's new tokens always land in device blocks
    block_ids: list[int]
    sample: bool  # True when this step reaches the end of the known tokens: sample the next one
    params: SamplingParams
    all_token_ids: list[int]  # prompt + output so far (read-only; penalties and seeds need it)
    num_prompt_tokens: int
    seed_offset: int = 0  # child index of an n > 1 request, mixed into its seed


@dataclass
class StepPlan:
    reqs: list[ScheduledReq] = field(default_factory=list)  # prefill chunks and decodes, mixed
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, host block): copy before the forward
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (host block, device block): copy before the forward
    finished_req_ids: list[str] = field(default_factory=list)  # the runner drops per-request state (seeded generators)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.reqs)

    @property
    def empty(self) -> bool:
        return not self.reqs and not self.swap_out and not self.swap_in


@dataclass
class StepResult:
    sampled_token_ids: dict[str, int] = field(default_factory=dict)  # req_id -> new token, for reqs with sample=True
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)  # req_id -> logprobs, when params.logprobs is set
    # req_id -> (position of the first scored token, logprobs), when params.prompt_logprobs is set
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprob]]] = field(default_factory=dict)
