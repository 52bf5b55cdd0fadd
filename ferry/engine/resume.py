"""Resume: a request carried over from another engine (an instance that died, or one that handed it over), with
the tokens it already produced. The engine recomputes prompt + those tokens (as after a preemption) and goes on;
everything that depends on the output so far (penalties, min_tokens, max_tokens, stop strings, the seeded
sampler's position in its stream, the text) sees the carried tokens as its own, so the output is the one an
uninterrupted run gives."""
from __future__ import annotations

from dataclasses import dataclass, field

from ferry.errors import InvalidRequest
from ferry.request import SamplingParams, TokenLogprob


@dataclass(frozen=True)
class Resume:
    output_token_ids: list[int]
    logprobs: list[TokenLogprob] | None = field(default=None)  # one per carried token, when the request asks for them

    def check(self, params: SamplingParams, num_prompt_tokens: int, max_model_len: int) -> None:
        """InvalidRequest when the carried tokens cannot continue this request."""
        n = len(self.output_token_ids)
        if params.n != 1:
            raise InvalidRequest(f"only a request with n=1 can be resumed (this one has n={params.n})")
        if params.max_tokens is not None and n >= params.max_tokens:
            raise InvalidRequest(f"the request already has {n} tokens of its max_tokens={params.max_tokens}: "
                                 f"nothing is left to generate")
        if num_prompt_tokens + n >= max_model_len:
            raise InvalidRequest(f"prompt + carried output ({num_prompt_tokens} + {n} tokens) leave no room in "
                                 f"the context of {max_model_len}")
        if params.logprobs is not None and (self.logprobs is None or len(self.logprobs) != n):
            raise InvalidRequest(f"the request asks for logprobs: carry one per output token ({n}), got "
                                 f"{0 if self.logprobs is None else len(self.logprobs)}")
