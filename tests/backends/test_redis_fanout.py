"""Two chat backends, each with its own RedisBus, sharing a real redis-server."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from backends.chat.app import ChatServer
from backends.chat.bus import RedisBus
from tests.backends.helpers import connect, messages_until, recv_json, say, texts, wait_for
from tests.backends.redis_server import RedisServer


@dataclass
class Backend:
    server: ChatServer
    bus: RedisBus

    @property
    def ws_url(self) -> str:
        return self.server.url + "/ws"


@pytest.fixture
async def backends(redis_server: RedisServer) -> AsyncIterator[tuple[Backend, Backend]]:
    started: list[Backend] = []
    try:
        for name in ("ECS01", "ECS02"):
            bus = RedisBus(
                redis_server.url, retry_initial=0.02, retry_max=0.1, timeout=1.0, ping_interval=1.0
            )
            await bus.start()
            server = ChatServer(name, bus)
            started.append(Backend(server, bus))
            await server.start()
        for backend in started:
            await backend.bus.wait_connected(5)
        yield started[0], started[1]
    finally:
        for backend in started:
            await backend.server.close()
            await backend.bus.close()


async def test_clients_on_different_backends_talk_both_ways(
    backends: tuple[Backend, Backend],
) -> None:
    a, b = backends
    async with aiohttp.ClientSession() as session:
        alice = await connect(session, a.ws_url, "ECS01")
        bob = await connect(session, b.ws_url, "ECS02")

        await say(alice, "alice", "hi bob")
        for ws in (alice, bob):
            msg = await recv_json(ws)
            assert (msg["user"], msg["text"], msg["backend"]) == ("alice", "hi bob", "ECS01")

        await say(bob, "bob", "hi alice")
        got_a = await recv_json(alice)
        got_b = await recv_json(bob)
        assert got_a == got_b  # the very same message (same id), both sides
        assert (got_a["user"], got_a["text"], got_a["backend"]) == ("bob", "hi alice", "ECS02")

        # No duplicates through Redis, in either direction (markers are barriers).
        await say(bob, "bob", "marker-b")
        assert texts(await messages_until(alice, "marker-b")) == ["marker-b"]
        assert texts(await messages_until(bob, "marker-b")) == ["marker-b"]
        await say(alice, "alice", "marker-a")
        assert texts(await messages_until(bob, "marker-a")) == ["marker-a"]
        assert texts(await messages_until(alice, "marker-a")) == ["marker-a"]


async def test_redis_restart_mid_conversation(
    backends: tuple[Backend, Backend],
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="backends.chat.bus")
    a, b = backends
    async with aiohttp.ClientSession() as session:
        alice = await connect(session, a.ws_url, "ECS01")
        carol = await connect(session, a.ws_url, "ECS01")  # same backend as alice
        bob = await connect(session, b.ws_url, "ECS02")

        await say(alice, "alice", "before")
        for ws in (alice, carol, bob):
            assert texts(await messages_until(ws, "before")) == ["before"]

        await redis_server.stop_async()

        # Local delivery never stops: right away, and after the outage is noticed.
        await say(alice, "alice", "during-1")
        for ws in (alice, carol):
            assert texts(await messages_until(ws, "during-1")) == ["during-1"]
        await wait_for(lambda: not a.bus.connected and not b.bus.connected, what="outage")
        await say(alice, "alice", "during-2")
        await say(bob, "bob", "during-b")
        for ws in (alice, carol):
            assert texts(await messages_until(ws, "during-2")) == ["during-2"]
        assert texts(await messages_until(bob, "during-b")) == ["during-b"]

        await redis_server.start_async()
        await a.bus.wait_connected(5)
        await b.bus.wait_connected(5)

        # Fan-out resumes, both ways, without duplicates or replays.
        await say(alice, "alice", "after")
        assert texts(await messages_until(bob, "after")) == ["after"]
        await say(bob, "bob", "reply")
        for ws in (alice, carol):
            assert texts(await messages_until(ws, "reply")) == ["after", "reply"]
        assert texts(await messages_until(bob, "reply")) == ["reply"]

    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("redis unavailable") for m in messages) == 2  # once per backend
    assert sum(m.startswith("redis back") for m in messages) == 2
