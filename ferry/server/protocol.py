"""Request bodies of the OpenAI-compatible API (pydantic), and their conversion to SamplingParams.

Only shapes and sizes are checked here; the ranges of sampling values are SamplingParams' job (one place),
so a bad temperature and a bad top_p get the same kind of message whichever API they came through.
Response bodies are plain dicts built in serving.py / streaming.py (cheaper per streamed token)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from ferry.engine.inputs import sampling_params
from ferry.request import SamplingParams

MAX_N = 16  # completions per prompt
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_STOP = 16  # stop strings
MAX_STOP_CHARS = 256  # characters per stop string
MAX_STOP_TOKEN_IDS = 256
MAX_PROMPT_CHARS = 1 << 20  # text of one prompt or of all chat messages together
MAX_PROMPT_TOKENS = 1 << 20  # a prompt given as token ids (the context length is checked later)
MAX_MESSAGES = 4096
MAX_TOP_LOGPROBS = SamplingParams.MAX_LOGPROBS
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1
TOKEN_ID_MAX = (1 << 31) - 1  # a vocabulary check follows; this only keeps the ints small


def _valid_unicode(text: str) -> str:
    """JSON can carry lone surrogates (\\ud800) that are not Unicode; no tokenizer takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains {text[e.start]!r} at position {e.start}, which is not valid Unicode "
                         f"(a lone UTF-16 surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]
PromptText = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(_valid_unicode)]
StopText = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS), AfterValidator(_valid_unicode)]
TEMPERATURE_MAX = 2.0  # OpenAI's range is [0, 2]; the offline LLM takes any temperature >= 0
TokenId = Annotated[StrictInt, Field(ge=0, le=TOKEN_ID_MAX)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]


class _Body(BaseModel):
    # Unknown fields are ignored (clients send many optional ones); known-but-unsupported ones are refused.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions (OpenAI's names, plus vLLM's extensions)."""

    model: Text | None = None  # None or the served name; anything else is a 404
    stream: StrictBool = False  # strict: "yes" or 1 is a 400 naming the field, not True
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=MAX_N)  # strict: 2.0 is a 400, as OpenAI
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP)] | None = None
    seed: StrictInt | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    temperature: float | None = Field(None, le=TEMPERATURE_MAX)  # None: 1.0, as OpenAI; < 0 is SamplingParams'
    # (one message for both APIs)
    top_p: float | None = None
    top_k: StrictInt | None = Field(None, ge=-1, le=TOKEN_ID_MAX)
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: StrictBool = False
    min_tokens: StrictInt = Field(0, ge=0, le=TOKEN_ID_MAX)
    skip_special_tokens: StrictBool = True
    include_stop_str_in_output: StrictBool = False
    priority: StrictInt = Field(0, ge=-(1 << 31), le=(1 << 31) - 1)  # lower first, with --scheduling-policy priority
    kv_budget: float | None = None  # ferry's: this request's --kv-budget (spans, shadow, layer-budget)
    user: Text | None = None  # the client: --scheduling-policy fair shares tokens between clients
    logit_bias: dict[str, float] | None = None  # refused when non-empty
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N)  # only best_of == n is accepted

    @model_validator(mode="after")
    def _unsupported(self) -> "_Sampling":
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of ({self.best_of}) different from n ({self.n}) is not supported")
        return self

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        defaults: dict[str, Any] | None = None) -> SamplingParams:
        """SamplingParams of this request; fields left unset take defaults (the checkpoint's
        generation_config.json); raises InvalidRequest on out-of-range values."""
        kw: dict[str, Any] = {name: value for name in (
            "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
            "repetition_penalty", "seed", "kv_budget") if (value := getattr(self, name)) is not None}
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return sampling_params(dict(
            kw, n=self.n, stop=stop, stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            max_tokens=max_tokens, min_tokens=self.min_tokens, logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens, include_stop_str_in_output=self.include_stop_str_in_output),
            defaults)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: PromptText | TokenIds | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_PROMPTS)] \
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: StrictInt | None = Field(16, ge=1, le=TOKEN_ID_MAX)  # OpenAI's default; None: the rest of the context
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False  # refused when true (needs prompt logprobs)
    suffix: Text | None = None  # refused when set

    @model_validator(mode="after")
    def _completion_unsupported(self) -> "CompletionRequest":
        if self.echo:
            raise ValueError("echo is not supported by this server")
        if self.suffix:
            raise ValueError("suffix is not supported by this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (a single prompt is a list of one)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: StrictInt | None = Field(None, ge=1, le=TOKEN_ID_MAX)  # None: the rest of the context
    max_completion_tokens: StrictInt | None = Field(None, ge=1, le=TOKEN_ID_MAX)  # OpenAI's newer name; wins
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: StrictBool = True
    tools: list[Any] | None = None  # refused when non-empty
    response_format: dict[str, Any] | None = None  # only {"type": "text"}

    @model_validator(mode="after")
    def _chat_unsupported(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tools:
            raise ValueError("tools are not supported by this server")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise ValueError(f"response_format {self.response_format.get('type')!r} is not supported; only 'text'")
        if sum(len(m.text()) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold more than {MAX_PROMPT_CHARS} characters")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them: role + plain-string content (text parts joined)."""
        out = []
        for m in self.messages:
            msg = {"role": m.role, "content": m.text()}
            if m.name is not None:
                msg["name"] = m.name
            out.append(msg)
        return out


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a text prompt, or chat messages rendered with the chat template."""

    model: Text | None = None
    prompt: PromptText | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    add_generation_prompt: StrictBool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt (text) or messages (chat)")
        return self


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: Annotated[list[TokenId], Field(max_length=MAX_PROMPT_TOKENS)]
