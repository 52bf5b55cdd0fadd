"""The FastAPI app (build_app), the process around it (run_server) and its CLI flags (add_server_arguments).

    HTTP -> GuardMiddleware (API key, body size, UTF-8 / JSON) -> route -> Serving -> AsyncLLM (engine thread)

Lifecycle: uvicorn's graceful shutdown on SIGTERM/SIGINT stops accepting connections and waits for in-flight
responses (streams included) up to --request-timeout; then the lifespan hook drains the engine, and the process
exits 0. Slow clients: the connection protocol (timeouts.py) closes sockets past --header-timeout /
--body-timeout, and at shutdown the ones still sending a body."""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from ferry.errors import FerryError
from ferry.server.errors import ModelNotFound, ServerError, error_response
from ferry.server.lifecycle import ClientDisconnected
from ferry.server.metrics import CONTENT_TYPE, ServerMetrics
from ferry.server.middleware import GuardMiddleware
from ferry.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from ferry.server.serving import Serving
from ferry.server.webui import add_stats_stream, add_webui_routes
from ferry.server.timeouts import DEFAULT_BODY_TIMEOUT, DEFAULT_HEADER_TIMEOUT, read_deadline_protocol
from ferry.server.workers import DEFAULT_MAX_TOKENIZE_PENDING, TokenizerWork

if TYPE_CHECKING:
    from ferry.engine.async_engine import AsyncLLM

log = logging.getLogger("ferry.server")

DEFAULT_HOST = "127.0.0.1"  # loopback unless asked: an open port on a shared machine serves anyone
DEFAULT_PORT = 8000
DEFAULT_REQUEST_TIMEOUT = 600.0
DEFAULT_MAX_BODY_BYTES = 8 << 20

_ERRORS = {status: {"description": desc} for status, desc in (
    (400, "invalid request or context length exceeded"), (401, "missing or wrong API key"),
    (404, "unknown model"), (408, "request timeout"), (413, "body too large"), (429, "overloaded; retry later"),
    (500, "engine error"))}


def build_app(engine: "AsyncLLM", *, served_model_name: str | None = None, api_key: str | None = None,
              request_timeout: float = DEFAULT_REQUEST_TIMEOUT, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              shutdown_engine: bool = True, webui: bool = True, max_tokenize_pending: int = DEFAULT_MAX_TOKENIZE_PENDING,
              metrics_require_key: bool = False) -> FastAPI:
    """An OpenAI-compatible app over a running AsyncLLM. The engine's own --max-waiting bounds its queue (429s).
    shutdown_engine: drain and stop the engine when the app shuts down (its lifespan ends).
    webui: serve the web page at / and its engine feed /v1/stats/stream (ferry/server/webui.py)."""
    model_name = served_model_name or str(engine.model_config.path)
    metrics = ServerMetrics(engine.stats, model_name)
    tokenizer_work = TokenizerWork(max_pending=max_tokenize_pending)
    serving = Serving(engine, model_name, metrics, request_timeout, tokenizer_work)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if shutdown_engine:
            log.info("draining the engine (%d requests in flight)", engine.num_unfinished)
            await engine.shutdown(drain=True, timeout=request_timeout)

    app = FastAPI(title="ferry", summary="OpenAI-compatible LLM server", version=_version(), lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.serving = engine, metrics, serving

    # Exception itself is handled by Starlette's outermost middleware, which also logs the traceback: only
    # unexpected errors should get there.
    for exc_type in (ServerError, FerryError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_type, _handle)
    app.add_exception_handler(ClientDisconnected, _client_gone)
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, metrics=metrics,
                       metrics_require_key=metrics_require_key, tokenizer_work=tokenizer_work)

    @app.post("/v1/completions", responses=_ERRORS)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request.receive)

    @app.post("/v1/chat/completions", responses=_ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request.receive)

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "ferry",
                "root": str(engine.model_config.path), "max_model_len": engine.max_model_len}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses={404: _ERRORS[404]})
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != model_name:
            raise ModelNotFound(f"the model {model_id!r} does not exist; this server serves {model_name!r}")
        return model_card()

    @app.get("/health")
    async def health() -> Response:
        if not _engine_alive(engine):
            return JSONResponse({"status": "error", "detail": "the engine loop has stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/tokenize", responses=_ERRORS)
    async def tokenize(body: TokenizeRequest) -> Response:
        return await serving.tokenize(body)

    @app.post("/detokenize", responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return await serving.detokenize(body)

    if webui:
        add_webui_routes(app)
        add_stats_stream(app, engine, model_name)
    return app


async def _handle(_: Request, exc: Exception) -> Response:
    return error_response(exc)


async def _client_gone(_: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; nobody reads it


def _engine_alive(engine: "AsyncLLM") -> bool:
    return engine.is_alive()


def _version() -> str:
    from ferry import __version__
    return __version__


# -- the process ----------------------------------------------------------------------------------


def run_server(model: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, api_key: str | None = None,
               served_model_name: str | None = None, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
               webui: bool = True, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
               body_timeout: float = DEFAULT_BODY_TIMEOUT, max_tokenize_pending: int = DEFAULT_MAX_TOKENIZE_PENDING,
               metrics_require_key: bool = False, instances: int = 1, ray_address: str | None = None,
               migration_policy: str = "off", dispatch_policy: str = "cache-aware", **engine_options: Any) -> None:
    """Load the model, serve it until SIGTERM/SIGINT, drain in-flight requests, return."""
    import uvicorn

    from ferry.engine.async_engine import AsyncLLM

    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without --api-key: anyone who can reach this port can use the model", host)
    roles = engine_options.pop("instance_roles", None)
    if roles is not None:
        from ferry.engine.options import parse_instance_roles
        roles = parse_instance_roles(roles)
        instances = len(roles) if instances == 1 else instances
    if instances > 1 or ray_address is not None:
        from ferry.cluster.frontend import ClusterLLM
        engine = ClusterLLM(model, instances, engine_options, ray_address, migration_policy, roles, dispatch_policy)
    else:
        engine = AsyncLLM.from_options(model, **engine_options)
    app = build_app(engine, served_model_name=served_model_name or str(model), api_key=api_key,
                    request_timeout=request_timeout, webui=webui, max_tokenize_pending=max_tokenize_pending,
                    metrics_require_key=metrics_require_key)
    # The model, torch and transformers leave ~330k long-lived objects: every full collection walked them all
    # (~250 ms, with the GIL held, so /health and every stream paused). Frozen, they are skipped (as vLLM does).
    gc.collect()
    gc.freeze()
    if webui:
        log.info("web page at http://%s:%d/", host if host not in ("0.0.0.0", "::") else "127.0.0.1", port)
    # graceful shutdown waits for in-flight requests at most as long as one request may take
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_keep_alive=5,
                            http=read_deadline_protocol(header_timeout, body_timeout),
                            timeout_graceful_shutdown=max(1, math.ceil(request_timeout)))
    server = uvicorn.Server(config)
    app.state.stopping = lambda: server.should_exit  # ends the endless /v1/stats/stream feeds at SIGTERM
    with _sigterm_exits_cleanly():
        server.run()


@contextlib.contextmanager
def _sigterm_exits_cleanly() -> Iterator[None]:
    """uvicorn re-raises the SIGTERM it drained for once it is done, under the handler found at its start: with
    the default one the process dies by the signal (exit -15) after a clean drain. A no-op handler makes a drained
    SIGTERM a normal exit (code 0), which is what supervisors expect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST}, loopback only; "
                                                             "0.0.0.0 serves every interface)")
    group.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default: {DEFAULT_PORT})")
    group.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, "
                                                       "/detokenize (/health, /metrics, /docs, /openapi.json stay "
                                                       "open; see --metrics-require-key)")
    group.add_argument("--metrics-require-key", action="store_true",
                       help="with --api-key, require the key on /metrics, /docs, /redoc and /openapi.json too "
                            "(/health stays open for load-balancer probes)")
    group.add_argument("--served-model-name", default=None, help="the model name clients send (default: the MODEL "
                                                                 "argument as given)")
    group.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT,
                       help=f"seconds before a request is aborted, and the most SIGTERM waits for in-flight "
                            f"requests (default: {DEFAULT_REQUEST_TIMEOUT:g})")
    group.add_argument("--webui", default=True, action=argparse.BooleanOptionalAction,
                       help="serve the chat and engine page at / (default: on; --no-webui turns it off)")
    group.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                       help=f"seconds a client has to send a request's line and headers, from connecting (or its "
                            f"first byte, on a kept-alive connection); then the socket is closed "
                            f"(default: {DEFAULT_HEADER_TIMEOUT:g})")
    group.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT,
                       help=f"seconds a client has to send a request body once its headers are in; then the socket "
                            f"is closed (default: {DEFAULT_BODY_TIMEOUT:g})")
    group.add_argument("--instances", type=int, default=1,
                       help="engine instances behind this server, each with its own KV cache and --threads, run as "
                            "Ray actors (default: 1, no Ray); a request on an instance that dies resumes on another")
    group.add_argument("--ray-address", default=None,
                       help="with --instances: join this Ray cluster (auto, or HOST:PORT); default: a local Ray "
                            "started for this server")
    group.add_argument("--migration-policy", choices=("off", "balance"), default="off",
                       help="with --instances: balance moves a running request with its KV from the most to the "
                            "least loaded instance while it decodes (live migration) when they differ by 2 or more "
                            "requests (default: off)")
    group.add_argument("--dispatch-policy", choices=("cache-aware", "least-loaded"), default="cache-aware",
                       help="with --instances: cache-aware sends a request to the instance that saw the longest "
                            "prefix of its prompt unless it is much busier; least-loaded to the instance whose KV "
                            "its requests commit least (default: cache-aware)")
    group.add_argument("--max-tokenize-pending", type=int, default=DEFAULT_MAX_TOKENIZE_PENDING,
                       help=f"/tokenize and /detokenize calls in progress at most (one tokenizer thread runs them); "
                            f"more are refused with 429 (default: {DEFAULT_MAX_TOKENIZE_PENDING})")


def server_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"host": args.host, "port": args.port, "api_key": args.api_key, "served_model_name": args.served_model_name,
            "request_timeout": args.request_timeout, "webui": args.webui, "header_timeout": args.header_timeout,
            "body_timeout": args.body_timeout, "max_tokenize_pending": args.max_tokenize_pending,
            "metrics_require_key": args.metrics_require_key, "instances": args.instances,
            "ray_address": args.ray_address, "migration_policy": args.migration_policy,
            "dispatch_policy": args.dispatch_policy}
