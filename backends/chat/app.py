"""HTTP and WebSocket side of the chat backend.

This module owns:

* ``make_app(name, bus)``: the aiohttp application of one backend instance
  (``GET /`` chat page, ``/static/*``, ``GET /ws`` WebSocket, ``GET|HEAD /health``,
  ``GET /whoami``); every response carries an ``X-Backend: <name>`` header;
* ``ChatHub``: the connected WebSocket clients of one app and its bus subscription;
* ``Client``: one connection's outgoing queue and the writer task that drains it;
* ``ChatServer``: one app listening on a host/port (port 0 picks a free port).

The bus is *not* owned by the app: whoever creates the bus starts and closes it (so
several apps in one process can share a ``MemoryBus``). The app subscribes on startup
and unsubscribes, closing its WebSockets with 1001 "going away", on shutdown.

WebSocket protocol (JSON text frames)::

    client -> server  {"type": "message", "user": "alice", "text": "hi"}
                      {"type": "ping"}
    server -> client  {"type": "hello", "backend": "ECS01"}           (first frame)
                      {"type": "message", "id": "<hex>", "user": "alice", "text": "hi",
                       "backend": "ECS01", "ts": <Unix time in ms>}  (to every user)
                      {"type": "pong"}
                      {"type": "error", "error": "<human-readable reason>"}

A frame whose UTF-8 payload is over ``max_message_bytes`` (65536) bytes is answered with
``{"type": "error", "error": "message too large (max 65536 bytes)"}`` to the sender only;
exactly 65536 bytes is accepted. Malformed JSON, non-object JSON, unknown types, bad
fields and binary frames also get an error; the connection stays open in all these
cases. Frames over ``hard_limit_bytes`` (1 MiB) are refused by aiohttp itself, which
closes the connection with 1009 "message too big".
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from backends.chat.bus import Bus, JsonObject

__all__ = [
    "HUB_KEY",
    "MAX_MESSAGE_BYTES",
    "MAX_USER_CHARS",
    "STATIC_DIR",
    "ChatHub",
    "ChatServer",
    "Client",
    "make_app",
]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
MAX_MESSAGE_BYTES = 64 * 1024
HARD_LIMIT_BYTES = 1024 * 1024
MAX_USER_CHARS = 64

# The page is same-origin only: no inline code, no third-party anything.
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _dumps(msg: JsonObject) -> str:
    return json.dumps(msg, ensure_ascii=False, separators=(",", ":"))


def _error(reason: str) -> JsonObject:
    return {"type": "error", "error": reason}


class Client:
    """One WebSocket connection: a bounded outgoing queue and the task writing it out.

    All frames to the client go through ``send``/``send_raw`` so that exactly one task
    writes to the socket and frames keep their order. A client that falls
    ``queue_size`` frames behind is disconnected (1013 "try again later") rather than
    buffering without bound.
    """

    def __init__(self, ws: web.WebSocketResponse, peer: str, queue_size: int) -> None:
        self.ws = ws
        self.peer = peer
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._kicked = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._write(), name=f"chat-ws-writer-{self.peer}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def send(self, msg: JsonObject) -> None:
        self.send_raw(_dumps(msg))

    def send_raw(self, text: str) -> None:
        if self._kicked:
            return
        try:
            self._queue.put_nowait(text)
        except asyncio.QueueFull:
            self._kicked = True
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(None)  # tells the writer to close the connection

    async def _write(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                log.warning("disconnecting %s: too slow to keep up", self.peer)
                await self.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"too slow")
                return
            try:
                await self.ws.send_str(item)
            except (ConnectionError, RuntimeError):
                return  # connection is going away; the reader side notices and cleans up


class ChatHub:
    """The WebSocket clients of one backend app and its subscription to the bus."""

    def __init__(
        self,
        name: str,
        bus: Bus,
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        hard_limit_bytes: int = HARD_LIMIT_BYTES,
        client_queue_size: int = 256,
    ) -> None:
        if hard_limit_bytes <= max_message_bytes:
            raise ValueError("hard_limit_bytes must exceed max_message_bytes")
        self.name = name
        self.bus = bus
        self.max_message_bytes = max_message_bytes
        self.hard_limit_bytes = hard_limit_bytes
        self.client_queue_size = client_queue_size
        self.clients: set[Client] = set()
        self.closing = False
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        self._unsubscribe = self.bus.subscribe(self._on_bus_message)

    async def close(self) -> None:
        """Stop relaying and close every WebSocket with 1001 "going away"."""
        self.closing = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        closes = [
            c.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
            for c in list(self.clients)
        ]
        await asyncio.gather(*closes, return_exceptions=True)

    def _on_bus_message(self, msg: JsonObject) -> None:
        text = _dumps(msg)
        for client in list(self.clients):
            client.send_raw(text)

    async def handle_ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self.hard_limit_bytes, timeout=5.0)
        await ws.prepare(request)
        # Behind lbproxy the socket peer is the proxy; log the client it forwarded for.
        forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
        peer = forwarded or request.remote or "?"
        client = Client(ws, peer, self.client_queue_size)
        client.send({"type": "hello", "backend": self.name})
        client.start()
        self.clients.add(client)
        log.info("%s: %s connected (%d clients)", self.name, peer, len(self.clients))
        try:
            if self.closing:
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
            async for frame in ws:
                if frame.type is WSMsgType.TEXT:
                    self._handle_text(client, frame.data)
                elif frame.type is WSMsgType.BINARY:
                    client.send(_error("binary frames are not supported; send JSON text"))
                elif frame.type is WSMsgType.ERROR:
                    log.info("%s: %s websocket error: %s", self.name, peer, ws.exception())
        finally:
            self.clients.discard(client)
            await client.close()
            log.info(
                "%s: %s disconnected (code %s, %d clients)",
                self.name,
                peer,
                ws.close_code,
                len(self.clients),
            )
        return ws

    def _handle_text(self, client: Client, data: str) -> None:
        # len() counts code points; UTF-8 needs at least as many bytes.
        if len(data) > self.max_message_bytes or (
            4 * len(data) > self.max_message_bytes
            and len(data.encode("utf-8", "surrogatepass")) > self.max_message_bytes
        ):
            client.send(_error(f"message too large (max {self.max_message_bytes} bytes)"))
            return
        try:
            obj = json.loads(data)
        except ValueError as exc:
            client.send(_error(f"malformed JSON: {exc}"))
            return
        if not isinstance(obj, dict):
            client.send(_error("expected a JSON object"))
            return
        kind = obj.get("type")
        if kind == "ping":
            client.send({"type": "pong"})
        elif kind == "message":
            self._handle_message(client, obj)
        elif isinstance(kind, str) and len(kind) <= 32:
            client.send(_error(f"unknown message type: {kind!r}"))
        else:
            client.send(_error('missing or invalid "type"'))

    def _handle_message(self, client: Client, obj: JsonObject) -> None:
        user = obj.get("user")
        text = obj.get("text")
        if not isinstance(user, str) or not user.strip() or len(user.strip()) > MAX_USER_CHARS:
            client.send(
                _error(f'"user" must be a non-empty string of at most {MAX_USER_CHARS} characters')
            )
            return
        if not isinstance(text, str) or not text.strip():
            client.send(_error('"text" must be a non-empty string'))
            return
        self.bus.publish(
            {
                "type": "message",
                "id": uuid.uuid4().hex,
                "user": user.strip(),
                "text": text,
                "backend": self.name,
                "ts": int(time.time() * 1000),
            }
        )


HUB_KEY = web.AppKey("chat_hub", ChatHub)


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(
        STATIC_DIR / "index.html",
        headers={"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_CSP},
    )


async def _health(request: web.Request) -> web.Response:
    if request.app[HUB_KEY].closing:
        return web.Response(status=503, text="shutting down")
    return web.Response(text="ok", headers={"Cache-Control": "no-store"})


async def _whoami(request: web.Request) -> web.Response:
    return web.Response(text=request.app[HUB_KEY].name, headers={"Cache-Control": "no-store"})


async def _ws(request: web.Request) -> web.StreamResponse:
    return await request.app[HUB_KEY].handle_ws(request)


def make_app(
    name: str,
    bus: Bus,
    *,
    max_message_bytes: int = MAX_MESSAGE_BYTES,
    hard_limit_bytes: int = HARD_LIMIT_BYTES,
    client_queue_size: int = 256,
) -> web.Application:
    """The aiohttp app of backend ``name``, relaying chat messages through ``bus``.

    ``bus`` must be started by its owner before clients send messages (``MemoryBus``
    needs nothing); the app only subscribes/unsubscribes.
    """
    hub = ChatHub(
        name,
        bus,
        max_message_bytes=max_message_bytes,
        hard_limit_bytes=hard_limit_bytes,
        client_queue_size=client_queue_size,
    )
    app = web.Application()
    app[HUB_KEY] = hub
    app.router.add_get("/", _index)
    app.router.add_get("/health", _health)
    app.router.add_get("/whoami", _whoami)
    app.router.add_get("/ws", _ws)
    app.router.add_static("/static/", STATIC_DIR)

    async def on_startup(app: web.Application) -> None:
        await hub.start()

    async def on_shutdown(app: web.Application) -> None:
        await hub.close()

    async def on_response_prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("X-Backend", name)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_response_prepare.append(on_response_prepare)
    return app


class ChatServer:
    """Backend ``name`` served on ``host:port`` (0 = a free port); owns its AppRunner.

    ``start()`` binds and serves; ``port``/``url`` are then the real ones. ``close()``
    stops listening, closes WebSockets with 1001 and waits (up to ``shutdown_timeout``
    seconds) for handlers. Neither starts nor closes ``bus``.
    """

    def __init__(
        self,
        name: str,
        bus: Bus,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_log: bool = False,
        shutdown_timeout: float = 5.0,
        **app_options: Any,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.app = make_app(name, bus, **app_options)
        self._access_log = access_log
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("ChatServer already started")
        kwargs: dict[str, Any] = {} if self._access_log else {"access_log": None}
        runner = web.AppRunner(self.app, shutdown_timeout=self._shutdown_timeout, **kwargs)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
