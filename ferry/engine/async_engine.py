"""AsyncLLM: the engine loop on its own thread, driven from asyncio (the server's interface).

HTTP handlers never run model code: they put commands (typed: AddRequest, Abort, Wake, Migrate) into an inbox; the
loop thread applies them between steps, runs steps, and hands each output to the request's asyncio queue with
call_soon_threadsafe. Prompts are encoded and validated by the input processor in a worker thread before they
are queued, and never again. A request that migrates away (ferry/engine/migration.py) ends its stream here without
a last output; one that migrates in is streamed from adopt()."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ferry.engine.engine import LLMEngine
from ferry.engine.inputs import ProcessedPrompt, PromptInput
from ferry.engine.migration import Handover
from ferry.engine.resume import Resume
from ferry.engine.stats import EngineStats
from ferry.errors import InvalidRequest, Overloaded
from ferry.request import RequestOutput, SamplingParams

log = logging.getLogger("ferry")


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt: ProcessedPrompt
    priority: int = 0
    resume: Resume | None = None
    hold: bool = False  # stop it after its first token, for a decode instance to adopt (prefill/decode split)


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Wake:
    """Nothing to do: wakes the loop so it sees a shutdown."""


@dataclass(frozen=True)
class Migrate:
    """One step of a live migration (a method of ferry/engine/migration.py's Migrations, by name), run between
    engine steps; its result or error goes to reply."""
    op: str
    args: tuple
    reply: concurrent.futures.Future


class Moved:
    """Delivered to a request's stream when it migrated away: the stream ends without a last output."""


MIGRATION_OPS = ("export_full", "suspend", "release", "unsuspend", "receive", "adopt", "cancel")
Command = AddRequest | Abort | Wake | Migrate


class AsyncLLM:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.inputs = engine.inputs  # stateless: safe to use from any thread
        self._inbox: queue.Queue[Command] = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._not_started: set[str] = set()  # accepted, no output yet: what --max-waiting bounds
        self._stats = engine.stats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="ferry-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_options(cls, model: str, **options) -> "AsyncLLM":
        from ferry.engine.options import engine_config
        return cls(LLMEngine.from_config(engine_config(model, **options)))

    # -- asyncio side -----------------------------------------------------------------------------

    async def process(self, prompt: PromptInput, params: SamplingParams | None = None,
                      fit_max_tokens: bool = False) -> ProcessedPrompt:
        """The input processor's verdict (InputProcessor.process), off the event loop: tokenizing a long prompt
        takes a while."""
        return await asyncio.to_thread(self.inputs.process, prompt, params, fit_max_tokens)

    async def generate(self, prompt: PromptInput | ProcessedPrompt, params: SamplingParams | None, request_id: str,
                       priority: int = 0, resume: Resume | None = None,
                       hold: bool = False) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs of one request; the last has finished=True. Raises InvalidRequest /
        ContextLengthExceeded / Overloaded before the first output. Closing the iterator early aborts it.
        A ProcessedPrompt (from process(), which the server calls first) carries its params: pass None.
        resume: tokens the request already produced elsewhere (LLMEngine.add_processed). hold: stop it once it has
        its first token (a prefill instance's; the front end then hands it to a decode instance)."""
        if self._stop.is_set():
            raise Overloaded("the engine is shutting down")
        if not isinstance(prompt, ProcessedPrompt):
            prompt = await self.process(prompt, params)
        elif params is not None and params is not prompt.params:
            raise InvalidRequest("a processed prompt carries its own SamplingParams; pass params=None")
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            self._admit()
            loop, q = asyncio.get_running_loop(), asyncio.Queue()
            self._streams[request_id] = (loop, q)
            self._not_started.add(request_id)
        self._inbox.put(AddRequest(request_id, prompt, priority, resume, hold))
        async for out in self._outputs(request_id, q):
            yield out

    async def _outputs(self, request_id: str, q: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        ended = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, Moved):
                    ended = True
                    return
                yield item
                if item.finished:
                    ended = True
                    return
        finally:
            if not ended:
                self.abort(request_id)
            with self._lock:
                self._streams.pop(request_id, None)
                self._not_started.discard(request_id)

    async def migration(self, op: str, *args: Any) -> Any:
        """Run one step of a live migration on the engine thread, between steps (Migrations.<op>(*args))."""
        if op not in MIGRATION_OPS or op == "adopt":
            raise InvalidRequest(f"unknown migration step {op!r} (adopt() starts an adopted request's stream)")
        reply: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(Migrate(op, args, reply))
        return await asyncio.wrap_future(reply)

    async def adopt(self, request_id: str, handover: Handover) -> AsyncIterator[RequestOutput]:
        """Start a request handed over by another engine (its stop-and-copy) and return its stream, which goes on
        as generate()'s would have. Raises (nothing kept here) when it cannot be adopted."""
        with self._lock:
            if request_id in self._streams:
                raise InvalidRequest(f"request id {request_id!r} is already in use")
            q: asyncio.Queue = asyncio.Queue()
            self._streams[request_id] = (asyncio.get_running_loop(), q)
        reply: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(Migrate("adopt", (request_id, handover), reply))
        try:
            await asyncio.wrap_future(reply)
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        return self._outputs(request_id, q)

    def _admit(self) -> None:
        """Raises Overloaded when one more request would wait beyond --max-waiting. Only requests that really
        wait count: of the accepted ones with no output yet, as many as there are free running slots
        (--max-num-seqs minus the started ones) are about to run, so a burst fills the free slots first.
        Called with the lock held."""
        cfg = self.engine.config.scheduler
        started = len(self._streams) - len(self._not_started)
        free_slots = max(0, cfg.max_num_seqs - started)
        waiting = max(0, len(self._not_started) - free_slots)
        if waiting >= cfg.max_waiting:
            raise Overloaded(f"{waiting} requests are waiting (max {cfg.max_waiting}) and all "
                             f"{cfg.max_num_seqs} running slots are taken; retry later")

    def abort(self, request_id: str) -> None:
        self._inbox.put(Abort(request_id))

    def stats(self) -> EngineStats:
        return self._stats

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; with drain, let the running ones finish first."""
        self._stop.set()
        self._inbox.put(Wake())
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._streams)

    # -- engine thread ----------------------------------------------------------------------------

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            target = self._streams.get(request_id)
            self._not_started.discard(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _apply(self, cmd: Command) -> None:
        match cmd:
            case AddRequest(rid, prompt, priority, resume, hold):
                try:
                    self.engine.add_processed(rid, prompt, priority, resume=resume)
                except Exception as e:
                    self._deliver(rid, e)
                    return
                if hold:
                    self.engine.migration.hold_after_prompt(rid)
            case Abort(rid):
                out = self.engine.abort_request(rid)
                if out is not None:
                    self._deliver(rid, out)
            case Migrate(op, args, reply):
                try:
                    result = getattr(self.engine.migration, op)(*args)
                except Exception as e:
                    reply.set_exception(e)
                    return
                if op == "release":
                    self._deliver(args[0], Moved())
                reply.set_result(result)
            case Wake():
                pass

    def _loop(self) -> None:
        while True:
            block = not self.engine.has_unfinished()
            if block and self._stop.is_set():
                self.engine.close()
                break
            try:
                cmd = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
                self._apply(cmd)
                while True:
                    self._apply(self._inbox.get_nowait())
            except queue.Empty:
                pass
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception:  # the engine itself is broken: fail everyone rather than hang
                    log.exception("engine loop failed")
                    outputs = self.engine.fail_all("internal engine error")
                for out in outputs:
                    self._deliver(out.request_id, out)
            self._stats = self.engine.stats()
