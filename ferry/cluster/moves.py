"""ClusterLLM's moves of running requests between instances (a mixin of frontend.py's ClusterLLM, which owns the
state it reads: _slots, _tracked, _moved, _migrating, _migrations, _stopping, _ray, max_model_len):

- migrate(request, to): live migration in stages (migration.py) while the request decodes;
- drain(index) / undrain(index): scale-in, every request off an instance (policies.pick_drain);
- _balance(): --migration-policy balance, one move at a time from the instance whose KV is most committed to the
  least (policies.pick_balance; the load dispatch reads: KV tokens held plus queued prompts, over the KV cache);
- _hand_over(request): the prefill/decode split: a request a prefill instance stopped at its first token goes to
  the least loaded decode instance in one stop-and-copy.

A completed move leaves (destination, Moved) in _moved before the source releases the request: the source's
stream then ends, and ClusterLLM._follow goes on with the destination's stream."""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from ferry.cluster.migration import MigrationAborted, migrate
from ferry.cluster.policies import Load, Running, pick_balance, pick_drain
from ferry.errors import InvalidRequest

log = logging.getLogger("ferry")

BALANCE_INTERVAL = 0.1  # seconds between looks of the balance policy (a look is cheap: the front end's own view)
DECODE_ROLES = ("decode", "both")


class ClusterMoves:
    async def migrate(self, request_id: str, to: int | None = None) -> str:
        """Move a running request to instance `to` (default: the least loaded other one) while it decodes; its
        stream goes on from there. Returns the outcome: migrated, aborted_src (the request ended, or cannot
        move) or aborted_dst (the destination failed); an aborted migration leaves it running where it was."""
        tracked = self._tracked.get(request_id)
        if tracked is None:
            raise InvalidRequest(f"request {request_id!r} is not running on this server")
        src = tracked.slot
        dst = self._least_loaded(exclude=src, roles=DECODE_ROLES) if to is None else self._slots[to]
        if dst is None or dst is src or not dst.alive:
            raise InvalidRequest(f"no other live instance to move {request_id!r} to (it is on {src.index})")
        return await self._move(request_id, src, dst, staged=True)

    async def _hand_over(self, request_id: str, src: Any) -> None:
        """Prefill/decode split: the request stopped on prefill instance src after its first token; one
        stop-and-copy to a decode instance (called off: it decodes on src)."""
        dst = self._least_loaded(exclude=src, roles=("decode",)) or self._least_loaded(exclude=src, roles=DECODE_ROLES)
        try:
            if dst is not None:
                await self._move(request_id, src, dst, staged=False)
                return
            log.warning("no decode instance is up: %s decodes on prefill instance %d", request_id, src.index)
            await src.actor.migration.remote("unsuspend", request_id)
        except Exception as e:  # the prefill instance died (the request's stream resumes it) or it ended meanwhile
            log.warning("handing %s over from prefill instance %d failed: %s", request_id, src.index, e)

    async def _move(self, request_id: str, src: Any, dst: Any, staged: bool) -> str:
        if request_id in self._migrating:
            raise InvalidRequest(f"request {request_id!r} is already migrating")
        self._migrating.add(request_id)
        try:
            moved = await migrate(self._ray, request_id, src, dst, self._migrations, staged)
        except MigrationAborted as e:
            log.warning("moving %s from instance %d to %d called off (%s): %s", request_id, src.index, dst.index,
                        e.outcome, e)
            if e.died and e.outcome == "aborted_dst":
                self._lost(dst)  # the source's death is seen by the request's own stream
            return e.outcome
        finally:
            self._migrating.discard(request_id)
        self._moved[request_id] = (dst, moved)  # before the release ends the source's stream
        self._migrations.count("migrated")
        self._migrations.num_blocks += moved.num_blocks
        try:
            await src.actor.migration.remote("release", request_id)
        except self._ray.exceptions.RayActorError:
            pass  # the source died: its stream ends with that error, and _follow goes on from the destination
        if request_id not in self._tracked:  # its client left meanwhile
            self._moved.pop(request_id, None)
            moved.stream.close()
            dst.link.abort(request_id)
        log.info("request %s moved from instance %d to %d", request_id, src.index, dst.index)
        return "migrated"

    async def drain(self, index: int) -> dict[str, str]:
        """Scale-in: no new request goes to instance index, and every request on it moves to the others
        ({request: outcome}). undrain(index) takes it back into service."""
        self._slots[index].draining = True
        moves = pick_drain(index, self._load(), self._running())
        outcomes = await asyncio.gather(*(self.migrate(rid, to) for rid, to in moves), return_exceptions=True)
        return {rid: o if isinstance(o, str) else f"error: {o}" for (rid, _), o in zip(moves, outcomes)}

    def undrain(self, index: int) -> None:
        self._slots[index].draining = False

    async def _balance(self) -> None:
        """--migration-policy balance: one migration at a time, from the most to the least loaded instance."""
        while not self._stopping.is_set():
            await asyncio.sleep(BALANCE_INTERVAL)
            move = pick_balance(self._load(), self._running())
            if move is None:
                continue
            try:
                await self.migrate(move[0], move[2])
            except InvalidRequest:  # it finished or its instance died meanwhile
                pass
            except Exception:
                log.exception("the balance policy's migration of %s failed", move[0])

    def _least_loaded(self, exclude: Any, roles: tuple[str, ...]) -> Any:
        ok = [s for s in self._slots if s.alive and not s.draining and s is not exclude and s.role in roles]
        load = self._kv_tokens(ok)
        return min(ok, key=lambda s: (load[s.index] / max(1, s.capacity_tokens), s.in_flight, s.index), default=None)

    def _load(self) -> dict[int, Load]:
        """KV tokens committed per instance that decodes, over its KV cache (what balance evens out)."""
        ok = [s for s in self._slots if s.alive and not s.draining and s.role in DECODE_ROLES]
        return {i: Load(n, self._slots[i].capacity_tokens) for i, n in self._kv_tokens(ok).items()}

    def _running(self) -> list[Running]:
        out = []
        for rid, t in self._tracked.items():
            if rid in self._migrating or rid in self._moved:
                continue
            num_prompt = len(t.prompt.prompt_token_ids)
            out.append(Running(rid, t.slot.index, num_prompt + t.num_output_tokens, t.num_output_tokens))
        return out
