"""Read deadlines for slow or stalled clients: uvicorn's h11 protocol with a header timeout and a body timeout.

uvicorn bounds only the idle time between requests (timeout_keep_alive, cancelled by any byte received) and the
header size (h11's incomplete-event limit). A client sending headers one byte at a time, or declaring 1,000 body
bytes and sending 13, kept its socket (and, for the body, a handler parked in `receive()`) forever, and held
SIGTERM's graceful shutdown for the whole --request-timeout. Here:

- the header clock starts when the connection opens (or the next request's first byte arrives) and stops when
  the request line and headers are complete; the body clock starts then and stops at the body's end;
- past either deadline the socket is closed: the handler's `receive()` reports http.disconnect, so it ends;
- on graceful shutdown a request still sending its body is closed at once (uvicorn would wait for it).
"""
from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("ferry.server")

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0


class ReadDeadlineProtocol(H11Protocol):
    """H11Protocol with per-phase read deadlines; header_timeout / body_timeout are set by read_deadline_protocol."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None  # "headers" | "body" | None: what the client owes us now
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._enter("headers")

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        self._enter(None)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """Graceful shutdown: a request whose body never fully arrived will not be answered; close it now."""
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self._enter(None)
            self.transport.close()
            return
        super().shutdown()

    def _track(self) -> None:
        if self.transport.is_closing():
            self._enter(None)
            return
        state = self.conn.their_state
        if state is h11.IDLE and (self.conn.trailing_data[0] or self._phase == "headers"):
            self._enter("headers")  # a request begun (or a fresh connection): keep the running clock
        elif state is h11.SEND_BODY:
            self._enter("body")
        else:
            self._enter(None)  # a full request is in, or the keep-alive timer owns the idle socket

    def _enter(self, phase: str | None) -> None:
        if phase == self._phase:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None:
            timeout = self.header_timeout if phase == "headers" else self.body_timeout
            self._deadline = self.loop.call_later(timeout, self._expire, phase, timeout)

    def _expire(self, phase: str, timeout: float) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        where = "%s:%d" % self.client if self.client else "a client"
        log.info("closing the connection from %s: request %s not received within %g s", where, phase, timeout)
        self._phase = None
        self.transport.close()


def read_deadline_protocol(header_timeout: float, body_timeout: float) -> type[ReadDeadlineProtocol]:
    """The protocol class to pass as uvicorn.Config(http=...), with these deadlines (seconds)."""
    return type("ReadDeadlineProtocol", (ReadDeadlineProtocol,),
                {"header_timeout": header_timeout, "body_timeout": body_timeout})
