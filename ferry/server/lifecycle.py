"""A request's life on the asyncio side: merge the engine streams of its prompts, and stop them all as soon as the
client goes away.

Stopping = closing the engine's async generators: AsyncLLM.generate aborts its request when closed before
the end, and the engine frees the request's KV blocks at its next loop iteration. Starlette's own
StreamingResponse only cancels the task that iterates the body on disconnect, which leaves a generator parked
at a `yield` unclosed until garbage collection; so the response class here closes its body explicitly."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncGenerator, AsyncIterator, Awaitable, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from ferry.request import RequestOutput

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client closed its connection before the response was complete."""


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(aw: Awaitable[T], receive: Receive) -> T:
    """The result of `aw`, unless the client disconnects first: then `aw` is cancelled (its generators see the
    cancellation and close) and ClientDisconnected is raised."""
    work = asyncio.ensure_future(aw)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
        watch.cancel()
        with contextlib.suppress(BaseException):
            await watch
    if work.cancelled():
        raise ClientDisconnected()
    return work.result()


async def merge_outputs(streams: list[AsyncIterator[RequestOutput]]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """(stream index, output) from several engine streams as they arrive. An exception in one stream (e.g.
    Overloaded for the 3rd prompt) propagates; closing the merge closes (aborts) every stream."""
    pending: dict[asyncio.Future, int] = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in sorted(done, key=pending.__getitem__):
                i = pending.pop(fut)
                try:
                    out = fut.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for fut in pending:
            fut.cancel()
        for fut in pending:
            with contextlib.suppress(BaseException):
                await fut
        for s in streams:
            with contextlib.suppress(BaseException):
                await s.aclose()  # type: ignore[attr-defined]


class EventStreamResponse(Response):
    """Server-sent events from an async generator of str; the generator is closed (so the engine requests are
    aborted) as soon as the client disconnects, whether the body is waiting on the engine or on the socket."""

    media_type = "text/event-stream"

    def __init__(self, body: AsyncGenerator[str, None], headers: dict[str, str] | None = None) -> None:
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk.encode("utf-8"), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await until_disconnect(stream(), receive)
        except (ClientDisconnected, OSError):
            pass
        finally:
            await self.body_iterator.aclose()
