"""EngineInstance: one ferry engine (AsyncLLM: its own KV cache, threads and engine loop) inside a Ray actor
process. The front end streams a request's cumulative outputs from it (a Ray streaming generator), aborts it,
reads its stats, and drives live migrations through it (migration steps between two instances pass their KV blocks
through Ray's object store, never through the front end); it never sees the model."""
from __future__ import annotations

import os
from typing import Any, AsyncIterator

from ferry.engine.async_engine import AsyncLLM
from ferry.engine.inputs import ProcessedPrompt
from ferry.engine.migration import Handover
from ferry.engine.resume import Resume
from ferry.engine.stats import EngineStats
from ferry.request import RequestOutput


class EngineInstance:
    """Wrapped by ray.remote in frontend.py (this module imports no Ray: the engine side stays testable alone)."""

    def __init__(self, model: str, options: dict[str, Any]) -> None:
        self.llm = AsyncLLM.from_options(model, **options)

    def ready(self) -> dict[str, Any]:
        """What the front end needs to check prompts without the model (limits), to dispatch (the KV cache in
        tokens, its block size) and this process's pid."""
        block = self.llm.engine.config.cache.block_size
        return {"limits": self.llm.inputs.limits, "max_model_len": self.llm.max_model_len, "pid": os.getpid(),
                "kv_tokens": self.llm.stats().num_kv_blocks_total * block, "block_size": block}

    async def generate(self, request_id: str, prompt: ProcessedPrompt, priority: int,
                       resume: Resume | None, hold: bool = False) -> AsyncIterator[RequestOutput]:
        async for out in self.llm.generate(prompt, None, request_id, priority, resume=resume, hold=hold):
            yield out

    async def migration(self, op: str, *args: Any) -> Any:
        """One step of a live migration on this instance's engine (ferry/engine/migration.py, by name)."""
        return await self.llm.migration(op, *args)

    async def adopt(self, request_id: str, handover: Handover) -> AsyncIterator[RequestOutput | float]:
        """Start a request migrating in (its stop-and-copy); once it runs here yields the time (time.time()) the
        source stopped it (the front end then releases it on the source and times the pause), then its outputs as
        generate() does."""
        outputs = await self.llm.adopt(request_id, handover)
        yield handover.stopped_at
        async for out in outputs:
            yield out

    def abort(self, request_id: str) -> None:
        self.llm.abort(request_id)

    def stats(self) -> EngineStats:
        return self.llm.stats()

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        await self.llm.shutdown(drain, timeout)
