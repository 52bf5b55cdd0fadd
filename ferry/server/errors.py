"""Every error the server returns goes through error_response(): OpenAI's shape
`{"error": {"message", "type", "param", "code"}}` with the status code that fits.

    400 invalid request / context length · 401 missing or wrong API key · 404 unknown model or route
    408 request timeout · 413 body too large · 429 overloaded (with Retry-After) · 500 engine error
"""
from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ferry.errors import ContextLengthExceeded, InvalidRequest, Overloaded, RequestFailed

log = logging.getLogger("ferry.server")

RETRY_AFTER_SECONDS = 1


class ServerError(Exception):
    """An error raised by the HTTP layer itself (not by the engine)."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class BadRequest(ServerError):
    pass


class Unauthorized(ServerError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class ModelNotFound(ServerError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RequestTimeout(ServerError):
    status, type, code = 408, "timeout_error", "request_timeout"


class PayloadTooLarge(ServerError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: BaseException) -> JSONResponse:
    """The one mapping from an exception to an OpenAI-style error response."""
    headers: dict[str, str] = {}
    param = None
    code: str | int | None = None
    if isinstance(exc, ServerError):
        status, type_, message, param, code = exc.status, exc.type, str(exc), exc.param, exc.code
    elif isinstance(exc, RequestValidationError):
        status, type_ = 400, "invalid_request_error"
        message, param = _validation_message(exc)
    elif isinstance(exc, ContextLengthExceeded):
        status, type_, message, code = 400, "invalid_request_error", str(exc), "context_length_exceeded"
    elif isinstance(exc, InvalidRequest):
        status, type_, message = 400, "invalid_request_error", str(exc)
        param = _param_of(message)
    elif isinstance(exc, Overloaded):
        status, type_, message, code = 429, "rate_limit_error", str(exc), "overloaded"
        headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
    elif isinstance(exc, HTTPException):
        status, message = exc.status_code, str(exc.detail)
        type_ = "invalid_request_error" if status < 500 else "server_error"
        headers.update(exc.headers or {})
    elif isinstance(exc, RequestFailed):
        status, type_, message = 500, "server_error", f"the engine failed this request: {exc}"
    else:
        log.error("unexpected error while serving a request", exc_info=exc)
        status, type_, message = 500, "server_error", f"internal error: {type(exc).__name__}: {exc}"
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """'messages.0.role: Input should be ...' per failing field; param is the first field's path. A field of
    several accepted forms (prompt: text, token ids, lists of either) fails once per form; they are grouped."""
    by_field: dict[str, list[str]] = {}
    ours: dict[str, list[str]] = {}  # our own validators' messages (value_error): the precise ones
    for err in exc.errors():
        # pydantic names union branches in the path (e.g. 'str', 'list[int]'); they only confuse users
        loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _is_type_name(str(x))]
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        by_field.setdefault(".".join(loc), [])
        if msg not in by_field[".".join(loc)]:
            by_field[".".join(loc)].append(msg)
        if err.get("type") == "value_error":
            ours.setdefault(".".join(loc), []).append(msg)
    parts = []
    for where, msgs in list(by_field.items())[:3]:
        # a text with a lone surrogate fails the text form with a position, and the token-id forms with noise
        msgs = ours.get(where, msgs)
        text = msgs[0] if len(msgs) == 1 else "no accepted form matches (" + "; ".join(msgs[:4]) + ")"
        parts.append(f"{where}: {text}" if where else text)
    if len(by_field) > 3:
        parts.append(f"and {len(by_field) - 3} more field(s)")
    param = next((w for w in by_field if w), None)
    return "invalid request: " + "; ".join(parts), param


def _is_type_name(part: str) -> bool:
    return part in ("str", "int", "float", "bool", "list", "dict", "none") or "[" in part or part.startswith(
        ("function-", "constrained-", "json-"))


_PARAMS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "seed", "max_tokens", "min_tokens", "logprobs", "stop", "stop_token_ids")


def _param_of(message: str) -> str | None:
    """SamplingParams messages start with the field's name ('top_p must be in (0, 1], got 5')."""
    if message.startswith("prompt token ids"):
        return "prompt"
    first = message.split(" ", 1)[0]
    return first if first in _PARAMS else None
