"""RedisBus against a real redis-server: fan-out, no self-echo, outages, clean close."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from redis.asyncio import Redis

from backends.chat.bus import JsonObject, RedisBus, redact_url
from tests.backends.helpers import wait_for
from tests.backends.redis_server import RedisServer


def fast_bus(url: str) -> RedisBus:
    """A RedisBus with quick retries, so that outage tests take well under a second."""
    return RedisBus(
        url, channel="test-chat", retry_initial=0.02, retry_max=0.1, timeout=1.0, ping_interval=1.0
    )


BusFactory = Callable[[str], RedisBus]


@pytest.fixture
async def make_bus() -> AsyncIterator[BusFactory]:
    """Creates started RedisBus objects with fast retry settings; closes them after."""
    buses: list[RedisBus] = []

    def make(url: str) -> RedisBus:
        bus = fast_bus(url)
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close()


class Inbox:
    """Subscriber that records messages and lets a test wait for them."""

    def __init__(self) -> None:
        self.msgs: list[JsonObject] = []

    def __call__(self, msg: JsonObject) -> None:
        self.msgs.append(msg)

    def texts(self) -> list[str]:
        return [m["text"] for m in self.msgs]

    async def wait_for_text(self, text: str) -> None:
        await wait_for(lambda: text in self.texts(), what=f"message {text!r}")


async def test_fan_out_without_self_echo(redis_server: RedisServer, make_bus: BusFactory) -> None:
    a, b = make_bus(redis_server.url), make_bus(redis_server.url)
    inbox_a, inbox_b = Inbox(), Inbox()
    a.subscribe(inbox_a)
    b.subscribe(inbox_b)
    await a.start()
    await b.start()
    await a.wait_connected(5)
    await b.wait_connected(5)

    a.publish({"text": "from a"})
    assert inbox_a.texts() == ["from a"]  # local delivery is immediate
    await inbox_b.wait_for_text("from a")

    b.publish({"text": "from b"})
    assert inbox_b.texts() == ["from a", "from b"]
    await inbox_a.wait_for_text("from b")

    # Barrier: A's own "from a" would have come back from Redis before "from b".
    assert inbox_a.texts() == ["from a", "from b"]
    a.publish({"text": "marker"})
    await inbox_b.wait_for_text("marker")
    assert inbox_b.texts() == ["from a", "from b", "marker"]
    assert a.dropped == b.dropped == 0


async def test_malformed_channel_messages_are_ignored(
    redis_server: RedisServer, make_bus: BusFactory, caplog: pytest.LogCaptureFixture
) -> None:
    bus = make_bus(redis_server.url)
    inbox = Inbox()
    bus.subscribe(inbox)
    await bus.start()
    await bus.wait_connected(5)
    raw = Redis.from_url(redis_server.url)
    try:
        with caplog.at_level(logging.WARNING, logger="backends.chat.bus"):
            await raw.publish("test-chat", b"not json")
            await raw.publish("test-chat", json.dumps({"origin": "x", "msg": [1]}))
            await raw.publish("test-chat", json.dumps({"origin": "x", "msg": {"text": "ok"}}))
            await inbox.wait_for_text("ok")
    finally:
        await raw.aclose()
    assert inbox.texts() == ["ok"]
    assert caplog.text.count("ignoring malformed message") == 2


async def test_starts_while_redis_is_down_and_connects_when_it_appears(
    redis_server_stopped: RedisServer,
    make_bus: BusFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="backends.chat.bus")
    redis = redis_server_stopped
    a, b = make_bus(redis.url), make_bus(redis.url)
    inbox_a, inbox_b = Inbox(), Inbox()
    a.subscribe(inbox_a)
    b.subscribe(inbox_b)
    await a.start()
    await b.start()

    await wait_for(lambda: a.connect_attempts >= 4, what="several connection attempts")
    assert not a.connected
    a.publish({"text": "while down"})
    assert inbox_a.texts() == ["while down"]  # local users are still served

    await redis.start_async()
    await a.wait_connected(5)
    await b.wait_connected(5)
    a.publish({"text": "after"})
    await inbox_b.wait_for_text("after")
    assert inbox_b.texts() == ["after"]  # outage messages are not replayed

    unavailable = [r for r in caplog.records if r.getMessage().startswith("redis unavailable")]
    back = [r for r in caplog.records if r.getMessage().startswith("redis back")]
    assert len(unavailable) == 2, "one per bus, however many retries"
    assert len(back) == 2
    assert "; retrying" in unavailable[0].getMessage()


async def test_quick_restart_is_one_outage_and_fan_out_resumes(
    redis_server: RedisServer,
    restart_redis: Callable[[], Awaitable[None]],
    make_bus: BusFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="backends.chat.bus")
    a, b = make_bus(redis_server.url), make_bus(redis_server.url)
    inbox_b = Inbox()
    b.subscribe(inbox_b)
    await a.start()
    await b.start()
    await a.wait_connected(5)
    await b.wait_connected(5)

    await restart_redis()
    await wait_for(
        lambda: all(bus.connect_attempts >= 2 and bus.connected for bus in (a, b)),
        what="both buses reconnected",
    )
    a.publish({"text": "after restart"})
    await inbox_b.wait_for_text("after restart")
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("redis unavailable") for m in messages) == 2
    assert sum(m.startswith("redis back") for m in messages) == 2


async def test_close_cancels_its_tasks(redis_server: RedisServer) -> None:
    bus = fast_bus(redis_server.url)
    await bus.start()
    await bus.wait_connected(5)
    bus.publish({"text": "x"})
    await bus.close()
    await bus.close()  # idempotent
    assert not bus.connected
    leftovers = [t for t in asyncio.all_tasks() if t.get_name().startswith("redis-bus-")]
    assert leftovers == []
    with pytest.raises(RuntimeError):
        await bus.start()


@pytest.mark.parametrize("yields", range(8))
async def test_close_with_a_publish_in_flight_does_not_hang(
    redis_server: RedisServer, yields: int, caplog: pytest.LogCaptureFixture
) -> None:
    # Regression: redis-py may turn the cancellation of an in-flight PUBLISH into a
    # ConnectionError; the publisher must not mistake that for an outage and carry on.
    caplog.set_level(logging.INFO, logger="backends.chat.bus")
    bus = fast_bus(redis_server.url)
    await bus.start()
    await bus.wait_connected(5)
    bus.publish({"text": "x"})
    for _ in range(yields):
        await asyncio.sleep(0)
    await asyncio.wait_for(bus.close(), 3)
    assert "redis unavailable" not in caplog.text
    assert "did not stop" not in caplog.text


def test_redact_url() -> None:
    assert redact_url("redis://:s3cret@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://u:s3cret@h/0") == "redis://u:***@h/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
