"""Live migration between two instances, the front end's half (Llumnix's staged copy): the source's full blocks
go to the destination while the request keeps decoding there (stages, each reserving the destination's blocks
before writing them), until a stage finds at most LAST_STAGE_BLOCKS new full blocks; then the stop-and-copy: the
source suspends the request and hands over its last blocks and its state, the destination adopts it. Blocks travel
from actor to actor through Ray's object store (the front end passes object refs, never the data); the request's
outputs from the destination come on the front end's link to it (link.py), where its stream is opened first.

Any failure calls the migration off on both sides (the destination gives back what it reserved, the source runs
the request again) and the request goes on where it was. The engine half is ferry/engine/migration.py."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ferry.cluster.link import InstanceDied, Stream
from ferry.engine.migration import MigrationFailed
from ferry.engine.stats import MigrationStats

log = logging.getLogger("ferry")

MAX_STAGES = 4  # copies while the request decodes, at most (a request that fills blocks faster stops anyway)
LAST_STAGE_BLOCKS = 1  # a stage that found this many new full blocks or fewer is followed by the stop-and-copy


class MigrationAborted(Exception):
    """The migration was called off (outcome: aborted_src or aborted_dst); the request runs on the source."""

    def __init__(self, outcome: str, reason: str, died: bool = False) -> None:
        super().__init__(reason)
        self.outcome = outcome
        self.died = died  # the side the outcome names died (its actor is gone)


@dataclass
class Moved:
    """A completed migration: the destination's output stream of the request (past its adoption), and when the
    source stopped the request (time.time(), for the downtime, measured at the first token from there)."""

    stream: Stream  # on the destination's link
    stopped_at: float
    num_blocks: int


async def migrate(ray: Any, request_id: str, src: Any, dst: Any, stats: MigrationStats, staged: bool = True) -> Moved:
    """Move request_id from instance src to instance dst (the front end's slots: .actor, an EngineInstance handle,
    and .link). Raises MigrationAborted after cleaning up both sides. The caller releases the request on the
    source once it follows the new stream. staged=False: the request is already stopped (a prefill instance's,
    after its first token): the stop-and-copy alone."""
    held, stream = 0, None
    try:
        for _ in range(MAX_STAGES if staged else 0):
            before = held
            blocks = src.actor.migration.remote("export_full", request_id, held)  # an object ref: dst fetches it
            held = await dst.actor.migration.remote("receive", request_id, blocks)
            if held - before <= LAST_STAGE_BLOCKS:
                break
        handover = src.actor.migration.remote("suspend", request_id, held)
        stream = dst.link.open(request_id)
        stopped_at = await dst.actor.adopt.remote(request_id, handover)  # once dst runs it; raises if it could not
    except Exception as e:
        if stream is not None:
            stream.close()
        outcome = _side(ray, e, src.actor)
        await _call_off(request_id, src.actor, dst.actor)
        stats.count(outcome)
        died = isinstance(e, (ray.exceptions.RayActorError, InstanceDied))
        raise MigrationAborted(outcome, _reason(e), died) from None
    stats.pause.observe(time.time() - stopped_at)  # both clocks this host's (or NTP-close across hosts)
    return Moved(stream, stopped_at, held)


async def _call_off(request_id: str, src: Any, dst: Any) -> None:
    """Both sides back to before the migration, as far as each is still there."""
    for actor, op in ((dst, "cancel"), (src, "unsuspend")):
        try:
            await actor.migration.remote(op, request_id)
        except Exception as e:  # that side died: it holds nothing any more
            log.warning("calling off the migration of %s: %s failed: %s", request_id, op, e)


def _side(ray: Any, e: Exception, src: Any) -> str:
    """aborted_src when the source could not go on (the request ended, was preempted, cannot migrate, the source
    died), else aborted_dst."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, MigrationFailed):
        return "aborted_src" if cause.side == "source" else "aborted_dst"
    if isinstance(e, ray.exceptions.RayActorError) and getattr(e, "actor_id", None) == src._actor_id.hex():
        return "aborted_src"
    return "aborted_dst"


def _reason(e: Exception) -> str:
    cause = getattr(e, "cause", None)
    return str(cause) if cause is not None else f"{type(e).__name__}: {e}"
