"""Test support: real backends on loopback port 0, a proxy started in-process, and waits.

Everything here uses real sockets; nothing is mocked. ``wait_for`` polls a condition with a
bound instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from lbproxy.app import Proxy
from lbproxy.config import Config, parse_config


async def wait_for(
    cond: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``cond`` every few ms until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        r = cond()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


NAME = web.AppKey("name", str)
REQUESTS = web.AppKey("requests", list)  # (method, path_qs, headers) of every request seen


def backend_app(name: str) -> web.Application:
    """A backend with handy endpoints; every response says which backend answered."""
    app = web.Application(client_max_size=2**31)
    app[NAME] = name
    app[REQUESTS] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        app[REQUESTS].append((request.method, request.path_qs, dict(request.headers)))
        resp: web.StreamResponse = await handler(request)
        return resp

    app.middlewares.append(record)

    async def whoami(request: web.Request) -> web.Response:
        return web.Response(text=name)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def headers(request: web.Request) -> web.Response:
        return web.json_response(
            {"backend": name, "headers": [[k, v] for k, v in request.headers.items()]}
        )

    async def upload(request: web.Request) -> web.Response:
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_any():
            h.update(chunk)
            n += len(chunk)
        return web.json_response({"backend": name, "bytes": n, "sha256": h.hexdigest()})

    async def download(request: web.Request) -> web.StreamResponse:
        """``/download/N?chunked=1``: N bytes of a repeating pattern, streamed."""
        total = int(request.match_info["n"])
        chunked = request.query.get("chunked") == "1"
        resp = web.StreamResponse()
        if chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = total
        await resp.prepare(request)
        block = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while sent < total:
            piece = block[: min(len(block), total - sent)]
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
        return resp

    async def sleep(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.match_info["s"]))
        return web.Response(text=f"{name} slept")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text=name)

    async def ws(request: web.Request) -> web.WebSocketResponse:
        """Echo; ``close:NNNN`` closes with that code; ``whoami`` answers the backend name."""
        resp = web.WebSocketResponse(
            protocols=("chat", "superchat"), max_msg_size=0, compress=True
        )
        await resp.prepare(request)
        async for msg in resp:
            if msg.type == WSMsgType.TEXT:
                if msg.data.startswith("close:"):
                    await resp.close(code=int(msg.data[6:]), message=b"bye")
                    break
                if msg.data == "whoami":
                    await resp.send_str(name)
                else:
                    await resp.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await resp.send_bytes(msg.data)
        return resp

    app.router.add_get("/whoami", whoami)
    app.router.add_route("*", "/health", health)
    app.router.add_route("*", "/headers", headers)
    app.router.add_route("*", "/upload", upload)
    app.router.add_get("/download/{n}", download)
    app.router.add_get("/sleep/{s}", sleep)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/ws", ws)
    return app


class Backend:
    """A real aiohttp server on 127.0.0.1; ``stop``/``start`` keep the same port."""

    def __init__(self, app: web.Application, port: int = 0) -> None:
        self.app = app
        self.port = port
        self.runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return self.app[NAME]

    @property
    def requests(self) -> list[Any]:
        return self.app[REQUESTS]

    async def start(self) -> Backend:
        self.runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def config_doc(
    servers: list[str],
    *,
    listener: dict[str, Any] | None = None,
    group: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """A config mapping with one listener ``web`` on port 0 and one group ``rs1``."""
    lst = {"name": "web", "bind": "127.0.0.1:0", "server_group": "rs1"}
    lst.update(listener or {})
    grp: dict[str, Any] = {
        "servers": [{"address": s} for s in servers],
        "health_check": {"interval": "200ms", "timeout": "1s", "path": "/health"},
    }
    grp.update(group or {})
    doc: dict[str, Any] = {
        "listeners": [lst],
        "server_groups": {"rs1": grp},
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }
    doc.update(top)
    return doc


async def start_proxy(doc: dict[str, Any] | Config, path: str | None = None) -> Proxy:
    """Start a proxy in this event loop and wait until every checked server is up."""
    config = doc if isinstance(doc, Config) else parse_config(doc)
    proxy = Proxy(config, path)
    await proxy.start()
    groups = proxy.holder.current.groups.values()
    await wait_for(
        lambda: all(s.health.available for g in groups if g.checks for s in g.servers),
        what="every server to pass its first health check",
    )
    return proxy


def proxy_url(proxy: Proxy, listener: str = "web", path: str = "/") -> str:
    a = proxy.listeners.address(listener)
    return f"http://{a}{path}"


async def raw_request(host: str, port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes, half-close nothing, and read until the server closes (bounded)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        out = b""
        async with asyncio.timeout(read_timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
        return out
    finally:
        writer.close()
