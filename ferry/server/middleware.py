"""The guard in front of every route (plain ASGI, so it runs before FastAPI touches the body):

1. API key: with --api-key, /v1/* /tokenize /detokenize need `Authorization: Bearer KEY` (401 otherwise); with
   --metrics-require-key too, /metrics /docs /redoc /openapi.json need it as well (/health never does).
2. Body: POST bodies larger than max_body_bytes are refused with 413 before they are read whole; a body that
   is not UTF-8, not JSON or not a JSON object is a 400 that says where it breaks. A body that parses is
   passed on as application/json whatever its Content-Type (curl -d sends form encoding by default).
3. /tokenize and /detokenize: 429 before the body is read when the tokenizer pool is full.
4. Counts responses by status for /metrics.
"""
from __future__ import annotations

import json
import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ferry.errors import Overloaded
from ferry.server.errors import BadRequest, PayloadTooLarge, ServerError, Unauthorized, error_response
from ferry.server.metrics import ServerMetrics
from ferry.server.workers import TokenizerWork

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
# open without a key unless --metrics-require-key: what the server runs and how busy it is, and the API's schema.
# /health stays open in every case: load balancers probe it without credentials and it tells only "ok".
INTROSPECTION_PREFIXES = ("/metrics", "/docs", "/redoc", "/openapi.json")
JSON_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"})
TOKENIZER_ROUTES = frozenset({"/tokenize", "/detokenize"})  # run on the bounded tokenizer pool


# Below Python's own 4,300-digit conversion limit; shorter integers reach the fields, which name their own range
MAX_INT_DIGITS = 4000

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: maybe a lone surrogate


def _check_unicode(value: object, path: str) -> None:
    """JSON can escape lone UTF-16 surrogates that are not Unicode; pydantic would answer "no accepted form
    matches" without saying where. Raises BadRequest naming the field and the position."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRequest(f"{path or 'the body'}: contains {value[e.start]!r} at position {e.start}, which is not "
                             f"valid Unicode (a lone UTF-16 surrogate)", param=path or None) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, path)
            _check_unicode(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_unicode(v, f"{path}.{i}")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _parse_int(digits: str) -> int:
    """Refuses integers no field could take before Python converts them: past 4,300 digits its own error
    ("Exceeds the limit ... use sys.set_int_max_str_digits()") would reach the client."""
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"the integer {digits[:12]}... has {len(digits.lstrip('-'))} digits; no field takes more "
                         f"than {MAX_INT_DIGITS}")
    return int(digits)


def parse_json_body(body: bytes) -> None:
    """Raises BadRequest with a precise message when the body is not a UTF-8 JSON object."""
    if not body.strip():
        raise BadRequest("the request body is empty; send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"the request body is not valid UTF-8: byte 0x{body[e.start]:02x} at offset {e.start} "
                         f"({e.reason})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_int=_parse_int)
    except json.JSONDecodeError as e:
        raise BadRequest(f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno} "
                         f"(offset {e.pos})") from None
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"the request body is not usable JSON: {e}") from None
    if _SURROGATE_ESCAPE.search(text):
        _check_unicode(value, "")
    if not isinstance(value, dict):
        raise BadRequest(f"the request body must be a JSON object, got a JSON {_JSON_TYPES.get(type(value), 'value')} "
                         f"(Python {type(value).__name__})")


class GuardMiddleware:
    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, metrics: ServerMetrics,
                 metrics_require_key: bool = False, tokenizer_work: TokenizerWork | None = None) -> None:
        self.app = app
        self.tokenizer_work = tokenizer_work
        self.api_key = api_key
        self.protected = PROTECTED_PREFIXES + (INTROSPECTION_PREFIXES if metrics_require_key else ())
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.responses.labels(str(message["status"])).inc()
            await send(message)

        try:
            self._check_key(scope)
            if scope["method"] == "POST" and scope["path"] in JSON_ROUTES:
                if self.tokenizer_work is not None and scope["path"] in TOKENIZER_ROUTES:
                    self.tokenizer_work.check()
                body = await self._read_body(scope, receive)
                if body is None:
                    return  # the client went away (or its body deadline passed) mid-body: nobody to answer
                parse_json_body(body)
                scope = _as_json(scope)
                receive = _replay(body, receive)
        except (ServerError, Overloaded) as e:
            await error_response(e)(scope, receive, counting_send)
            return
        await self.app(scope, receive, counting_send)

    def _check_key(self, scope: Scope) -> None:
        if self.api_key is None or not scope["path"].startswith(self.protected):
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
        if not secrets.compare_digest(token.strip().encode("utf-8", "replace"), self.api_key.encode("utf-8")):
            raise Unauthorized("incorrect API key")

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"the request body has {int(declared)} bytes; this server takes at most {limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the request body exceeds {limit} bytes, the most this server takes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _as_json(scope: Scope) -> Scope:
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    headers.append((b"content-type", b"application/json"))
    return {**scope, "headers": headers}


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands out the already-read body once, then the real one (which reports disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
