"""Live migration between 2 Ray instances (1 thread each), driven through ClusterLLM as the server drives it: a
request moved in the middle of its decoding streams on from the destination with no token repeated or missing and
exactly the tokens it would have had (greedy and seeded sampling); a destination that dies during the migration
calls it off and the request completes on its source, exact; draining an instance moves every request off it; each
migration is counted for /metrics; no KV block is left behind on any instance."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ferry import SamplingParams

ray = pytest.importorskip("ray")

from ferry.cluster.frontend import ClusterLLM  # noqa: E402  (after the Ray check)

TINY = Path(__file__).resolve().parents[2] / "ferry" / "assets" / "ferry-tiny"
PROMPT = "Lily and Tom went to the park. They saw a big dog. The dog was brown and it ran to them. Lily was"
PARAMS = {"greedy": SamplingParams(temperature=0, max_tokens=96, ignore_eos=True),
          "seeded": SamplingParams(temperature=0.9, top_k=40, presence_penalty=0.3, seed=5, max_tokens=96,
                                   ignore_eos=True)}


@pytest.fixture(scope="module")
def cluster():
    c = ClusterLLM(str(TINY), 2, {"dtype": "float32", "threads": 1, "kv_cache_memory": "16M"})
    yield c
    asyncio.run(c.shutdown(drain=False, timeout=30))


async def _collect(c: ClusterLLM, rid: str, prompt: str, params: SamplingParams, migrate_at: int | None = None,
                   to: int | None = None) -> tuple[list[int], str | None]:
    """The request's final tokens, checking that every cumulative output extends the one before (what a client's
    stream of deltas needs), and the outcome of a migration started once it has migrate_at tokens."""
    prev: list[int] = []
    task = None
    async for out in c.generate(prompt, params, rid):
        tokens = list(out.outputs[0].token_ids)
        assert tokens[:len(prev)] == prev, "a cumulative output does not extend the one before"
        prev = tokens
        if migrate_at is not None and task is None and len(tokens) >= migrate_at:
            task = asyncio.create_task(c.migrate(rid, to))
    assert out.finished and out.error is None
    return prev, (await task) if task is not None else None


def _where(c: ClusterLLM) -> dict[str, int]:
    return {rid: t.slot.index for rid, t in c._tracked.items()}


def _blocks_used(c: ClusterLLM) -> list[int]:
    """Each instance's KV blocks in use, once its engine loop has published its state after the last step."""
    deadline = time.monotonic() + 30
    while True:
        used = [s.num_kv_blocks_used if s is not None else -1 for s in c.instance_stats()]
        if all(u == 0 for u in used) or time.monotonic() > deadline:
            return used
        time.sleep(0.2)


@pytest.mark.parametrize("kind", list(PARAMS))
def test_migration_mid_decode_is_token_exact(cluster, kind):
    params = PARAMS[kind]
    want, _ = asyncio.run(_collect(cluster, f"ref-{kind}", PROMPT, params))
    before = dict(cluster.stats().migrations.outcomes) if cluster.stats().migrations else {}
    got, outcome = asyncio.run(_collect(cluster, f"moved-{kind}", PROMPT, params, migrate_at=20))
    assert outcome == "migrated"
    assert got == want
    assert _blocks_used(cluster) == [0, 0]
    deadline = time.monotonic() + 10  # the front end publishes its counters with the instances' stats, each second
    while (cluster.stats().migrations is None or cluster.stats().migrations.outcomes.get("migrated", 0)
           <= before.get("migrated", 0)) and time.monotonic() < deadline:
        time.sleep(0.2)
    m = cluster.stats().migrations
    assert m.outcomes["migrated"] == before.get("migrated", 0) + 1 and m.pause.num >= 1 and m.downtime.num >= 1


def test_a_destination_that_dies_leaves_the_request_on_its_source(cluster):
    params = PARAMS["seeded"]
    want, _ = asyncio.run(_collect(cluster, "ref-dies", PROMPT, params))

    async def run() -> tuple[list[int], str]:
        prev: list[int] = []
        outcome = None
        async for out in cluster.generate(PROMPT, params, "dies"):
            prev = list(out.outputs[0].token_ids)
            if outcome is None and len(prev) >= 20:
                src = _where(cluster)["dies"]
                dst = cluster._slots[1 - src]
                ray.kill(dst.actor, no_restart=True)  # the destination dies before the migration reaches it
                outcome = await cluster.migrate("dies", dst.index)
                assert _where(cluster)["dies"] == src
        return prev, outcome

    got, outcome = asyncio.run(run())
    assert outcome == "aborted_dst"
    assert got == want
    deadline = time.monotonic() + 120  # the front end starts the dead instance again
    while not all(s.alive for s in cluster._slots) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _blocks_used(cluster) == [0, 0]


def test_draining_an_instance_moves_every_request_off_it(cluster):
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    prompts = [f"{PROMPT} {w}" for w in ("one", "two", "three", "four")]

    async def run() -> tuple[list[list[int]], list[list[int]], dict]:
        want = await asyncio.gather(*(_collect(cluster, f"ref-drain-{i}", p, params) for i, p in enumerate(prompts)))
        tasks = [asyncio.create_task(_collect(cluster, f"drain-{i}", p, params)) for i, p in enumerate(prompts)]
        while len(_where(cluster)) < len(prompts) or min(t.num_output_tokens for t in cluster._tracked.values()) < 8:
            await asyncio.sleep(0.05)
        outcomes = await cluster.drain(0)
        # still on instance 0: not followed on from another one yet, nor about to be (its move is pending)
        on_0 = [rid for rid, i in _where(cluster).items() if i == 0 and rid not in cluster._moved]
        got = await asyncio.gather(*tasks)
        cluster.undrain(0)
        return [w for w, _ in want], [g for g, _ in got], {"outcomes": outcomes, "left_on_0": on_0}

    want, got, seen = asyncio.run(run())
    assert got == want
    assert seen["outcomes"] and set(seen["outcomes"].values()) == {"migrated"}, seen
    assert seen["left_on_0"] == []
    assert _blocks_used(cluster) == [0, 0]


def test_a_prefill_decode_split_gives_the_colocated_output():
    from ferry.engine.options import parse_instance_roles
    pd = ClusterLLM(str(TINY), 2, {"dtype": "float32", "threads": 1, "kv_cache_memory": "16M"},
                    roles=parse_instance_roles("prefill:1,decode:1"))
    try:
        pd._slots[1].role = "both"  # the reference run: prompts and decoding on instance 1 (colocated)...
        pd._slots[0].draining = True
        ref_params = PARAMS["greedy"]
        want, _ = asyncio.run(_collect(pd, "colocated", PROMPT, ref_params))
        pd._slots[1].role, pd._slots[0].draining = "decode", False  # ...then split again
        got, _ = asyncio.run(_collect(pd, "split", PROMPT, ref_params))
        assert got == want
        seeded = PARAMS["seeded"]
        pd._slots[0].role = "both"  # seeded: colocated on the prefill instance, then split
        pd._slots[1].draining = True
        want, _ = asyncio.run(_collect(pd, "colocated-seeded", PROMPT, seeded))
        pd._slots[0].role, pd._slots[1].draining = "prefill", False
        got, _ = asyncio.run(_collect(pd, "split-seeded", PROMPT, seeded))
        assert got == want
        assert pd._migrations.outcomes.get("migrated") == 2  # each split request handed over once
        assert _blocks_used(pd) == [0, 0]
    finally:
        asyncio.run(pd.shutdown(drain=False, timeout=30))
