"""The engine's edge: what a caller gives (text, token ids, chat messages, with SamplingParams) becomes a
`ProcessedPrompt` (validated token ids and params) here, once, whichever way it came in (`LLM`, `AsyncLLM`, the
HTTP server). Every rule about prompts lives here: tokenization, the vocabulary, the context length (and,
for OpenAI's API, whether max_tokens fits it), logprobs and kv_budget against what this engine runs, and the
checkpoint's sampling defaults (generation_config.json) under what a request leaves unset (issue 24: greedy
chat looped; like vLLM's `--generation-config auto`, explicit values always win).

Torch-free and stateless past construction (it reads only immutable engine facts), so the server runs it in
a worker thread while the engine thread steps."""
from __future__ import annotations

import json
import math
import pathlib
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ferry.errors import ContextLengthExceeded, InvalidRequest
from ferry.request import SamplingParams

# A token covers at most this many characters (a generous bound: BPE vocabularies' longest tokens are runs of
# spaces or dashes of 16-32). A text longer than max_model_len times this cannot fit the context, so it is refused
# before tokenizing: tokenizing 300k characters to refuse them after was a flood's lever (issue 23).
MAX_CHARS_PER_TOKEN = 64

# "text" | [token ids] | {"prompt": text} | {"prompt_token_ids": [...], "prompt"?: text}
# | {"messages": [{"role", "content"}...], "add_generation_prompt"?: bool}; any dict may name its client: "user"?: str
PromptInput = str | list[int] | dict[str, Any]


class PromptTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class ProcessedPrompt:
    """A prompt that passed every check: the engine queues it without looking at it again. Made only by
    `InputProcessor.process`."""

    prompt: str | None  # the text, when the caller gave text
    prompt_token_ids: list[int]
    params: SamplingParams
    user: str | None = None  # the client (the fair policy's key; OpenAI's `user`)


@dataclass(frozen=True)
class InputLimits:
    """The engine facts the rules need (fixed at start)."""

    max_model_len: int  # prompt + generated tokens
    vocab_size: int
    kv_policy: str  # the --kv-policy the engine runs
    kv_budget_policies: tuple[str, ...]  # the policies that serve a request's own kv_budget


class InputProcessor:
    def __init__(self, tokenizer: PromptTokenizer, limits: InputLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        # the checkpoint's generation_config.json sampling values, for requests that leave them unset
        self.sampling_defaults = load_sampling_defaults(getattr(tokenizer, "folder", None))

    def process(self, prompt: PromptInput, params: SamplingParams | None = None,
                fit_max_tokens: bool = False) -> ProcessedPrompt:
        """Encode and validate. With fit_max_tokens (OpenAI's rule, the server's), prompt + max_tokens must fit
        the context and max_tokens None becomes the room left; without it, generation stops at the context."""
        params = params or SamplingParams()
        text, ids = self.encode(prompt)
        room = self.check_context(len(ids))
        if fit_max_tokens:
            params = replace(params, max_tokens=self.fit_max_tokens(len(ids), room, params.max_tokens))
        self.check_params(params)
        return ProcessedPrompt(text, ids, params, _user(prompt))

    # -- prompts ----------------------------------------------------------------------------------

    def encode(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt in any of PromptInput's forms."""
        text = None
        if isinstance(prompt, dict):
            if "messages" in prompt:
                return None, self.render_chat(prompt["messages"], prompt.get("add_generation_prompt", True))
            if "prompt_token_ids" in prompt:
                text = prompt.get("prompt")  # the text, when the caller already tokenized it
                prompt = prompt["prompt_token_ids"]
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidRequest("a prompt dict needs a 'prompt' (text), 'prompt_token_ids' (list of ints) or "
                                     "'messages' (chat) key")
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("the prompt is empty; give at least one character or token")
            self.check_text_size(len(prompt))
            return prompt, list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple)) or not all(_is_int(t) for t in prompt):
            raise InvalidRequest(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        self.check_token_ids(prompt, "prompt token ids")
        return text if isinstance(text, str) else None, list(prompt)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of chat messages through the model's chat template (InvalidRequest when it has none, or
        when it rejects the messages)."""
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt))

    def check_token_ids(self, ids: list[int] | tuple[int, ...], what: str = "token ids") -> None:
        vocab = self.limits.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"{what} {bad[:5]} are outside the vocabulary [0, {vocab})")

    # -- the context ------------------------------------------------------------------------------

    def check_text_size(self, num_chars: int) -> None:
        """Refuses, before tokenizing, a text too long to fit the context whatever its tokens."""
        max_len = self.limits.max_model_len
        if num_chars > max_len * MAX_CHARS_PER_TOKEN:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {max_len} tokens, but the prompt has {num_chars} "
                f"characters, more than {max_len} tokens can hold ({MAX_CHARS_PER_TOKEN} characters per token at "
                f"most); shorten the prompt")

    def check_context(self, num_prompt_tokens: int) -> int:
        """Tokens left to generate after the prompt (at least one, else the prompt is refused)."""
        n, max_len = num_prompt_tokens, self.limits.max_model_len
        if n == 0:
            raise InvalidRequest("the prompt is empty; give at least one token")
        if n >= max_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {max_len} tokens, but the prompt has {n} tokens: the "
                f"context holds the prompt plus at least one generated token; shorten the prompt, or raise "
                f"--max-model-len / --kv-cache-memory if the model allows")
        return max_len - n

    def fit_max_tokens(self, num_prompt_tokens: int, room: int, max_tokens: int | None) -> int:
        """max_tokens when prompt + max_tokens fits the context (as vLLM's server, rather than silently
        generating less); None means the rest of the context."""
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.limits.max_model_len} tokens, but "
                f"{num_prompt_tokens + max_tokens} were requested ({num_prompt_tokens} in the prompt, {max_tokens} "
                f"in max_tokens); lower max_tokens to at most {room} or shorten the prompt")
        return max_tokens

    # -- sampling parameters against this engine --------------------------------------------------

    def check_params(self, params: SamplingParams) -> None:
        """What SamplingParams cannot check alone: limits of this model and engine."""
        vocab = self.limits.vocab_size
        if params.logprobs is not None and params.logprobs > vocab:
            raise InvalidRequest(f"logprobs={params.logprobs} exceeds the vocabulary size {vocab}")
        bad_stops = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad_stops:
            raise InvalidRequest(f"stop_token_ids {bad_stops[:5]} are outside the vocabulary [0, {vocab})")
        if params.kv_budget is not None and self.limits.kv_policy not in self.limits.kv_budget_policies:
            raise InvalidRequest(f"kv_budget applies to servers run with --kv-policy "
                                 f"{', '.join(self.limits.kv_budget_policies)}; this one runs "
                                 f"{self.limits.kv_policy}: leave kv_budget out")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- the checkpoint's sampling defaults (generation_config.json) ------------------------------------

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def load_sampling_defaults(folder: str | pathlib.Path | None) -> dict[str, Any]:
    """The sampling keys of folder/generation_config.json that are numbers; {} when there is no such file.
    A file that cannot be read is ignored for sampling (the tokenizer reports it when it reads eos ids)."""
    if folder is None:
        return {}
    path = pathlib.Path(folder) / "generation_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for key in SAMPLING_KEYS:
        value = data.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = int(value) if key == "top_k" else float(value)
    return out


def sampling_params(explicit: dict[str, Any], defaults: dict[str, Any] | None = None) -> SamplingParams:
    """SamplingParams from what the caller set (a key absent is unset; a sampling key set to None too) over
    the checkpoint's defaults, over SamplingParams' own. Raises InvalidRequest on out-of-range values."""
    kw = {k: v for k, v in (defaults or {}).items() if k in SAMPLING_KEYS}
    kw.update({k: v for k, v in explicit.items() if not (k in SAMPLING_KEYS and v is None)})
    return SamplingParams(**kw)


def _user(prompt: PromptInput) -> str | None:
    """The client a prompt dict names under "user" (the fair scheduling policy's key), None when it names none."""
    user = prompt.get("user") if isinstance(prompt, dict) else None
    if user is not None and not isinstance(user, str):
        raise InvalidRequest(f"a prompt's 'user' must be a string (the client's name), got {type(user).__name__}")
    return user
