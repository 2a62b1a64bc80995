"""One chat backend on an in-memory bus: WebSocket protocol, limits, HTTP endpoints, page."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
import pytest
from aiohttp import WSCloseCode, WSMsgType
from aiohttp.test_utils import TestClient

from backends.chat.app import HUB_KEY, MAX_MESSAGE_BYTES, ChatServer, Client, make_app
from backends.chat.bus import MemoryBus
from tests.backends.helpers import connect, messages_until, recv_json, say, texts

TOO_LARGE = {"type": "error", "error": "message too large (max 65536 bytes)"}


@pytest.fixture
async def chat(aiohttp_client: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = await aiohttp_client(make_app("ECS01", MemoryBus()))
    return client


def frame_of_size(size: int, user: str = "alice") -> str:
    """A valid chat message frame whose UTF-8 encoding is exactly ``size`` bytes."""
    base = json.dumps({"type": "message", "user": user, "text": ""})
    frame = json.dumps({"type": "message", "user": user, "text": "x" * (size - len(base))})
    assert len(frame.encode()) == size
    return frame


async def test_hello_on_connect(chat: TestClient[Any, Any]) -> None:
    ws = await chat.ws_connect("/ws")
    assert await recv_json(ws) == {"type": "hello", "backend": "ECS01"}
    await ws.close()


async def test_message_reaches_every_local_client_tagged(chat: TestClient[Any, Any]) -> None:
    clients = [await connect(chat, "/ws", "ECS01") for _ in range(3)]
    await say(clients[0], "alice", "hello <b>all</b>")
    received = [await recv_json(ws) for ws in clients]
    first = received[0]
    assert first["type"] == "message"
    assert first["user"] == "alice"
    assert first["text"] == "hello <b>all</b>"
    assert first["backend"] == "ECS01"
    assert isinstance(first["ts"], int) and first["ts"] > 1_600_000_000_000
    assert re.fullmatch(r"[0-9a-f]{32}", first["id"])
    assert all(m == first for m in received), received  # sender included, same message


async def test_ping_pong(chat: TestClient[Any, Any]) -> None:
    ws = await connect(chat, "/ws")
    await ws.send_json({"type": "ping"})
    assert await recv_json(ws) == {"type": "pong"}


async def test_size_limit_both_sides(chat: TestClient[Any, Any]) -> None:
    sender = await connect(chat, "/ws")
    other = await connect(chat, "/ws")

    await sender.send_str(frame_of_size(MAX_MESSAGE_BYTES))  # exactly 64 KiB: accepted
    for ws in (sender, other):
        msg = await recv_json(ws)
        assert msg["type"] == "message" and len(msg["text"]) > 65000

    await sender.send_str(frame_of_size(MAX_MESSAGE_BYTES + 1))  # one byte more: rejected
    assert await recv_json(sender) == TOO_LARGE

    # Bytes, not characters: 30000 euro signs are 90000 UTF-8 bytes.
    await say(sender, "alice", "€" * 30000)
    assert await recv_json(sender) == TOO_LARGE

    # The connection stays usable and nothing was broadcast: the marker comes next.
    await say(sender, "alice", "marker")
    assert texts(await messages_until(other, "marker")) == ["marker"]
    assert texts(await messages_until(sender, "marker")) == ["marker"]


async def test_frames_over_hard_limit_close_the_connection(chat: TestClient[Any, Any]) -> None:
    ws = await connect(chat, "/ws")
    await ws.send_str("x" * (1024 * 1024 + 1))
    frame = await ws.receive(timeout=5)
    assert frame.type is WSMsgType.CLOSE
    assert frame.data == WSCloseCode.MESSAGE_TOO_BIG


async def test_malformed_json_keeps_connection_open(chat: TestClient[Any, Any]) -> None:
    ws = await connect(chat, "/ws")
    await ws.send_str('{"type": "message", "user": "alice", "text": ')
    err = await recv_json(ws)
    assert err["type"] == "error"
    assert err["error"].startswith("malformed JSON")
    await ws.send_json({"type": "ping"})
    assert await recv_json(ws) == {"type": "pong"}


@pytest.mark.parametrize(
    ("frame", "error"),
    [
        ("[1, 2]", "expected a JSON object"),
        ('"hi"', "expected a JSON object"),
        ("{}", 'missing or invalid "type"'),
        ('{"type": "shout"}', "unknown message type: 'shout'"),
        ('{"type": "message", "text": "hi"}', '"user" must be a non-empty string'),
        ('{"type": "message", "user": "  ", "text": "hi"}', '"user" must be a non-empty string'),
        ('{"type": "message", "user": "' + "u" * 65 + '", "text": "hi"}', '"user" must be'),
        ('{"type": "message", "user": "alice"}', '"text" must be a non-empty string'),
        ('{"type": "message", "user": "alice", "text": " \\n "}', '"text" must be'),
        ('{"type": "message", "user": "alice", "text": 42}', '"text" must be'),
    ],
)
async def test_invalid_frames_get_an_error_and_nothing_is_broadcast(
    chat: TestClient[Any, Any], frame: str, error: str
) -> None:
    sender = await connect(chat, "/ws")
    other = await connect(chat, "/ws")
    await sender.send_str(frame)
    err = await recv_json(sender)
    assert err["type"] == "error"
    assert err["error"].startswith(error), err
    await say(sender, "alice", "marker")
    assert texts(await messages_until(other, "marker")) == ["marker"]


async def test_binary_frames_are_refused(chat: TestClient[Any, Any]) -> None:
    ws = await connect(chat, "/ws")
    await ws.send_bytes(b'{"type": "ping"}')
    err = await recv_json(ws)
    assert err["type"] == "error" and "binary" in err["error"]
    await ws.send_json({"type": "ping"})
    assert await recv_json(ws) == {"type": "pong"}


async def test_user_name_is_trimmed(chat: TestClient[Any, Any]) -> None:
    ws = await connect(chat, "/ws")
    await say(ws, "  bob ", "hi")
    assert (await recv_json(ws))["user"] == "bob"


async def test_health_whoami_and_backend_header(chat: TestClient[Any, Any]) -> None:
    resp = await chat.get("/health")
    assert resp.status == 200
    assert await resp.text() == "ok"
    assert resp.headers["X-Backend"] == "ECS01"

    resp = await chat.head("/health")
    assert resp.status == 200
    assert await resp.read() == b""

    resp = await chat.get("/whoami")
    assert resp.status == 200
    assert await resp.text() == "ECS01"
    assert resp.headers["X-Backend"] == "ECS01"


async def test_health_is_503_once_shutting_down(chat: TestClient[Any, Any]) -> None:
    ws = await connect(chat, "/ws")
    await chat.app[HUB_KEY].close()
    frame = await ws.receive(timeout=5)
    assert frame.type is WSMsgType.CLOSE
    assert frame.data == WSCloseCode.GOING_AWAY
    resp = await chat.get("/health")
    assert resp.status == 503


async def test_page_and_assets_are_self_contained(chat: TestClient[Any, Any]) -> None:
    resp = await chat.get("/")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert "'self'" in resp.headers["Content-Security-Policy"]
    page = await resp.text()
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page)
    assert sorted(assets) == ["static/chat.css", "static/chat.js"]

    bodies = {"/": page}
    for asset in assets:
        resp = await chat.get("/" + asset)
        assert resp.status == 200, asset
        bodies[asset] = await resp.text()
    assert resp.headers["X-Content-Type-Options"] == "nosniff"

    for name, body in bodies.items():
        for needle in ("http://", "https://", "//cdn", "@import", "url("):
            assert needle not in body, f"{needle!r} in {name}"


async def test_page_renders_text_never_html(chat: TestClient[Any, Any]) -> None:
    js = await (await chat.get("/static/chat.js")).text()
    assert "textContent" in js
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js, sink
    # Keep-alive and URL derivation the proxy relies on.
    assert "PING_INTERVAL_MS = 30000" in js
    assert 'location.protocol === "https:" ? "wss:" : "ws:"' in js
    page = await (await chat.get("/")).text()
    assert "<script>" not in page and "onclick" not in page  # no inline code (CSP)


async def test_shutdown_closes_websockets_with_going_away() -> None:
    server = ChatServer("ECS01", MemoryBus())
    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            ws = await connect(session, server.url + "/ws", "ECS01")
            closing = asyncio.create_task(server.close())
            frame = await ws.receive(timeout=5)
            assert frame.type is WSMsgType.CLOSE
            assert frame.data == WSCloseCode.GOING_AWAY
            await asyncio.wait_for(closing, 5)
    finally:
        await server.close()


class FakeWS:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed_with: int | None = None

    async def send_str(self, data: str) -> None:
        self.sent.append(data)

    async def close(self, *, code: int, message: bytes = b"") -> bool:
        self.closed_with = code
        return True


async def test_client_that_falls_behind_is_disconnected() -> None:
    fake = FakeWS()
    client = Client(fake, "peer", queue_size=2)  # type: ignore[arg-type]
    for i in range(3):  # the third frame overflows the queue
        client.send({"n": i})
    client.send({"n": 99})  # ignored once kicked
    client.start()
    for _ in range(100):
        if fake.closed_with is not None:
            break
        await asyncio.sleep(0.01)
    await client.close()
    assert fake.closed_with == WSCloseCode.TRY_AGAIN_LATER
    assert fake.sent == []  # the backlog was dropped, not delivered late
