"""Live migration, the engine's half: a running request's KV blocks and state handed to another engine, between
steps (every method runs on the engine's thread: AsyncLLM's inbox, or a caller of LLMEngine.step).

Source: `export_full(rid, first)` copies the request's full blocks from table index `first` on while it keeps
decoding (a stage; a full block's KV never changes); `suspend(rid, first)` takes it out of the steps and returns a
`Handover`: the rest of its blocks (the last, partial one) and its state; then `release(rid)` (it runs elsewhere
now: blocks freed, no output) or `unsuspend(rid)` (called off: it runs here again, nothing lost).
Destination: `receive(rid, blocks)` reserves blocks (before anything is written) and writes a stage into them;
`adopt(rid, handover)` writes the rest and starts the request at its num_computed_tokens; `cancel(rid)` gives back
what a called-off migration reserved.

The adopted request decodes as if it had never moved: its KV is the source's bit for bit, its tokens, sampling
params and logprobs come along (Resume), and a seeded request's sampler continues at its position (one draw per
output token, ferry/sampling/sampler.py)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ferry.engine.inputs import ProcessedPrompt
from ferry.engine.output import OutputProcessor
from ferry.engine.parts import EngineParts
from ferry.engine.resume import Resume
from ferry.errors import FerryError
from ferry.request import FinishReason, Request, RequestStatus


class MigrationFailed(FerryError):
    """A migration step could not be done (the request is not migratable, ended, or the destination lacks room):
    the migration is called off and the request goes on where it was. side: which engine refused."""

    def __init__(self, message: str, side: str) -> None:
        super().__init__(message)
        self.side = side  # "source" or "destination"

    def __reduce__(self):  # pickled across processes (Ray) with its side
        return type(self), (str(self), self.side)


@dataclass(frozen=True)
class KVBlocks:
    """Blocks first .. first + num_blocks - 1 of a request's table: every block tensor the KV policy declares, as
    plain CPU tensors lead + (num_blocks,) + per_block (ferry/runner/kv/storage.py, export_blocks)."""

    first: int
    num_blocks: int
    data: dict[str, torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.data.values())


@dataclass(frozen=True)
class Handover:
    """What the stop-and-copy sends: the blocks after the stages' ones, and the request's whole state."""

    prompt: ProcessedPrompt
    priority: int
    carried: Resume  # the output so far (and its logprobs)
    num_computed_tokens: int  # tokens whose KV the blocks hold; the next step computes the rest
    num_cached_prompt_tokens: int
    blocks: KVBlocks
    stopped_at: float = 0.0  # time.time() when the source stopped the request: its downtime starts there


class Migrations:
    def __init__(self, parts: EngineParts, output: OutputProcessor) -> None:
        self.parts, self.output = parts, output
        self.block_size = parts.config.cache.block_size
        self._preemptions: dict[str, int] = {}  # request -> its preemptions when its first stage was copied
        self._held: set[str] = set()  # requests to stop once they have their first token (a prefill instance's)
        self._stopped: dict[str, float] = {}  # held requests stopped after their first token -> time.time() then

    # -- prefill/decode split ---------------------------------------------------------------------

    def hold_after_prompt(self, request_id: str) -> None:
        """Stop the request once its prompt is computed and its first token sampled (suspended, as for a
        stop-and-copy): a prefill instance hands it to a decode instance then, without decoding it."""
        self._held.add(request_id)

    def after_step(self, progressed: list[Request]) -> None:
        """Suspend the held requests that got their first token in this step (and did not finish with it)."""
        if not self._held:
            return
        live = self.parts.scheduler.requests.keys()
        self._held &= live  # forget those that ended before (aborted)
        self._stopped = {rid: t for rid, t in self._stopped.items() if rid in live}
        for req in progressed:
            if req.req_id in self._held:
                self._held.discard(req.req_id)
                if not req.finished:
                    self.parts.scheduler.suspend(req.req_id)
                    self._stopped[req.req_id] = time.time()

    # -- source -----------------------------------------------------------------------------------

    def export_full(self, request_id: str, first: int) -> KVBlocks:
        """The request's full blocks from table index `first` on; it keeps running."""
        req = self._migratable(request_id, first)
        return self._export(req, first, min(req.num_computed_tokens // self.block_size, len(self._table(req))))

    def suspend(self, request_id: str, first: int) -> Handover:
        """Stop the request (it keeps its blocks) and hand over its blocks from `first` on with its state (a
        request held after its prompt is already stopped)."""
        req = self._migratable(request_id, first, held=True)
        prompt_text, logprobs = self.output.carried(request_id)
        blocks = self._export(req, first, -(-req.num_computed_tokens // self.block_size))
        self.parts.scheduler.suspend(request_id)
        return Handover(ProcessedPrompt(prompt_text, list(req.prompt_token_ids), req.params), req.priority,
                        Resume(list(req.output_token_ids), logprobs), req.num_computed_tokens,
                        req.num_cached_prompt_tokens, blocks, self._stopped.pop(request_id, time.time()))

    def release(self, request_id: str) -> None:
        """The request runs on the destination now: its blocks are freed here, and it ends without an output."""
        self._preemptions.pop(request_id, None)
        self._held.discard(request_id)
        self._stopped.pop(request_id, None)
        self.parts.scheduler.finish(request_id, FinishReason.ABORT)
        self.output.drop(request_id)

    def unsuspend(self, request_id: str) -> bool:
        """Call the migration off: the request runs here again (False if it is not suspended, or ended)."""
        self._preemptions.pop(request_id, None)
        self._stopped.pop(request_id, None)
        return self.parts.scheduler.unsuspend(request_id)

    def _migratable(self, request_id: str, first: int, held: bool = False) -> Request:
        req = self.parts.scheduler.requests.get(request_id)
        ok = (RequestStatus.RUNNING, RequestStatus.MIGRATING) if held else (RequestStatus.RUNNING,)
        if req is None or req.status not in ok:
            raise MigrationFailed(f"request {request_id!r} is not running here", "source")
        if req.params.n != 1 or req.params.prompt_logprobs is not None:
            raise MigrationFailed("only a request with n=1 and no prompt_logprobs can migrate", "source")
        if self.parts.speculator is not None:
            raise MigrationFailed("requests do not migrate under speculative decoding (the draft state stays)",
                                  "source")
        if any(b < 0 for b in self._table(req)):
            raise MigrationFailed(f"request {request_id!r} has blocks in the slow tier or compacted away "
                                  f"(--kv-policy {self.parts.kv.policy.name}): only device blocks migrate", "source")
        if first == 0:
            self._preemptions[request_id] = req.num_preemptions
        elif self._preemptions.get(request_id) != req.num_preemptions:  # its KV was recomputed: stages are stale
            raise MigrationFailed(f"request {request_id!r} was preempted during its migration", "source")
        return req

    def _table(self, req: Request) -> list[int]:
        return self.parts.kv.block_table(req)

    def _export(self, req: Request, first: int, stop: int) -> KVBlocks:
        ids = self._table(req)[first:stop]
        return KVBlocks(first, len(ids), self.parts.storage.export_blocks(ids))

    # -- destination ------------------------------------------------------------------------------

    def receive(self, request_id: str, blocks: KVBlocks) -> int:
        """Reserve blocks.num_blocks fresh blocks for the request and write the stage into them; returns the number
        of its blocks held here. MigrationFailed (nothing reserved by this call) when they are not free."""
        if request_id in self.output.groups or request_id in self.parts.scheduler.requests:
            raise MigrationFailed(f"request id {request_id!r} is already in use on the destination", "destination")
        held = len(self.parts.kv.block_tables.get(request_id, ()))
        if held != blocks.first:
            raise MigrationFailed(f"blocks from {blocks.first} arrived for {request_id!r}, which holds {held} here",
                                  "destination")
        table = self.parts.kv.reserve(request_id, blocks.num_blocks)
        if table is None:
            raise MigrationFailed(f"the destination has {self.parts.kv.pool.num_free} free KV blocks; "
                                  f"{request_id!r} needs {blocks.num_blocks} more", "destination")
        self.parts.storage.import_blocks(table[blocks.first:], blocks.data)
        return len(table)

    def adopt(self, request_id: str, handover: Handover) -> None:
        """Write the last blocks and start the request here, at its num_computed_tokens. On failure everything
        reserved for it is given back (the source still holds it)."""
        try:
            self._adopt(request_id, handover)
        except BaseException:
            self.cancel(request_id)
            raise

    def _adopt(self, request_id: str, h: Handover) -> None:
        held = self.receive(request_id, h.blocks)
        if held != -(-h.num_computed_tokens // self.block_size):
            raise MigrationFailed(f"{held} blocks arrived for {h.num_computed_tokens} computed tokens", "destination")
        params, ids = h.prompt.params, h.prompt.prompt_token_ids
        h.carried.check(params, len(ids), self.parts.max_model_len)
        req = Request(req_id=request_id, prompt_token_ids=ids, params=params, arrival_time=time.monotonic(),
                      eos_token_ids=self.parts.eos_token_ids, max_model_len=self.parts.max_model_len,
                      priority=h.priority)
        for token in h.carried.output_token_ids:
            req.append_output(token)
        req.num_computed_tokens = h.num_computed_tokens
        req.num_cached_prompt_tokens = h.num_cached_prompt_tokens
        self.output.add(request_id, h.prompt.prompt, [req], h.carried.logprobs)
        self.parts.scheduler.adopt(req)

    def cancel(self, request_id: str) -> None:
        """Give back the blocks reserved for a migration that was called off (nothing if none, or adopted)."""
        if request_id not in self.parts.scheduler.requests:
            self.parts.kv.free_table(request_id)
