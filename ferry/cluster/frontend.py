"""ClusterLLM: N engine instances (Ray actors, each an EngineInstance with its own KV cache and threads) behind
the surface the server uses from AsyncLLM (process, generate, abort, stats, is_alive, shutdown, inputs,
tokenizer), so `ferry serve --instances N` runs the same server code as one instance.

- Prompts are encoded and checked here (the tokenizer and the instances' limits; no model in this process).
- Requests go to an instance and their outputs come back over the front end's own connection to it (link.py),
  not through Ray: Ray starts, watches and restarts the instances and carries stats and migration steps.
- Dispatch (dispatch.py): `cache-aware` (default) sends a request where the longest prefix of its prompt went
  before unless that instance is much more loaded, `least-loaded` to the instance whose KV its requests commit
  least (tokens held and prompt tokens to compute, from the front end's own view).
- Losing an instance: a request whose instance dies (killed, out of memory) resumes on another from the tokens it
  already streamed (ferry/engine/resume.py: the output is the one it would have had); a request that cannot be
  resumed (n > 1) ends with an explicit error. The dead instance is started again in the background.
- Live migration (migration.py): migrate() moves a running request with its KV to another instance while it
  decodes; the client's stream goes on from the destination (outputs are cumulative: nothing repeated, nothing
  lost). Policies (policies.py): --migration-policy balance moves a request from the instance whose KV is
  most committed (the load dispatch reads) to the least when that one is short of KV and they differ enough; drain() moves every request off an instance (scale-in)."""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, AsyncIterator

from ferry.cluster.dispatch import DISPATCH_POLICIES, Candidate, PrefixIndex, pick_instance
from ferry.cluster.instance import EngineInstance
from ferry.cluster.link import TOKEN_BYTES, InstanceDied, InstanceLink, Stream
from ferry.cluster.migration import Moved
from ferry.cluster.moves import ClusterMoves
from ferry.config import ModelConfig
from ferry.engine.inputs import InputProcessor, ProcessedPrompt, PromptInput
from ferry.engine.resume import Resume
from ferry.engine.stats import EngineStats, InstanceLoad, MigrationStats
from ferry.errors import InvalidRequest, Overloaded, RequestFailed
from ferry.request import RequestOutput, SamplingParams
from ferry.tokenizer import Tokenizer

log = logging.getLogger("ferry")

STATS_INTERVAL = 1.0  # seconds between reads of the instances' stats
MIGRATION_POLICIES = ("off", "balance")


@dataclass
class _Slot:
    index: int
    actor: Any  # a Ray actor handle of EngineInstance
    pid: int
    link: InstanceLink  # requests and their outputs
    in_flight: int = 0
    alive: bool = True
    restarts: int = 0
    draining: bool = False  # drain(): no new requests
    role: str = "both"  # with --instance-roles: prefill (prompts, then hands each request over) or decode
    capacity_tokens: int = 1  # its KV cache, in tokens
    prefixes: PrefixIndex | None = None  # what prompts were sent here (cache-aware dispatch)


@dataclass
class _Tracked:
    """A request the front end streams: where it runs now and how far it is."""

    slot: _Slot
    prompt: ProcessedPrompt
    num_output_tokens: int = 0


def _ray():
    try:
        import ray
    except ImportError:
        raise InvalidRequest("--instances above 1 runs the instances on Ray, which is not installed: "
                             "pip install ray (or run with --instances 1)") from None
    return ray


class ClusterLLM(ClusterMoves):
    def __init__(self, model: str, instances: int, options: dict[str, Any], ray_address: str | None = None,
                 migration_policy: str = "off", roles: tuple[str, ...] | None = None,
                 dispatch_policy: str = "cache-aware") -> None:
        """roles: one per instance (--instance-roles, options.parse_instance_roles): prefill or decode."""
        if dispatch_policy not in DISPATCH_POLICIES:
            raise InvalidRequest(f"--dispatch-policy {dispatch_policy!r}: choose one of {DISPATCH_POLICIES}")
        if instances < 1:
            raise InvalidRequest(f"--instances {instances}: give 1 or more")
        if roles is not None and len(roles) != instances:
            raise InvalidRequest(f"--instance-roles names {len(roles)} instances and --instances is {instances}: "
                                 f"give the same number, or leave --instances out")
        if migration_policy not in MIGRATION_POLICIES:
            raise InvalidRequest(f"--migration-policy {migration_policy!r}: choose one of {MIGRATION_POLICIES}")
        ray = _ray()
        self._ray, self._model, self._options = ray, model, options
        self._own_ray = not ray.is_initialized()
        self.ray_memory_bytes: int | None = None  # what the local Ray this front end started takes (None: joined)
        if self._own_ray:
            try:
                ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except Exception as e:  # a bad --ray-address, or Ray cannot start here
                raise InvalidRequest(f"Ray did not start (--ray-address {ray_address or 'local'}): {e}") from None
            self.ray_memory_bytes = _ray_memory()
            log.info("started a local Ray (dashboard off): its processes take %.0f MiB (proportional set size)",
                     self.ray_memory_bytes / 2**20)
        self._remote = ray.remote(num_cpus=0, max_restarts=0)(EngineInstance)
        self._died = (ray.exceptions.RayActorError, InstanceDied)  # what a dead instance raises here
        self._token = secrets.token_bytes(TOKEN_BYTES)  # the links' secret, given to the instances through Ray
        self.tokenizer = Tokenizer.load(model)
        self.model_config = ModelConfig.from_hf(model)
        actors = [self._remote.remote(model, options, self._token) for _ in range(instances)]
        infos = ray.get([a.ready.remote() for a in actors])  # raises the first instance's load error
        self.max_model_len = infos[0]["max_model_len"]
        self.inputs = InputProcessor(self.tokenizer, infos[0]["limits"])
        self._slots = [_Slot(i, a, info["pid"], InstanceLink(info["address"], self._token, str(i)),
                             role=roles[i] if roles else "both", capacity_tokens=info["kv_tokens"],
                             prefixes=PrefixIndex(info["block_size"]))
                       for i, (a, info) in enumerate(zip(actors, infos))]
        self._dispatch_policy = dispatch_policy
        self._unfinished = 0
        self._stopping = threading.Event()
        self._stats = EngineStats()
        self._migration_policy = migration_policy
        self._migrations = MigrationStats()
        self._tracked: dict[str, _Tracked] = {}
        self._moved: dict[str, tuple[_Slot, Moved]] = {}  # migrated, not yet followed by its stream
        self._migrating: set[str] = set()
        self._balancer: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()
        self._poller = threading.Thread(target=self._poll_stats, name="ferry-cluster-stats", daemon=True)
        self._poller.start()
        log.info("cluster of %d instances on Ray (pids %s)", instances, [s.pid for s in self._slots])

    # -- the server's side ------------------------------------------------------------------------

    async def process(self, prompt: PromptInput, params: SamplingParams | None = None,
                      fit_max_tokens: bool = False) -> ProcessedPrompt:
        return await asyncio.to_thread(self.inputs.process, prompt, params, fit_max_tokens)

    async def generate(self, prompt: PromptInput | ProcessedPrompt, params: SamplingParams | None, request_id: str,
                       priority: int = 0) -> AsyncIterator[RequestOutput]:
        """As AsyncLLM.generate; a request on an instance that dies goes on on another one."""
        if self._stopping.is_set():
            raise Overloaded("the server is shutting down")
        if not isinstance(prompt, ProcessedPrompt):
            prompt = await self.process(prompt, params)
        if self._migration_policy == "balance" and self._balancer is None:
            self._balancer = asyncio.create_task(self._balance())
        last: RequestOutput | None = None
        self._unfinished += 1
        try:
            for _ in range(len(self._slots) + 1):
                slot = self._pick(prompt.prompt_token_ids, new=last is None)
                tracked = self._tracked[request_id] = _Tracked(slot, prompt)
                try:
                    async for out in self._follow(tracked, request_id, priority, self._carry(prompt, last)):
                        last = out
                        yield out
                    return
                except self._died:
                    slot = tracked.slot
                    self._lost(slot)
                    if prompt.params.n != 1:
                        raise RequestFailed(f"engine instance {slot.index} died while running this request (n > 1 "
                                            f"cannot be resumed on another instance)") from None
                    log.warning("instance %d died: request %s resumes on another one with %d tokens", slot.index,
                                request_id, len(last.outputs[0].token_ids) if last else 0)
            raise RequestFailed("every engine instance died while running this request")
        finally:
            self._unfinished -= 1
            self._tracked.pop(request_id, None)
            moved = self._moved.pop(request_id, None)
            if moved is not None:  # migrated while its client went away
                moved[1].stream.close()
                moved[0].link.abort(request_id)

    def abort(self, request_id: str) -> None:
        for slot in self._slots:  # cheap, and the front end need not track where a request runs for this
            if slot.alive:
                slot.link.abort(request_id)

    def stats(self) -> EngineStats:
        return self._stats

    def is_alive(self) -> bool:
        return any(s.alive for s in self._slots)

    @property
    def num_unfinished(self) -> int:
        return self._unfinished

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        self._stopping.set()
        calls = [s.actor.shutdown.remote(drain, timeout) for s in self._slots if s.alive]
        try:
            await asyncio.gather(*calls, return_exceptions=True)
        finally:
            for s in self._slots:
                s.link.close()
            if self._own_ray:
                self._ray.shutdown()

    # -- instances --------------------------------------------------------------------------------

    async def _follow(self, tracked: _Tracked, request_id: str, priority: int,
                      resume: Resume | None) -> AsyncIterator[RequestOutput]:
        """The request's outputs from its instance, and from each instance it migrates to after that."""
        slot = tracked.slot
        hold = slot.role == "prefill" and tracked.prompt.params.n == 1  # it stops after its first token
        gen = slot.link.open(request_id)
        try:
            slot.link.send("generate", request_id, tracked.prompt, priority, resume, hold)
        except BaseException:
            gen.close()
            raise
        stopped_at = None
        while True:
            finished = False
            try:
                async for out in self._stream(slot, request_id, gen):
                    if stopped_at is not None:  # the first token from the migration's destination
                        self._migrations.downtime.observe(time.time() - stopped_at)
                        stopped_at = None
                    finished = out.finished
                    tracked.num_output_tokens = len(out.outputs[0].token_ids)
                    if hold and not finished and tracked.num_output_tokens:
                        hold = False
                        task = asyncio.create_task(self._hand_over(request_id, slot))
                        self._background.add(task)  # held until done (the loop keeps only weak references)
                        task.add_done_callback(self._background.discard)
                    yield out
            except self._died:
                if request_id not in self._moved:  # it had moved on just before its source died
                    raise
                self._lost(slot)
            if finished:
                return
            moved = self._moved.pop(request_id, None)
            if moved is None:
                raise RequestFailed(f"engine instance {slot.index} ended the request without finishing it")
            slot, gen, stopped_at = moved[0], moved[1].stream, moved[1].stopped_at
            tracked.slot = slot

    async def _stream(self, slot: _Slot, request_id: str, gen: Stream) -> AsyncIterator[RequestOutput]:
        """The request's outputs from one instance (the engine's own error, if it refused it, is raised as is)."""
        slot.in_flight += 1
        finished = False
        try:
            async for out in gen:
                finished = out.finished
                yield out
        finally:
            gen.close()
            slot.in_flight -= 1
            if not finished and not gen.moved_away and slot.alive:  # its client left, or it failed
                slot.link.abort(request_id)

    @staticmethod
    def _carry(prompt: ProcessedPrompt, last: RequestOutput | None) -> Resume | None:
        if last is None or not last.outputs[0].token_ids:
            return None
        c = last.outputs[0]
        return Resume(list(c.token_ids), list(c.logprobs) if prompt.params.logprobs is not None else None)

    def _pick(self, prompt: list[int], new: bool) -> _Slot:
        """A new request's instance (a prefill one under --instance-roles), or a resumed one's (a decoding one), by
        the dispatch policy; the prompt is remembered there (cache-aware dispatch)."""
        roles = ("prefill", "both") if new else ("decode", "both")
        live = [s for s in self._slots if s.alive and not s.draining and s.role in roles]
        live = live or [s for s in self._slots if s.alive and not s.draining]
        if not live:
            raise Overloaded("no engine instance is running (they are being restarted); retry later")
        load = self._kv_tokens(live)
        index = pick_instance([Candidate(s.index, load[s.index], s.capacity_tokens, s.prefixes.match(prompt),
                                         s.in_flight) for s in live], self._dispatch_policy)
        slot = self._slots[index]
        slot.prefixes.add(prompt)
        return slot

    def _kv_tokens(self, slots: list[_Slot]) -> dict[int, int]:
        """KV tokens each instance's requests hold or will (prompt + output so far; a queued prompt counts whole):
        the load both dispatch and the balance policy read."""
        load = {s.index: 0 for s in slots}
        for t in self._tracked.values():
            if t.slot.index in load:
                load[t.slot.index] += len(t.prompt.prompt_token_ids) + t.num_output_tokens
        return load

    def _lost(self, slot: _Slot) -> None:
        """Mark the instance dead (once) and start a new one in its place in the background."""
        if not slot.alive:
            return
        slot.alive = False
        slot.link.close("the instance died")
        if self._stopping.is_set():  # shutdown() closed it
            return
        log.error("engine instance %d (pid %d) died; starting a new one", slot.index, slot.pid)
        threading.Thread(target=self._restart, args=(slot,), name=f"ferry-restart-{slot.index}", daemon=True).start()

    def _restart(self, slot: _Slot) -> None:
        try:
            self._ray.kill(slot.actor)  # its link broke but its process may live on: no engine left behind
        except Exception:
            pass  # gone already
        try:
            actor = self._remote.remote(self._model, self._options, self._token)
            info = self._ray.get(actor.ready.remote())
            link = InstanceLink(info["address"], self._token, str(slot.index))
        except Exception:
            log.exception("engine instance %d could not be started again", slot.index)
            return
        slot.actor, slot.pid, slot.link, slot.in_flight, slot.alive = actor, info["pid"], link, 0, True
        slot.prefixes.clear()  # a new process: an empty prefix cache
        slot.restarts += 1
        log.info("engine instance %d is back (pid %d)", slot.index, slot.pid)

    def _poll_stats(self) -> None:
        while not self._stopping.wait(STATS_INTERVAL):
            live = [s for s in self._slots if s.alive]
            refs = [s.actor.stats.remote() for s in live]
            try:
                parts = self._ray.get(refs, timeout=10)
            except Exception:  # an instance died between the check and the call: the next round skips it
                self._close_dead(live, refs)
                continue
            stats = _sum_stats(parts)
            stats.instances = [InstanceLoad(s.index, s.alive, s.in_flight, s.restarts) for s in self._slots]
            stats.migrations = self._migrations
            self._stats = stats

    def _close_dead(self, slots: list[_Slot], refs: list[Any]) -> None:
        """Close the link of each instance Ray reports dead: its streams then resume elsewhere (the connection to
        a host that died may never close by itself)."""
        for slot, ref in zip(slots, refs):
            try:
                self._ray.get(ref, timeout=0)
            except self._ray.exceptions.RayActorError:
                slot.link.close("Ray reports the instance dead")
            except Exception:
                pass

    def instance_stats(self) -> list[EngineStats | None]:
        """Each instance's own stats now (None for one that is down): its KV blocks, requests, counters."""
        out = []
        for s in self._slots:
            try:
                out.append(self._ray.get(s.actor.stats.remote(), timeout=10) if s.alive else None)
            except Exception:
                out.append(None)
        return out


def _sum_stats(parts: list[EngineStats]) -> EngineStats:
    total = EngineStats()
    for f in fields(EngineStats):
        values = [getattr(p, f.name) for p in parts]
        if all(isinstance(v, (int, float)) for v in values) and values:
            setattr(total, f.name, sum(values))
    return total


def _ray_memory() -> int:
    """Bytes the processes of a Ray just started by this one take (its children: the GCS, the raylet and their
    idle workers), as proportional set size (shared pages split between the processes that share them)."""
    import psutil

    total = 0
    for p in psutil.Process().children(recursive=True):
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        total += getattr(info, "pss", info.rss)
    return total
