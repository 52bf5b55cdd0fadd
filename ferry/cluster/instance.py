"""EngineInstance: one ferry engine (AsyncLLM: its own KV cache, threads and engine loop) inside a Ray actor
process. Its requests come and their outputs go over the front end's own connection to it (link.py; the instance's
side, InstanceServer, is here), on a thread and event loop of its own, so a request's path never waits on Ray; Ray
carries the rest: start, stats, and the steps of live migrations (their KV blocks pass through Ray's object store
between two instances, never through the front end). It never sees the model."""
from __future__ import annotations

import asyncio
import hmac
import os
import pickle
import socket
import threading
from typing import Any, AsyncIterator

from ferry.cluster.link import HEADER, TOKEN_BYTES, encode
from ferry.engine.async_engine import AsyncLLM
from ferry.engine.migration import Handover
from ferry.engine.stats import EngineStats
from ferry.errors import RequestFailed
from ferry.request import RequestOutput

ACCEPT_TIMEOUT = 10.0  # seconds a connection has to present the token


class EngineInstance:
    """Wrapped by ray.remote in frontend.py (this module imports Ray only to learn its node's address)."""

    def __init__(self, model: str, options: dict[str, Any], token: bytes) -> None:
        self.llm = AsyncLLM.from_options(model, **options)
        self.server = InstanceServer(self.llm, token, _node_ip())

    def ready(self) -> dict[str, Any]:
        """What the front end needs to check prompts without the model (limits), to dispatch (the KV cache in
        tokens, its block size), to connect (the link's address) and this process's pid."""
        block = self.llm.engine.config.cache.block_size
        return {"limits": self.llm.inputs.limits, "max_model_len": self.llm.max_model_len, "pid": os.getpid(),
                "kv_tokens": self.llm.stats().num_kv_blocks_total * block, "block_size": block,
                "address": self.server.address}

    async def migration(self, op: str, *args: Any) -> Any:
        """One step of a live migration on this instance's engine (ferry/engine/migration.py, by name)."""
        return await self.llm.migration(op, *args)

    async def adopt(self, request_id: str, handover: Handover) -> float:
        """Start a request migrating in (its stop-and-copy); once it runs here, returns the time (time.time()) the
        source stopped it (the front end then releases it on the source and times the pause). Its outputs follow
        on the link, where the front end opened its stream before this call."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            self.server.adopt(request_id, handover), self.server.loop))

    def stats(self) -> EngineStats:
        return self.llm.stats()

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        await self.llm.shutdown(drain, timeout)
        self.server.close()


class InstanceServer:
    """The instance's side of link.py: takes the front end's one connection (the first that opens with the token),
    runs the requests it sends and streams their outputs back, every output ready at once in one frame."""

    def __init__(self, llm: AsyncLLM, token: bytes, host: str) -> None:
        self.llm, self._token = llm, token
        self._listener = socket.create_server((host, 0))
        self.address = (host, self._listener.getsockname()[1])
        self.loop = asyncio.new_event_loop()
        self._outbox: list[tuple] = []
        self._writer: asyncio.StreamWriter | None = None
        self._pumps: set[asyncio.Task] = set()
        threading.Thread(target=self.loop.run_forever, name="ferry-link", daemon=True).start()
        self._serving = asyncio.run_coroutine_threadsafe(self._serve(), self.loop)

    def close(self) -> None:
        """Close the link (from any thread): the front end's streams still open on it raise InstanceDied."""
        self.loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        if self._writer is None:  # not connected yet
            self._serving.cancel()
        else:
            self._writer.close()

    async def adopt(self, request_id: str, handover: Handover) -> float:
        self._start(request_id, await self.llm.adopt(request_id, handover))
        return handover.stopped_at

    async def _serve(self) -> None:
        try:
            conn = await self._accept()
        finally:
            self._listener.close()  # one front end only
        reader, self._writer = await asyncio.open_connection(sock=conn)
        try:
            while True:
                size = HEADER.unpack(await reader.readexactly(HEADER.size))[0]
                for message in pickle.loads(await reader.readexactly(size)):
                    self._apply(message)
        except (asyncio.IncompleteReadError, OSError):
            pass  # the front end went away (or close()): its requests end here too
        self._writer.close()
        for task in list(self._pumps):
            task.cancel()

    async def _accept(self) -> socket.socket:
        """The first connection that opens with the token; others are closed before anything of theirs is read
        further (nothing is unpickled before the token)."""
        loop = asyncio.get_running_loop()
        self._listener.setblocking(False)
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            try:
                got = await asyncio.wait_for(_recv_exactly(loop, conn, TOKEN_BYTES), ACCEPT_TIMEOUT)
            except (asyncio.TimeoutError, OSError):
                got = b""
            except BaseException:
                conn.close()
                raise
            if hmac.compare_digest(got, self._token):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return conn
            conn.close()

    def _apply(self, message: tuple) -> None:
        op, request_id, *args = message
        if op == "generate":
            prompt, priority, resume, hold = args
            self._start(request_id, self.llm.generate(prompt, None, request_id, priority, resume=resume, hold=hold))
        elif op == "abort":
            self.llm.abort(request_id)

    def _start(self, request_id: str, outputs: AsyncIterator[RequestOutput]) -> None:
        task = self.loop.create_task(self._pump(request_id, outputs))
        self._pumps.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(self._pumps.discard)

    async def _pump(self, request_id: str, outputs: AsyncIterator[RequestOutput]) -> None:
        finished = False
        try:
            async for out in outputs:
                finished = out.finished
                self._post((request_id, "out", out))
        except Exception as e:  # the engine refused it (its own error) or failed
            self._post((request_id, "err", _sendable(e)))
            return
        if not finished:  # it migrated away
            self._post((request_id, "end", None))

    def _post(self, message: tuple) -> None:
        """Queue a message; the frame goes once every output of this round of the loop is in (one engine step's
        outputs arrive together)."""
        if not self._outbox:
            self.loop.call_soon(self._flush)
        self._outbox.append(message)

    def _flush(self) -> None:
        messages, self._outbox = self._outbox, []
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode(messages))


async def _recv_exactly(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = await loop.sock_recv(conn, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _sendable(e: Exception) -> Exception:
    """e itself if it crosses the link intact, else a RequestFailed that names it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RequestFailed(f"{type(e).__name__}: {e}")


def _node_ip() -> str:
    """The address other nodes of the Ray cluster reach this one at."""
    try:
        from ray.util import get_node_ip_address
    except ImportError:  # this module run without Ray
        return "127.0.0.1"
    return get_node_ip_address()
