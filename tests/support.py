"""Test support: real backends on loopback port 0, a proxy started in-process, and waits.

Everything here uses real sockets; nothing is mocked. ``wait_for`` polls a condition with a
bound instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import WSMsgType, web

from lbproxy.config import Config, parse_config
from lbproxy.control.app import Proxy
from lbproxy.control.loading import ConfigFile

# A wait's timeout is a hang guard, never a speed check: what a test expects within ``timeout``
# on an idle machine is given HANG_GUARD times as long, so a machine whose cores are busy with
# other work (scripts/test-under-load) never fails a test that is only slow.
HANG_GUARD = 4.0


async def wait_for(
    cond: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll ``cond`` every few ms until it holds; fail the test after ``timeout`` seconds
    times HANG_GUARD (a hang, not a slow machine)."""
    deadline = time.monotonic() + timeout * HANG_GUARD
    while True:
        r = cond()
        if not isinstance(r, bool):
            r = await r
        if r:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout * HANG_GUARD:g}s waiting for {what}")
        await asyncio.sleep(0.01)


def expected_build() -> str:
    """What ``buildinfo.kind()`` must say in this run: scripts/test (or conftest.py, from what
    scripts/build.py built) sets LBPROXY_EXPECT_BUILD to ``compiled`` or ``pure``."""
    return {"compiled": "compiled (mypyc)", "pure": "pure"}[os.environ["LBPROXY_EXPECT_BUILD"]]


def compile_c_extension(name: str, beside: str) -> Any:
    """The C extension ``name`` (its source ``name.c`` beside the module file ``beside``),
    compiled and loaded here: the pure build has none of the compiled build's C modules, and
    its run checks their sources too (with the system C compiler, as the build does)."""
    import importlib.machinery
    import importlib.util
    import subprocess
    import sysconfig
    import tempfile
    from pathlib import Path

    out = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    so = out / (name + importlib.machinery.EXTENSION_SUFFIXES[0])
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    include = sysconfig.get_paths()["include"]
    src = Path(beside).with_name(f"{name}.c")
    subprocess.run([cc, "-O2", "-shared", "-fPIC", f"-I{include}", str(src), "-o", str(so)],
                   check=True)  # fmt: skip
    spec = importlib.util.spec_from_file_location(name, so)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        resp = web.WebSocketResponse(protocols=("chat", "superchat"), max_msg_size=0, compress=True)
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
    """A real aiohttp server on ``host`` (127.0.0.1 unless told: any 127.0.0.0/8 address, or
    ::1); ``stop``/``start`` keep the same port."""

    def __init__(self, app: web.Application, port: int = 0, host: str = "127.0.0.1") -> None:
        self.app = app
        self.port = port
        self.host = host
        self.runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def name(self) -> str:
        return self.app[NAME]

    @property
    def requests(self) -> list[Any]:
        return self.app[REQUESTS]

    async def start(self) -> Backend:
        self.runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port, reuse_address=True)
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
    proxy = Proxy(config, ConfigFile(path) if path is not None else None)
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


# ------------------------------------------------------------------ raw HTTP on both sides
# Byte-level tools for what a real HTTP library would hide or refuse to do: hand-written
# requests, exact response heads, and backends that misbehave on purpose.


# A WebSocket upgrade of /ws as a client writes it by hand (RFC 6455's sample key).
WS_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def raw_websocket(proxy: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket upgraded by hand through ``proxy``'s ``web`` listener, past its 101: for a
    client that ends without a close frame or never answers one."""
    address = proxy.listeners.address("web")
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(WS_UPGRADE)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


class RawResponse:
    """A response read byte by byte: ``head`` as received, ``body`` de-chunked if it was."""

    def __init__(
        self,
        status: int,
        head: bytes,
        headers: list[tuple[str, str]],
        body: bytes,
        raw_body: bytes,
        trailers: list[tuple[str, str]],
    ) -> None:
        self.status = status
        self.head = head
        self.headers = headers
        self.body = body
        self.raw_body = raw_body  # the body exactly as framed on the wire
        self.trailers = trailers

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (any case), or None."""
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        lname = name.lower()
        return [v for k, v in self.headers if k.lower() == lname]

    @property
    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    def __repr__(self) -> str:
        return f"RawResponse({self.head!r}, body={self.body[:80]!r})"


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """Split a head (start line + fields, CRLFCRLF optional) into its first line and fields."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return lines[0].decode("latin-1"), fields


async def read_response(reader: asyncio.StreamReader, method: str = "GET") -> RawResponse:
    """Read one response (1xx interim responses skipped) and its body, however it is framed:
    none (HEAD, 1xx, 204, 304), chunked, Content-Length, or until the connection closes."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        start, headers = parse_head(head)
        status = int(start.split(" ")[1])
        if status >= 200 or status == 101:
            break
    resp = RawResponse(status, head, headers, b"", b"", [])
    te = (resp.header("Transfer-Encoding") or "").lower()
    length = resp.header("Content-Length")
    if method == "HEAD" or status < 200 or status in (204, 304):
        return resp
    if te == "chunked":
        body = bytearray()
        raw = bytearray()
        while True:
            line = await reader.readuntil(b"\r\n")
            raw += line
            size = int(line.split(b";")[0].strip(), 16)
            if size == 0:
                break
            data = await reader.readexactly(size + 2)
            raw += data
            body += data[:-2]
        while True:  # trailer section
            line = await reader.readuntil(b"\r\n")
            raw += line
            if line == b"\r\n":
                break
            name, _, value = line.rstrip(b"\r\n").partition(b":")
            resp.trailers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        resp.body, resp.raw_body = bytes(body), bytes(raw)
    elif length is not None:
        resp.body = resp.raw_body = await reader.readexactly(int(length))
    else:
        resp.body = resp.raw_body = await reader.read(-1)
    return resp


async def read_request_head(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]]:
    """For raw backends: the request line and fields of the next request head."""
    return parse_head(await reader.readuntil(b"\r\n\r\n"))


async def at_eof(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True when the peer closed (nothing more to read) within ``timeout``."""
    async with asyncio.timeout(timeout):
        rest = await reader.read(-1)
    assert rest == b"", f"unexpected bytes before EOF: {rest[:200]!r}"
    return True


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A hand-written TCP server on 127.0.0.1 port 0: ``handler(reader, writer)`` runs per
    connection (it owns closing the writer; leftovers are closed on ``stop``). Use it as a
    backend that misbehaves on purpose, with health checks disabled in its group."""

    def __init__(self, handler: RawHandler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.port = 0
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # surfaced by tests that check ``errors``
            self.errors.append(exc)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in list(self._writers):
                w.transport.abort()
            self.server = None

    async def __aenter__(self) -> RawServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def rss_bytes() -> int:
    """This process's resident set size (the in-process proxy, the backends and the test)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class RssSampler:
    """Samples RSS every few ms on the event loop while active; ``growth`` is the peak seen
    minus the value at entry. ``async with RssSampler() as m: ...; assert m.growth < X``.
    Given a proxy it also records ``buffered_peak``, the most ``proxy_buffered`` seen."""

    def __init__(self, proxy: Proxy | None = None, period: float = 0.005) -> None:
        self.proxy = proxy
        self.period = period
        self.start = 0
        self.peak = 0
        self.buffered_peak = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, rss_bytes())
            if self.proxy is not None:
                self.buffered_peak = max(self.buffered_peak, proxy_buffered(self.proxy))
            await asyncio.sleep(self.period)

    @property
    def growth(self) -> int:
        return max(self.peak, rss_bytes()) - self.start

    async def __aenter__(self) -> RssSampler:
        self.start = self.peak = rss_bytes()
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self.peak = max(self.peak, rss_bytes())


async def open_proxy(
    proxy: Proxy, listener: str = "web"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw TCP connection to a listener of ``proxy``."""
    a = proxy.listeners.address(listener)
    return await asyncio.open_connection(a.host, a.port)


def proxy_buffered(proxy: Proxy) -> int:
    """Bytes the proxy holds in its transports' write buffers, over every live connection
    (client and upstream side of HTTP connections and of WebSocket tunnels)."""
    total = 0
    for c in proxy.connections():
        transports = [getattr(c, "transport", None), getattr(c, "client", None)]
        up = getattr(c, "up", None)
        transports.append(getattr(c, "upstream", None) or (up.transport if up else None))
        for t in transports:
            if t is not None and not t.is_closing():
                total += t.get_write_buffer_size()
    return total
