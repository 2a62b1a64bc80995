"""MemoryBus on its own, and shared by two backend apps in one process."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
import pytest

from backends.chat.app import ChatServer
from backends.chat.bus import JsonObject, MemoryBus
from tests.backends.helpers import connect, messages_until, recv_json, say, texts


async def test_publish_reaches_every_subscriber_until_unsubscribed() -> None:
    bus = MemoryBus()
    await bus.start()
    a: list[JsonObject] = []
    b: list[JsonObject] = []
    bus.subscribe(a.append)
    unsubscribe_b = bus.subscribe(b.append)
    bus.publish({"n": 1})
    unsubscribe_b()
    unsubscribe_b()  # idempotent
    bus.publish({"n": 2})
    await bus.close()
    assert a == [{"n": 1}, {"n": 2}]
    assert b == [{"n": 1}]


async def test_a_failing_subscriber_does_not_stop_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = MemoryBus()
    got: list[JsonObject] = []

    def broken(msg: JsonObject) -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(got.append)
    with caplog.at_level(logging.ERROR, logger="backends.chat.bus"):
        bus.publish({"n": 1})
    assert got == [{"n": 1}]
    assert "subscriber" in caplog.text and "boom" in caplog.text


@pytest.fixture
async def two_backends() -> AsyncIterator[tuple[ChatServer, ChatServer]]:
    bus = MemoryBus()
    await bus.start()
    a = ChatServer("ECS01", bus)
    b = ChatServer("ECS02", bus)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()
        await bus.close()


async def test_two_apps_share_one_memory_bus(two_backends: tuple[ChatServer, ChatServer]) -> None:
    a, b = two_backends
    assert a.port != b.port
    async with aiohttp.ClientSession() as session:
        alice = await connect(session, a.url + "/ws", "ECS01")
        bob = await connect(session, b.url + "/ws", "ECS02")

        await say(alice, "alice", "hi bob")
        for ws in (alice, bob):
            msg = await recv_json(ws)
            assert (msg["user"], msg["text"], msg["backend"]) == ("alice", "hi bob", "ECS01")

        await say(bob, "bob", "hi alice")
        for ws in (alice, bob):
            msg = await recv_json(ws)
            assert (msg["user"], msg["text"], msg["backend"]) == ("bob", "hi alice", "ECS02")

        # No duplicates: the next message each side sees is the marker.
        await say(alice, "alice", "marker")
        assert texts(await messages_until(bob, "marker")) == ["marker"]
        assert texts(await messages_until(alice, "marker")) == ["marker"]

        async with session.get(b.url + "/whoami") as resp:
            assert await resp.text() == "ECS02"
