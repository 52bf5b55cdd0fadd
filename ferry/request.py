"""What a user asks for (SamplingParams), what the engine tracks (Request) and what it returns
(RequestOutput). Plain Python: no torch here."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from ferry.errors import InvalidRequest


@dataclass
class SamplingParams:
    """Sampling parameters with vLLM's / OpenAI's names. Validated on construction."""

    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    frequency_penalty: float = 0.0  # OpenAI semantics, over generated tokens
    repetition_penalty: float = 1.0  # HF/vLLM semantics, over prompt and generated tokens
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs to return per token (0: only the sampled one)
    prompt_logprobs: int | None = None  # same, for each prompt token (vLLM); disables prefix-cache hits
    skip_special_tokens: bool = True
    # ferry's: tokens this request's queries read under --kv-policy spans / shadow / layer-budget, as --kv-budget
    # (a fraction of the context <= 1, or tokens); None: the server's
    kv_budget: float | None = None

    MAX_LOGPROBS = 20

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        _check(_is_int(self.n) and self.n >= 1, f"n must be an integer >= 1, got {self.n!r}")
        _check(_is_num(self.temperature) and self.temperature >= 0,
               f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 or -1 disables it), got {self.top_k!r}")
        _check(_is_num(self.min_p) and 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_num(v) and -2 <= v <= 2, f"{name} must be in [-2, 2], got {v!r}")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        _check(self.seed is None or _is_int(self.seed), f"seed must be an integer or null, got {self.seed!r}")
        _check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
               f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        _check(_is_int(self.min_tokens) and self.min_tokens >= 0, f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            _check(v is None or (_is_int(v) and 0 <= v <= self.MAX_LOGPROBS),
                   f"{name} must be an integer in [0, {self.MAX_LOGPROBS}], got {v!r}")
        _check(self.kv_budget is None or (_is_num(self.kv_budget) and self.kv_budget > 0),
               f"kv_budget must be > 0 (a fraction of the context <= 1, or tokens), got {self.kv_budget!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop must be a list of non-empty strings")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be a list of token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidRequest(message)


class FinishReason(str, enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length reached
    ABORT = "abort"  # the client went away or asked to cancel
    ERROR = "error"  # the engine failed this request; RequestOutput.error says why


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after losing its KV (recomputed or swapped)
    MIGRATING = "migrating"  # out of the steps for a live migration's stop-and-copy; still holds its blocks
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence the scheduler tracks. A request with n > 1 is n of these (ids `<id>#<i>`)."""

    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 0  # the engine fills it; LENGTH once num_tokens reaches it
    priority: int = 0  # lower is served first by priority policies; FCFS ignores it
    user: str | None = None  # the client, for the fair policy's shares (the OpenAI request's `user`); None: shared
    seed_offset: int = 0  # child index of an n > 1 request, mixed into its seed
    # progress
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    swapped_block_ids: list[int] | None = None  # host blocks holding its KV while swapped out
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache at first schedule

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)  # prompt + output, appended in place

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)


@dataclass
class TokenLogprob:
    """Logprobs for one token (sampled, or given in the prompt) and the top-n alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort", "error" or None while running
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it


@dataclass
class RequestOutput:
    """What LLM.generate returns per prompt, and what streaming yields (cumulative)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # None for the first prompt token, as vLLM
