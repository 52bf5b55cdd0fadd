"""A failing request fails alone: when a step's forward raises, find which of its requests make it raise
and run the step for the others.

Prompts are validated before they are queued (ferry/engine/inputs.py), so what still fails here is what only
the forward can tell (a kernel on an odd shape, a fault tied to one request's tokens or parameters). The step
is then re-run on halves of its requests, recursively (bisection), down to the single requests that still
raise: each culprit costs about 2·log2(len(step)) extra forwards, the others' tokens are what the whole step
would have given (nothing is rolled back: a forward writes only the KV of the step's own tokens, at their
slots, so a re-run writes the same slots again, and the sampler's random state is restored before each try).

The plan's once-only parts (released requests, swaps) run before the first try, never again; if they raise,
no one request is to blame, and the step's requests fail with that error (the engine goes on)."""
from __future__ import annotations

import logging
from dataclasses import replace

from ferry.plan import ScheduledReq, StepPlan, StepResult
from ferry.runner.runner import Runner

log = logging.getLogger("ferry")


def execute_isolating(runner: Runner, plan: StepPlan) -> tuple[StepResult, dict[str, BaseException]]:
    """(result of the requests whose forward succeeds, {req_id: error} of those that make it raise)."""
    try:
        runner.prepare(plan)
    except Exception as e:
        log.exception("the swaps of a step failed; failing its %d requests", len(plan.reqs))
        return StepResult(), {r.req_id: e for r in plan.reqs}
    snap = runner.sampler.snapshot(r.req_id for r in plan.reqs)
    try:
        return runner.forward(plan), {}
    except Exception as e:
        if len(plan.reqs) <= 1:
            return StepResult(), {r.req_id: e for r in plan.reqs}
        log.warning("a step of %d requests failed (%s: %s); finding the failing ones", len(plan.reqs),
                    type(e).__name__, e)
    result, failed = StepResult(), {}
    half = len(plan.reqs) // 2
    for part in (plan.reqs[:half], plan.reqs[half:]):
        _bisect(runner, plan, part, snap, result, failed)
    return result, failed


def _bisect(runner: Runner, plan: StepPlan, reqs: list[ScheduledReq], snap: dict, result: StepResult,
            failed: dict[str, BaseException]) -> None:
    """Run the forward of `reqs` alone; on failure, split them until each failing request stands alone."""
    runner.sampler.restore(snap, (r.req_id for r in reqs))
    try:
        part = runner.forward(replace(plan, reqs=reqs, swap_out=[], swap_in=[], finished_req_ids=[]))
    except Exception as e:
        if len(reqs) == 1:
            log.error("request %s fails its step: %s: %s", reqs[0].req_id, type(e).__name__, e)
            failed[reqs[0].req_id] = e
            return
        half = len(reqs) // 2
        _bisect(runner, plan, reqs[:half], snap, result, failed)
        _bisect(runner, plan, reqs[half:], snap, result, failed)
        return
    result.sampled_token_ids.update(part.sampled_token_ids)
    result.logprobs.update(part.logprobs)
    result.prompt_logprobs.update(part.prompt_logprobs)
    result.spec_token_ids.update(part.spec_token_ids)
    result.spec_logprobs.update(part.spec_logprobs)
