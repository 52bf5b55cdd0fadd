"""The front end's link to an instance (ferry/cluster/link.py and instance.py's InstanceServer), without Ray and
without a model (a stand-in engine): each request's outputs arrive in order on its own stream, the engine's own
error arrives as itself, aborts reach the engine, a connection without the secret is closed unserved, and when
the instance's side closes every open stream raises InstanceDied and the engine's requests end."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from ferry.cluster.instance import InstanceServer
from ferry.cluster.link import TOKEN_BYTES, InstanceDied, InstanceLink
from ferry.errors import Overloaded
from ferry.request import CompletionOutput, RequestOutput

TOKEN = bytes(range(TOKEN_BYTES))


class StandInEngine:
    """AsyncLLM's surface the link uses. The prompt says what to do: a number n streams n outputs (token ids
    0..n-1, cumulative), "refuse" raises Overloaded, "forever" streams one output and waits."""

    def __init__(self) -> None:
        self.aborted: list[str] = []
        self.ended: list[str] = []

    async def generate(self, prompt, params, request_id, priority, resume=None, hold=False):
        try:
            if prompt == "refuse":
                raise Overloaded("every slot is taken")
            n = 1 if prompt == "forever" else prompt
            for i in range(n):
                await asyncio.sleep(0.001)
                yield RequestOutput(request_id, None, [1, 2], [CompletionOutput(0, "", list(range(i + 1)), None)],
                                   finished=prompt != "forever" and i == n - 1)
            if prompt == "forever":
                await asyncio.Event().wait()
        finally:
            self.ended.append(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


@pytest.fixture
def pair():
    engine = StandInEngine()
    server = InstanceServer(engine, TOKEN, "127.0.0.1")
    link = InstanceLink(server.address, TOKEN, "test")
    yield engine, server, link
    link.close()
    server.close()


async def _tokens(link: InstanceLink, request_id: str, prompt) -> list[list[int]]:
    stream = link.open(request_id)
    link.send("generate", request_id, prompt, 0, None, False)
    return [list(out.outputs[0].token_ids) async for out in stream]


def test_each_request_gets_its_own_outputs_in_order(pair):
    _, _, link = pair

    async def run():
        return await asyncio.gather(*(_tokens(link, f"r{n}", n) for n in (3, 5, 1)))

    assert asyncio.run(run()) == [[list(range(i + 1)) for i in range(n)] for n in (3, 5, 1)]


def test_the_engines_own_error_arrives_as_itself_and_aborts_reach_it(pair):
    engine, _, link = pair
    with pytest.raises(Overloaded, match="every slot is taken"):
        asyncio.run(_tokens(link, "refused", "refuse"))

    async def abort_after_first():
        stream = link.open("long")
        link.send("generate", "long", "forever", 0, None, False)
        async for _ in stream:
            link.abort("long")
            stream.close()
            return

    asyncio.run(abort_after_first())
    deadline = time.monotonic() + 5
    while "long" not in engine.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.aborted == ["long"]


def test_a_connection_without_the_secret_is_not_served():
    engine = StandInEngine()
    server = InstanceServer(engine, TOKEN, "127.0.0.1")
    try:
        with socket.create_connection(server.address, timeout=5) as stranger:
            stranger.sendall(b"x" * TOKEN_BYTES)
            stranger.settimeout(5)
            assert stranger.recv(1) == b""  # closed unread
        link = InstanceLink(server.address, TOKEN, "test")  # the front end still gets in
        assert asyncio.run(_tokens(link, "after", 2)) == [[0], [0, 1]]
        link.close()
    finally:
        server.close()


def test_a_closed_instance_ends_every_open_stream_with_instance_died(pair):
    engine, server, link = pair

    async def run():
        stream = link.open("cut")
        link.send("generate", "cut", "forever", 0, None, False)
        seen = []
        with pytest.raises(InstanceDied):
            async for out in stream:
                seen.append(out)
                server.close()  # as if its process died
        return seen

    assert len(asyncio.run(run())) == 1

    async def reopen():
        link.open("later")

    with pytest.raises(InstanceDied):
        asyncio.run(reopen())
    deadline = time.monotonic() + 5  # the instance's side cancelled what it ran for the front end
    while "cut" not in engine.ended and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "cut" in engine.ended
