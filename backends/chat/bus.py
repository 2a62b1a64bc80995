"""Message bus that fans chat messages out between backend instances.

This module owns the *transport between backends*; it knows nothing about HTTP or
WebSockets. A bus carries JSON objects (``dict[str, Any]``) and has a small interface:

* ``subscribe(callback) -> unsubscribe``: ``callback(msg)`` is called (synchronously, on
  the event loop) for every message published on the bus, including this process's own.
  Callbacks must be quick and must not mutate ``msg`` (it is shared between subscribers).
* ``publish(msg)``: never blocks and never raises on transport trouble. The message is
  delivered to this bus's local subscribers immediately and directly, then (for
  ``RedisBus``) handed to Redis for the *other* backend instances.
* ``await start()`` / ``await close()``: own every background task of the bus.

Implementations:

* ``MemoryBus``: in-process only. Several apps in one process may share one instance
  (the demo does this when no redis-server is available).
* ``RedisBus``: Redis pub/sub on one channel. Every published message is wrapped as
  ``{"origin": <instance_id>, "msg": <msg>}``; an instance skips its own messages when
  they come back from Redis, so local users never see duplicates. When Redis goes away
  the bus keeps delivering locally, logs ``redis unavailable: ...; retrying`` once per
  outage, reconnects with capped exponential backoff (with jitter), logs ``redis back``
  and resumes fan-out. Messages published during an outage reach local subscribers only;
  they are not replayed to the other backends later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = [
    "DEFAULT_CHANNEL",
    "Bus",
    "JsonObject",
    "MemoryBus",
    "RedisBus",
    "Subscriber",
    "redact_url",
]

log = logging.getLogger(__name__)

JsonObject = dict[str, Any]
Subscriber = Callable[[JsonObject], None]

DEFAULT_CHANNEL = "lbproxy-chat"


class Bus(ABC):
    """Base class: subscriber bookkeeping and local delivery; transports subclass it."""

    def __init__(self) -> None:
        #: Unique per bus object; RedisBus tags published messages with it.
        self.instance_id: str = uuid.uuid4().hex
        self._subscribers: list[Subscriber] = []

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call ``callback(msg)`` for every message on the bus; returns an unsubscribe function."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def _deliver(self, msg: JsonObject) -> None:
        """Hand ``msg`` to every local subscriber; a failing subscriber does not stop the rest."""
        for callback in list(self._subscribers):
            try:
                callback(msg)
            except Exception:
                log.exception("bus subscriber %r failed", callback)

    @abstractmethod
    async def start(self) -> None:
        """Start background work (if any). Call once, from the event loop."""

    @abstractmethod
    def publish(self, msg: JsonObject) -> None:
        """Deliver ``msg`` to local subscribers now and to other instances (if any) soon."""

    @abstractmethod
    async def close(self) -> None:
        """Stop background work and wait for it. Idempotent."""


class MemoryBus(Bus):
    """In-process bus: ``publish`` delivers straight to every subscriber of this object."""

    async def start(self) -> None:
        return None

    def publish(self, msg: JsonObject) -> None:
        self._deliver(msg)

    async def close(self) -> None:
        return None


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RedisBus(Bus):
    """Redis pub/sub bus with local-first delivery and automatic reconnection.

    Tasks owned (created by ``start``, cancelled and awaited by ``close``):

    * the subscriber: connect, SUBSCRIBE, read messages, PING every ``ping_interval``
      seconds (no reply within ``3 * ping_interval`` counts as an outage), and on any
      failure wait ``retry_initial`` doubling up to ``retry_max`` seconds (each wait
      jittered to 50-100 %) before reconnecting;
    * the publisher: drains an outbox of at most ``outbox_size`` messages into PUBLISH.
      While Redis is down, or when the outbox is full, messages for the other backends
      are dropped (counted in ``dropped``); local delivery is never affected.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        channel: str = DEFAULT_CHANNEL,
        retry_initial: float = 0.5,
        retry_max: float = 10.0,
        timeout: float = 2.0,
        ping_interval: float = 5.0,
        outbox_size: int = 1000,
    ) -> None:
        super().__init__()
        if retry_initial <= 0 or retry_max < retry_initial:
            raise ValueError("need 0 < retry_initial <= retry_max")
        self.url = url
        self.channel = channel
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._client: Redis | None = None  # set while subscribed and usable
        self._up = asyncio.Event()
        self._reconnect = asyncio.Event()  # set by the publisher when PUBLISH fails
        self._outbox: asyncio.Queue[str] = asyncio.Queue(maxsize=outbox_size)
        self._outbox_full = False
        self._outage = False  # True from the first failure until the next success
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        #: Messages that could not be sent to Redis (outage or full outbox).
        self.dropped = 0
        #: Connection attempts so far (the first one included).
        self.connect_attempts = 0

    @property
    def connected(self) -> bool:
        """True while subscribed to the channel and able to publish."""
        return self._client is not None

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until ``connected`` (raises ``TimeoutError`` after ``timeout`` seconds)."""
        async with asyncio.timeout(timeout):
            await self._up.wait()

    async def start(self) -> None:
        if self._tasks or self._closed:
            raise RuntimeError("RedisBus.start() called twice or after close()")
        self._tasks = [
            asyncio.create_task(self._run_subscriber(), name=f"redis-bus-sub-{self.channel}"),
            asyncio.create_task(self._run_publisher(), name=f"redis-bus-pub-{self.channel}"),
        ]

    async def close(self) -> None:
        self._closed = True
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=self._timeout + 1.0)
            for task in pending:
                log.warning("redis bus: task %s did not stop", task.get_name())
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error(
                        "redis bus: task %s failed", task.get_name(), exc_info=task.exception()
                    )
        self._client = None
        self._up.clear()

    def publish(self, msg: JsonObject) -> None:
        payload = json.dumps({"origin": self.instance_id, "msg": msg}, separators=(",", ":"))
        self._deliver(msg)
        if self._client is None:
            self.dropped += 1  # outage (already logged): the other backends miss this one
            return
        try:
            self._outbox.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped += 1
            if not self._outbox_full:
                self._outbox_full = True
                log.warning("redis outbox full; dropping messages for the other backends")
        else:
            self._outbox_full = False

    def _stopping(self) -> bool:
        """True once ``close()`` began. Checked after errors: redis-py may turn the
        cancellation of a pending command into a ConnectionError, which would otherwise be
        mistaken for an outage (and the loop would carry on)."""
        task = asyncio.current_task()
        return self._closed or (task is not None and task.cancelling() > 0)

    # -- state transitions -------------------------------------------------------------

    def _set_up(self, client: Redis) -> None:
        self._client = client
        self._up.set()
        if self._outage:
            self._outage = False
            log.info("redis back (%s, channel %s)", redact_url(self.url), self.channel)
        else:
            log.info("redis connected (%s, channel %s)", redact_url(self.url), self.channel)

    def _set_down(self, exc: BaseException) -> None:
        self._client = None
        self._up.clear()
        if not self._outage:
            self._outage = True
            log.warning("redis unavailable: %s; retrying", _describe(exc))

    # -- tasks -------------------------------------------------------------------------

    def _new_client(self) -> Redis:
        # No retries inside redis-py: failures must surface here so that the outage
        # is noticed, logged and handled by our own reconnect loop.
        return Redis.from_url(
            self.url,
            socket_connect_timeout=self._timeout,
            socket_timeout=self._timeout,
            retry=Retry(NoBackoff(), 0),
        )

    async def _run_subscriber(self) -> None:
        delay = self._retry_initial
        while not self._closed:
            self.connect_attempts += 1
            client = self._new_client()
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self._wait_subscribed(pubsub)
                self._set_up(client)
                delay = self._retry_initial
                await self._read(pubsub)
            except Exception as exc:
                if self._stopping():
                    return
                if not isinstance(exc, RedisError | OSError):
                    log.exception("redis bus: unexpected error")
                self._set_down(exc)
                log.debug("redis: attempt %d failed: %s", self.connect_attempts, _describe(exc))
            finally:
                if self._client is client:
                    self._client = None
                    self._up.clear()
                await self._dispose(pubsub, client)
            self._reconnect.clear()
            pause = delay * random.uniform(0.5, 1.0)
            log.debug("redis: next connection attempt in %.2fs", pause)
            await asyncio.sleep(pause)
            delay = min(delay * 2, self._retry_max)

    async def _wait_subscribed(self, pubsub: PubSub) -> None:
        async with asyncio.timeout(self._timeout):
            while True:
                reply = await pubsub.get_message(timeout=self._timeout)
                if reply is not None and reply["type"] == "subscribe":
                    return

    async def _read(self, pubsub: PubSub) -> None:
        """Read until something goes wrong; always ends by raising."""
        loop = asyncio.get_running_loop()
        last_seen = loop.time()
        next_ping = last_seen + self._ping_interval
        poll = min(1.0, self._ping_interval)
        while True:
            if self._reconnect.is_set():
                raise ConnectionError("publish to redis failed")
            reply = await pubsub.get_message(timeout=poll)
            now = loop.time()
            if reply is not None:
                last_seen = now
                if reply["type"] == "message":
                    self._on_redis_message(reply["data"])
            elif now - last_seen > 3 * self._ping_interval:
                raise TimeoutError(f"no reply from redis for {now - last_seen:.1f}s")
            if now >= next_ping:
                next_ping = now + self._ping_interval
                await pubsub.ping()

    def _on_redis_message(self, data: bytes | str) -> None:
        try:
            envelope = json.loads(data)
            origin = envelope["origin"]
            msg = envelope["msg"]
            if not isinstance(msg, dict):
                raise TypeError("msg is not an object")
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("ignoring malformed message on redis channel %s: %s", self.channel, exc)
            return
        if origin == self.instance_id:
            return  # already delivered locally by publish()
        self._deliver(msg)

    async def _run_publisher(self) -> None:
        while not self._closed:
            payload = await self._outbox.get()
            client = self._client
            if client is None:
                self.dropped += 1
                continue
            try:
                await client.publish(self.channel, payload)
            except Exception as exc:
                if self._stopping():
                    return
                self.dropped += 1
                if client is self._client:
                    if not isinstance(exc, RedisError | OSError):
                        log.exception("redis bus: unexpected publish error")
                    self._set_down(exc)
                    self._reconnect.set()

    @staticmethod
    async def _dispose(pubsub: PubSub, client: Redis) -> None:
        try:
            await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2
            await client.aclose()
        except Exception as exc:  # already broken; nothing more to do
            log.debug("redis bus: error while closing a connection: %s", _describe(exc))
