"""The request path between the front end and one engine instance: a TCP connection of its own, beside Ray.

Ray starts, places, watches and restarts the instances, and carries the rare calls (stats, migration steps, whose
KV blocks travel through its object store); the per-token path does not go through it. A Ray streaming generator
costs about 3 ms per request to submit and 3 ms per output item to stream back (a task spec, a gRPC report per
item, two hops from Ray's threads to the caller's event loop: bench/cluster_ttft.py measures it); this link costs
well under 1 ms both ways. It is how vLLM's engine cores talk to their front end even when Ray runs them
(vllm/v1/engine/utils.py: Ray actors, ZMQ sockets).

- Front end -> instance: ("generate", request_id, prompt, priority, resume, hold) and ("abort", request_id).
- Instance -> front end: (request_id, kind, value), kind "out" (a RequestOutput), "end" (the stream ended without a
  finished output: the request migrated away) or "err" (the exception that ended it).

A frame is a 4-byte length and a pickled list of messages; the instance sends every output ready at the same time
(one engine step's) in one frame. The connection opens with a secret both sides got through Ray: the instance
unpickles nothing before it, and takes one connection only. When the connection breaks (the instance's process
died) every stream open on it raises InstanceDied. The instance's side is
instance.py's InstanceServer."""
from __future__ import annotations

import asyncio
import pickle
import socket
import struct
import threading
from typing import Any, AsyncIterator

from ferry.errors import FerryError, InvalidRequest
from ferry.request import RequestOutput

HEADER = struct.Struct("!I")  # a frame's length in bytes
TOKEN_BYTES = 16


class InstanceDied(FerryError):
    """The connection to an instance broke: its process died (or the network between them failed)."""


def encode(messages: list[tuple]) -> bytes:
    body = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(body)) + body


class Stream:
    """One request's messages from one instance, in order (an async iterator of its RequestOutputs). Made by
    InstanceLink.open before the request is sent, so nothing the instance sends is missed."""

    def __init__(self, link: "InstanceLink", request_id: str) -> None:
        self.link, self.request_id = link, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.moved_away = False  # it ended with "end": the instance released it (nothing there to abort)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                kind, value = await self.queue.get()
                if kind == "out":
                    yield value
                    if value.finished:
                        return
                elif kind == "end":
                    self.moved_away = True
                    return
                else:  # "err", or the link's InstanceDied
                    raise value
        finally:
            self.close()

    def close(self) -> None:
        """Stop receiving (what the instance still sends for this request is dropped)."""
        self.link.forget(self)


class InstanceLink:
    """The front end's side: a blocking socket, written under a lock from any thread or event loop (messages are
    small; the instance reads them as they come), and read by a thread that hands each message to its stream's
    event loop."""

    def __init__(self, address: tuple[str, int], token: bytes, name: str) -> None:
        self._sock = socket.create_connection(address, timeout=30)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.settimeout(None)
        self._sock.sendall(token)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._streams: dict[str, Stream] = {}
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}
        self.closed: InstanceDied | None = None
        self._reader = threading.Thread(target=self._read, name=f"ferry-link-{name}", daemon=True)
        self._reader.start()

    def open(self, request_id: str) -> Stream:
        """Register request_id's stream (in the calling event loop) before anything about it is sent."""
        stream = Stream(self, request_id)
        with self._lock:
            if self.closed is not None:
                raise self.closed
            if request_id in self._streams:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._loops[request_id] = asyncio.get_running_loop()
        return stream

    def forget(self, stream: Stream) -> None:
        with self._lock:
            if self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]
                del self._loops[stream.request_id]

    def send(self, *message: Any) -> None:
        """Raises InstanceDied when the connection is down."""
        data = encode([message])
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError as e:
            self.close(f"sending to the instance failed: {e}")
        if self.closed is not None:
            raise self.closed

    def abort(self, request_id: str) -> None:
        """Best effort: an instance that is gone holds nothing any more."""
        try:
            self.send("abort", request_id)
        except InstanceDied:
            pass

    def close(self, reason: str = "closed by the front end") -> None:
        """Every stream still open raises InstanceDied (once); the socket closes."""
        with self._lock:
            if self.closed is not None:
                return
            self.closed = InstanceDied(f"engine instance link: {reason}")
            pending = [(self._loops[rid], s.queue, ("err", self.closed)) for rid, s in self._streams.items()]
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        _hand(pending)

    def _read(self) -> None:
        f = self._sock.makefile("rb")
        try:
            while True:
                header = f.read(HEADER.size)
                if len(header) < HEADER.size:
                    break
                body = f.read(HEADER.unpack(header)[0])
                batch = []
                with self._lock:
                    for rid, kind, value in pickle.loads(body):
                        stream = self._streams.get(rid)
                        if stream is not None:
                            batch.append((self._loops[rid], stream.queue, (kind, value)))
                _hand(batch)
        except (OSError, ValueError, EOFError, pickle.UnpicklingError):
            pass
        self.close("the connection closed (the instance's process died?)")


def _hand(items: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, tuple]]) -> None:
    """Put each item in its queue, one wake-up per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for loop, q, item in items:
        by_loop.setdefault(loop, []).append((q, item))
    for loop, puts in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, puts)
        except RuntimeError:  # that event loop is closed: nobody reads those streams any more
            pass


def _put_all(puts: list[tuple[asyncio.Queue, tuple]]) -> None:
    for q, item in puts:
        q.put_nowait(item)
