"""Helpers shared by the chat backend tests: bounded waits and WebSocket reads."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

JsonObject = dict[str, Any]
WS = aiohttp.ClientWebSocketResponse

# A hang guard on any single wait (a loaded machine is slow, not hung); successful waits return
# far sooner.
TIMEOUT = 20.0


async def recv_json(ws: WS, timeout: float = TIMEOUT) -> JsonObject:
    """The next frame from ``ws``, which must be a JSON text frame."""
    frame = await ws.receive(timeout=timeout)
    assert frame.type is aiohttp.WSMsgType.TEXT, f"expected a text frame, got {frame!r}"
    obj = json.loads(frame.data)
    assert isinstance(obj, dict), obj
    return obj


async def connect(session: Any, url: str, expect_backend: str | None = None) -> WS:
    """Open a chat WebSocket and consume the hello frame."""
    ws: WS = await session.ws_connect(url)
    hello = await recv_json(ws)
    assert hello["type"] == "hello", hello
    if expect_backend is not None:
        assert hello == {"type": "hello", "backend": expect_backend}
    return ws


async def say(ws: WS, user: str, text: str) -> None:
    await ws.send_str(json.dumps({"type": "message", "user": user, "text": text}))


async def messages_until(ws: WS, marker: str, timeout: float = TIMEOUT) -> list[JsonObject]:
    """Every frame up to and including the chat message whose text is ``marker``.

    Frames on one connection arrive in order and each path (local delivery, or one
    Redis subscription) is FIFO, so a marker sent *after* a message through the same
    path is a barrier: a duplicate of the message would show up before the marker.
    """
    got: list[JsonObject] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"marker {marker!r} not received; got {got!r}"
        msg = await recv_json(ws, remaining)
        got.append(msg)
        if msg.get("type") == "message" and msg.get("text") == marker:
            return got


def texts(msgs: list[JsonObject]) -> list[str]:
    return [m["text"] for m in msgs if m.get("type") == "message"]


async def wait_for(
    predicate: Callable[[], bool], timeout: float = TIMEOUT, what: str = "condition"
) -> None:
    """Poll ``predicate`` every 10 ms until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)
