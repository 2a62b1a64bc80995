"""Graceful shutdown (issue 4): stop accepting, finish requests, give tunnels shutdown_timeout.

``Proxy.close()`` in-process with real backends and clients, then the CLI: SIGTERM to a real
``python -m lbproxy`` with an open WebSocket exits 0 once ``shutdown_timeout`` has passed,
and a second signal exits at once.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from tests.support import config_doc, free_port, proxy_url, wait_for

ROOT = Path(__file__).resolve().parents[2]


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def tunnels(proxy: Proxy) -> int:
    return sum(1 for c in proxy.connections() if type(c).__name__ == "Tunnel")


async def echo(ws: aiohttp.ClientWebSocketResponse, text: str) -> str:
    await ws.send_str(text)
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return str(msg.data)


async def keepalive_connection(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw HTTP/1.1 connection that has had one answered request and now sits idle."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: test\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    assert await asyncio.wait_for(reader.readexactly(length), 5) == b"A"
    return reader, writer


async def test_ordered_shutdown(make_backend, make_proxy):
    """Refuse at once, close idle keep-alive, finish the request, cut tunnels at the timeout."""
    a = await make_backend("A")
    # 3 s: long enough that the steps before the timeout fit in it on a loaded machine.
    proxy = await make_proxy(config_doc([a.address], shutdown_timeout="3s"))
    port = proxy.listeners.address("web").port
    stats = proxy.registry.listeners["web"]
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"ws://127.0.0.1:{port}/ws")
        assert await echo(ws, "hello") == "hello"
        reader, writer = await keepalive_connection(port)
        slow = asyncio.create_task(s.get(proxy_url(proxy, path="/sleep/0.5")))
        await wait_for(lambda: any(r[1] == "/sleep/0.5" for r in a.requests), what="the request")

        t0 = time.monotonic()
        closing = asyncio.create_task(proxy.close())
        await asyncio.sleep(0)  # close() stops accepting before its first await
        assert refused(port)
        # The idle keep-alive connection is closed right away: while the shutdown still waits
        # for the request and the tunnel (the bound is a hang guard).
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert not closing.done()
        writer.close()
        # The request in flight completes.
        async with await asyncio.wait_for(slow, 5) as r:
            assert r.status == 200
            assert await r.text() == "A slept"
        # The tunnel still works after the requests are done...
        assert not closing.done()
        assert await echo(ws, "still open") == "still open"
        assert tunnels(proxy) == 1
        # ...until shutdown_timeout, then it is closed.
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await asyncio.wait_for(closing, 10)
        elapsed = time.monotonic() - t0
    assert 3.0 - 0.1 < elapsed < 3.0 + 5, elapsed  # not before shutdown_timeout
    assert stats.ws_closes["shutdown"] == 1
    assert sum(stats.ws_closes.values()) == 1
    assert proxy.connections() == []
    assert stats.connections_active == 0
    assert proxy.checker._tasks == {}


async def test_tunnel_closing_by_itself_ends_shutdown_early(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], shutdown_timeout="30s"))
    stats = proxy.registry.listeners["web"]
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"ws://{proxy.listeners.address('web')}/ws")
        assert await echo(ws, "hello") == "hello"
        closing = asyncio.create_task(proxy.close())
        await asyncio.sleep(0.2)
        assert not closing.done()
        t0 = time.monotonic()
        await ws.close()
        await asyncio.wait_for(closing, 15)
        assert time.monotonic() - t0 < 15  # when the tunnel closed, not at shutdown_timeout
    assert stats.ws_closes["client"] == 1
    assert stats.ws_closes["shutdown"] == 0


async def test_server_closing_the_tunnel_ends_shutdown_early(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], shutdown_timeout="30s"))
    stats = proxy.registry.listeners["web"]
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"ws://{proxy.listeners.address('web')}/ws")
        closing = asyncio.create_task(proxy.close())
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await ws.send_str("close:4001")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert msg.data == 4001  # the backend's close frame passes through untouched
        await asyncio.wait_for(closing, 15)
        assert time.monotonic() - t0 < 15  # when the tunnel closed, not at shutdown_timeout
    assert stats.ws_closes["server"] == 1
    assert stats.ws_closes["shutdown"] == 0


async def test_close_without_connections_returns_at_once(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], shutdown_timeout="30s"))
    port = proxy.listeners.address("web").port
    t0 = time.monotonic()
    await asyncio.wait_for(proxy.close(), 15)
    assert time.monotonic() - t0 < 15  # nothing to wait for: not the 30 s shutdown_timeout
    assert refused(port)
    await proxy.close()  # idempotent


# ------------------------------------------------------------------ the CLI


class ProxyProcess:
    """``python -m lbproxy --config F`` with stderr collected."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, path: Path) -> ProxyProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lbproxy",
            "--config",
            str(path),
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        await wait_for(lambda: any("admin on" in x for x in self.log), 10, "startup")
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.log.append(line.decode(errors="replace").rstrip())

    async def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)


async def start_process(tmp_path: Path, backend: str, shutdown: str) -> tuple[ProxyProcess, int]:
    port, admin = free_port(), free_port()
    d: dict[str, Any] = config_doc(
        [backend],
        listener={"bind": f"127.0.0.1:{port}"},
        admin={"bind": f"127.0.0.1:{admin}"},
        shutdown_timeout=shutdown,
    )
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(d))
    return await ProxyProcess().start(path), port


async def open_tunnel(s: aiohttp.ClientSession, port: int) -> aiohttp.ClientWebSocketResponse:
    async def up() -> bool:
        try:
            async with s.get(f"http://127.0.0.1:{port}/whoami") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(up, 5, "the backend to be up")
    ws = await s.ws_connect(f"ws://127.0.0.1:{port}/ws")
    assert await echo(ws, "hi") == "hi"
    return ws


async def test_sigterm_waits_for_tunnels_up_to_shutdown_timeout(make_backend, tmp_path):
    a = await make_backend("A")
    p, port = await start_process(tmp_path, a.address, "3s")
    try:
        async with aiohttp.ClientSession() as s:
            ws = await open_tunnel(s, port)
            assert p.proc is not None
            t0 = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: refused(port), 10, "the listener to close")
            assert await echo(ws, "during shutdown") == "during shutdown"
            assert await p.wait(15) == 0
            elapsed = time.monotonic() - t0
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert 3.0 - 0.1 < elapsed < 3.0 + 8, elapsed  # at shutdown_timeout, not before
        await p.kill()  # collects the rest of the log
        assert any("closing 1 connections still open" in x for x in p.log), p.log
        assert any(x.endswith("stopped") for x in p.log)
    finally:
        await p.kill()


async def test_second_sigterm_exits_at_once(make_backend, tmp_path):
    a = await make_backend("A")
    p, port = await start_process(tmp_path, a.address, "30s")
    try:
        async with aiohttp.ClientSession() as s:
            ws = await open_tunnel(s, port)
            assert p.proc is not None
            p.proc.send_signal(signal.SIGTERM)
            await wait_for(lambda: refused(port), 10, "the listener to close")
            assert await echo(ws, "draining") == "draining"
            t0 = time.monotonic()
            p.proc.send_signal(signal.SIGTERM)
            assert await p.wait(15) == 0
            assert time.monotonic() - t0 < 15  # at once, not at shutdown_timeout (30 s)
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    finally:
        await p.kill()


async def test_reload_during_shutdown_does_not_reopen_listeners(make_backend, make_proxy):
    a = await make_backend("A")
    b = await make_backend("B")
    # 30 s: the tunnel is still draining whatever the load; the test closes it itself.
    proxy = await make_proxy(config_doc([a.address], shutdown_timeout="30s"))
    port = proxy.listeners.address("web").port
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"ws://127.0.0.1:{port}/ws")
        closing = asyncio.create_task(proxy.close())
        await asyncio.sleep(0)
        assert refused(port)
        result = await proxy.apply_config(
            parse_config(config_doc([b.address], listener={"idle_timeout": "5s"})), "SIGHUP"
        )
        assert not result.ok
        assert "shutting down" in result.message
        assert proxy.listeners.bound == {}
        assert refused(port)
        assert await echo(ws, "still draining") == "still draining"
        await ws.close()
        await asyncio.wait_for(closing, 15)
    assert proxy.checker._tasks == {}
