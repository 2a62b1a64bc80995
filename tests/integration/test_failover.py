"""Acceptance tests of failover (issue 3): passive detection, retries, and a backend killed
under load, with real backend processes and raw TCP backends that misbehave on purpose.

What must hold: a failed connect marks the server down at once and the request is retried
on another server; a stale pooled keep-alive connection is retried without blaming the
server; a non-idempotent request whose body was sent, or any request whose response has
started, is never sent twice; WebSocket upgrades fail over the same way, and tunnels already
open are left alone when their server goes down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lbproxy.control.app import Proxy
from lbproxy.core.health import State
from lbproxy.core.snapshot import ServerState
from tests.support import (
    Backend,
    backend_app,
    config_doc,
    free_port,
    open_proxy,
    proxy_url,
    read_response,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]


def checked(**settings: Any) -> dict[str, Any]:
    """A group's ``health_check`` section: config_doc's defaults (200ms on /health) + these."""
    return {"health_check": {"interval": "200ms", "timeout": "1s", "path": "/health", **settings}}


def server(proxy: Proxy, address: str) -> ServerState:
    return proxy.state.servers[f"rs1/{address}"]


def retries(proxy: Proxy) -> int:
    return proxy.registry.retries.get("rs1", 0)


def down_lines(caplog: pytest.LogCaptureFixture, s: ServerState) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "lbproxy" and r.getMessage().startswith(f"server {s.id} is DOWN ")
    ]


# ---------------------------------------------------------------------------- backend processes

BACKEND_PROCESS = """
import sys
from aiohttp import web
from tests.support import backend_app
web.run_app(backend_app(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), print=None)
"""


async def accepts(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


class ProcessBackend:
    """``backend_app(name)`` in its own Python process, on a fixed port, to be SIGKILLed."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> float:
        """Start it and wait until it accepts connections; returns that moment (monotonic)."""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", BACKEND_PROCESS, self.name, str(self.port), cwd=ROOT
        )
        await wait_for(lambda: accepts(self.port), timeout=15, what=f"{self.name} to listen")
        return time.monotonic()

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()
        self.proc = None


@pytest.fixture
async def make_process() -> AsyncIterator[Callable[[str], Awaitable[ProcessBackend]]]:
    started: list[ProcessBackend] = []

    async def make(name: str) -> ProcessBackend:
        b = ProcessBackend(name, free_port())
        started.append(b)
        await b.start()
        return b

    yield make
    for b in started:
        await b.kill()


async def test_backend_killed_under_load_costs_no_request(make_process, make_proxy, caplog):
    caplog.set_level(logging.INFO, logger="lbproxy")
    a = await make_process("A")
    b = await make_process("B")
    interval, healthy_threshold = 0.2, 3
    group = checked(interval="200ms", healthy_threshold=healthy_threshold, unhealthy_threshold=3)
    proxy = await make_proxy(config_doc([a.address, b.address], group=group))
    url = proxy_url(proxy, path="/whoami")
    results: list[tuple[float, int, str]] = []  # (monotonic time, status, body)
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.get(url) as r:
                    results.append((time.monotonic(), r.status, await r.text()))
            except aiohttp.ClientError as exc:
                errors.append(exc)

    def served_by(name: str, since: float) -> int:
        return sum(1 for t, _, body in results if body == name and t >= since)

    connector = aiohttp.TCPConnector(limit=50)
    async with aiohttp.ClientSession(connector=connector) as session:
        clients = [asyncio.create_task(client(session)) for _ in range(50)]
        try:
            await wait_for(
                lambda: served_by("A", 0) >= 100 and served_by("B", 0) >= 100,
                timeout=10,
                what="both backends to take load",
            )
            killed_at = time.monotonic()
            await a.kill()
            await wait_for(
                lambda: server(proxy, a.address).health.state is State.DOWN,
                timeout=15,
                what="A to be marked down",
            )
            down_at = time.monotonic()
            # B alone answers the next 200 requests (counted, not a rate: a loaded machine
            # only makes them slower); every one of them is a 200, asserted below.
            await wait_for(
                lambda: served_by("B", down_at) >= 200 and not stop.is_set(),
                timeout=30,
                what="B to carry the load alone",
            )
            restarted = await a.start()
            # Back after its healthy_threshold checks; the bound is a hang guard (a loaded
            # machine makes the 200 ms checks late), the checks themselves are counted in the
            # unit tests of the health state.
            bound = interval * healthy_threshold + interval + 10.0
            await wait_for(
                lambda: served_by("A", restarted) > 0, timeout=bound, what="A to take traffic"
            )
        finally:
            stop.set()
            await asyncio.gather(*clients)

    assert errors == []
    statuses = {status for _, status, _ in results}
    assert statuses == {200}, [r for r in results if r[1] != 200][:5]
    assert served_by("B", killed_at) > 0
    assert len(results) > 500
    # However many requests saw A die at once, its transitions are logged once each.
    sa = server(proxy, a.address)
    (down,) = down_lines(caplog, sa)
    assert "(was up)" in down
    back = [r.getMessage() for r in caplog.records if f"{sa.id} is UP (was down)" in r.getMessage()]
    assert len(back) == 1 and "3 consecutive checks ok" in back[0]


# ---------------------------------------------------------------------------- passive detection


async def test_refused_connect_marks_down_at_once_and_retries(make_backend, make_proxy, caplog):
    caplog.set_level(logging.INFO, logger="lbproxy")
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(config_doc([a.address, b.address], group=checked(interval="10s")))
    sa = server(proxy, a.address)
    await a.stop()
    assert sa.health.state is State.UP  # no active check has seen it yet

    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # round-robin: one of the two picks A first
            async with session.get(proxy_url(proxy, path="/whoami")) as r:
                assert (r.status, await r.text()) == (200, "B")
        assert retries(proxy) == 1
        assert sa.health.state is State.DOWN
        assert sa.health.failures == 0  # down by the passive failure, not by a check
        assert sa.stats.health_checks["failure"] == 0
        for _ in range(4):  # A is down now: no more attempts on it
            async with session.get(proxy_url(proxy, path="/whoami")) as r:
                assert (r.status, await r.text()) == (200, "B")
        assert retries(proxy) == 1
    (line,) = down_lines(caplog, sa)
    assert "passive failure" in line and "refused" in line


async def test_failed_connect_is_retried_on_the_next_server(make_backend, make_proxy):
    backends = [await make_backend(name) for name in "ABCD"]
    group = {**checked(interval="10s"), "keepalive_connections": 0}
    proxy = await make_proxy(config_doc([b.address for b in backends], group=group))
    url = proxy_url(proxy, path="/whoami")
    async with aiohttp.ClientSession() as session:

        async def whoami() -> str:
            async with session.get(url) as r:
                assert r.status == 200
                return await r.text()

        order = [await whoami() for _ in range(4)]  # the round-robin rotation
        assert sorted(order) == ["A", "B", "C", "D"]
        victim = next(b for b in backends if b.name == order[0])  # picked next
        await victim.stop()
        expected_next = order[1]
        assert await whoami() == expected_next  # the retry goes to the next server
        assert retries(proxy) == 1
        # The rotation goes on from there over the three that are left.
        assert [await whoami() for _ in range(6)] == (order[2:] + order[1:2]) * 2


async def test_each_server_is_tried_at_most_once(make_backend, make_proxy):
    backends = [await make_backend(name) for name in "ABC"]
    proxy = await make_proxy(
        config_doc([b.address for b in backends], group=checked(interval="10s"))
    )
    for b in backends:
        await b.stop()
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(proxy, path="/whoami")) as r:
            assert r.status == 502
        assert retries(proxy) == 2
        for b in backends:
            s = server(proxy, b.address)
            assert s.health.state is State.DOWN
            assert s.stats.errors["connect"] == 1
        async with session.get(proxy_url(proxy, path="/whoami")) as r:
            assert r.status == 503
            assert "Retry-After" in r.headers


async def test_connect_timeout_marks_down_and_retries(make_backend, make_proxy, caplog):
    caplog.set_level(logging.INFO, logger="lbproxy")
    # A listener that never accepts: once its one-entry accept queue is full (the first
    # check's connection fills it), connects to it hang until the connect timeout.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    try:
        hole = f"127.0.0.1:{blackhole.getsockname()[1]}"
        b = await make_backend("B")
        doc = config_doc(
            [hole, b.address],
            group=checked(protocol="tcp", interval="10s"),
            listener={"connect_timeout": "200ms"},
        )
        proxy = await make_proxy(doc)
        sh = server(proxy, hole)
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.get(proxy_url(proxy, path="/whoami")) as r:
                    assert (r.status, await r.text()) == (200, "B")
        assert retries(proxy) == 1
        assert sh.stats.errors["timeout"] == 1
        assert sh.health.state is State.DOWN
        (line,) = down_lines(caplog, sh)
        assert "passive failure: connect timeout after 0.2s" in line
    finally:
        blackhole.close()


async def test_an_exchange_ended_while_connecting_abandons_the_connect(make_proxy):
    """The exchange ends while the proxy is still connecting to its server (here the
    listener's idle_timeout answers 504): the connect is abandoned at once, its socket closed
    (``upstream.Connecting.cancel``), not left to its connect timeout (a minute here), and
    the server is not blamed."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    filler = socket.create_connection(blackhole.getsockname())  # fills the accept queue
    try:
        hole = f"127.0.0.1:{blackhole.getsockname()[1]}"
        listener = {"connect_timeout": "60s", "idle_timeout": "1s"}
        doc = config_doc([hole], group={"health_check": {"enabled": False}}, listener=listener)
        proxy = await make_proxy(doc)
        sh = server(proxy, hole)

        def sockets() -> int:
            """This process's open sockets (the proxy runs in it)."""
            n = 0
            for fd in os.listdir("/proc/self/fd"):
                with contextlib.suppress(OSError):  # the listing's own descriptor is gone
                    n += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
            return n

        before = sockets()
        reader, writer = await open_proxy(proxy)
        writer.write(b"GET / HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        await wait_for(lambda: sh.active == 1, what="the proxy to connect to the server")
        assert sockets() == before + 3  # the test's socket, the accepted one, the connect's
        resp = await read_response(reader)
        assert resp.status == 504
        writer.close()
        await wait_for(lambda: sh.active == 0, what="the exchange to let the server go")
        await wait_for(lambda: sockets() == before, what="every socket of the exchange to close")
        assert sh.stats.errors["timeout"] == 0 and sh.stats.errors["connect"] == 0
    finally:
        filler.close()
        blackhole.close()


async def test_post_retried_when_connect_fails(make_backend, make_proxy):
    """A failed connect sent nothing: even a non-idempotent request goes to the next server."""
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(config_doc([a.address, b.address], group=checked(interval="10s")))
    await a.stop()
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(proxy_url(proxy, path="/upload"), data=b"p" * 5000) as r:
                assert r.status == 200
                assert (await r.json())["backend"] == "B"
                assert (await r.json())["bytes"] == 5000
    assert retries(proxy) == 1
    assert [p for m, p, _ in b.requests if m == "POST"] == ["/upload", "/upload"]


async def test_backend_restarted_between_requests_is_not_marked_down(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], group=checked(interval="10s")))
    sa = server(proxy, a.address)
    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(proxy, path="/whoami")) as r:
            assert (r.status, await r.text()) == (200, "A")
        await a.stop()  # closes its idle keep-alive connection to the proxy
        await a.start()
        async with session.get(proxy_url(proxy, path="/whoami")) as r:
            assert (r.status, await r.text()) == (200, "A")
    assert sa.health.state is State.UP
    assert retries(proxy) == 0


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (SO_LINGER 0) rather than a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class RawBackend:
    """A hand-written HTTP/1.1 backend that misbehaves on purpose.

    /health is answered 200 (then closed). Every other request is recorded and given to
    ``behaviour(n, head, body, writer)`` with ``n`` the request's number on its connection;
    it returns False to stop serving that connection.
    """

    def __init__(self, behaviour: Callable[..., Awaitable[bool]]) -> None:
        self.behaviour = behaviour
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request line)
        self.connections = 0
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> RawBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for w in self.writers:
                w.transport.abort()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = 0
        conn = 0
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0]
                if line.split()[1] == b"/health":
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    await writer.drain()
                    writer.close()
                    return
                if n == 0:
                    self.connections += 1
                    conn = self.connections
                body = b""
                for h in head.lower().split(b"\r\n"):
                    if h.startswith(b"content-length:"):
                        body = await reader.readexactly(int(h.split(b":")[1]))
                n += 1
                self.requests.append((conn, line))
                if not await self.behaviour(n, head, body, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


OK_KEEP_ALIVE = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Type: text/plain\r\n\r\nraw"


@pytest.fixture
async def make_raw() -> AsyncIterator[Callable[..., Awaitable[RawBackend]]]:
    started: list[RawBackend] = []

    async def make(behaviour: Callable[..., Awaitable[bool]]) -> RawBackend:
        r = await RawBackend(behaviour).start()
        started.append(r)
        return r

    yield make
    for r in started:
        await r.stop()


async def test_stale_pooled_connection_is_retried_without_blaming_the_server(make_raw, make_proxy):
    async def one_per_connection(n: int, head: bytes, body: bytes, w: Any) -> bool:
        # Answers keep-alive (no Connection: close), then drops the connection the moment
        # the next request arrives on it: what a backend's own idle timeout looks like.
        if n == 1:
            w.write(OK_KEEP_ALIVE)
            await w.drain()
            return True
        reset(w)
        return False

    r = await make_raw(one_per_connection)
    proxy = await make_proxy(config_doc([r.address], group=checked(interval="10s")))
    sr = server(proxy, r.address)
    async with aiohttp.ClientSession() as session:
        for i in range(3):
            async with session.get(proxy_url(proxy, path=f"/get{i}")) as resp:
                assert (resp.status, await resp.text()) == (200, "raw")
    # /get1 and /get2 each went first to the pooled connection (reset) and again on a new one.
    assert r.requests == [
        (1, b"GET /get0 HTTP/1.1"),
        (1, b"GET /get1 HTTP/1.1"),
        (2, b"GET /get1 HTTP/1.1"),
        (2, b"GET /get2 HTTP/1.1"),
        (3, b"GET /get2 HTTP/1.1"),
    ]
    assert sr.health.state is State.UP
    assert sr.stats.errors["reset"] == 0

    # A POST that went out on a stale connection with its body is not sent again.
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy_url(proxy, path="/post"), data=b"x" * 10) as resp,
    ):
        assert resp.status == 502
    assert [line for _, line in r.requests].count(b"POST /post HTTP/1.1") == 1
    assert sr.health.state is State.UP


async def test_post_whose_body_was_sent_is_never_retried(make_raw, make_backend, make_proxy):
    async def read_then_reset(n: int, head: bytes, body: bytes, w: Any) -> bool:
        reset(w)
        return False

    r = await make_raw(read_then_reset)
    b = await make_backend("B")
    proxy = await make_proxy(config_doc([r.address, b.address], group=checked(interval="10s")))
    statuses = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # round-robin: one of the two goes to the resetting backend
            async with session.post(proxy_url(proxy, path="/upload"), data=b"y" * 1000) as resp:
                statuses.append(resp.status)
    assert sorted(statuses) == [200, 502]
    assert r.requests == [(1, b"POST /upload HTTP/1.1")]
    assert [p for _, p, _ in b.requests if p != "/health"] == ["/upload"]
    assert retries(proxy) == 0


async def test_idempotent_request_reset_on_a_fresh_connection_is_retried(
    make_raw, make_backend, make_proxy, caplog
):
    caplog.set_level(logging.INFO, logger="lbproxy")

    async def read_then_reset(n: int, head: bytes, body: bytes, w: Any) -> bool:
        reset(w)
        return False

    r = await make_raw(read_then_reset)
    b = await make_backend("B")
    proxy = await make_proxy(config_doc([r.address, b.address], group=checked(interval="10s")))
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.put(proxy_url(proxy, path="/upload"), data=b"z" * 100) as resp:
                assert resp.status == 200
                assert (await resp.json())["bytes"] == 100
    assert r.requests == [(1, b"PUT /upload HTTP/1.1")]
    assert [p for _, p, _ in b.requests if p != "/health"] == ["/upload", "/upload"]
    assert retries(proxy) == 1
    sr = server(proxy, r.address)
    assert sr.health.state is State.DOWN
    (line,) = down_lines(caplog, sr)
    assert "passive failure" in line and "reset" in line


async def test_never_retried_once_the_response_started(make_raw, make_backend, make_proxy):
    async def half_then_die(n: int, head: bytes, body: bytes, w: Any) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"h" * 10)
        await w.drain()
        await asyncio.sleep(0.05)
        reset(w)
        return False

    r = await make_raw(half_then_die)
    b = await make_backend("B")
    proxy = await make_proxy(config_doc([r.address, b.address], group=checked(interval="10s")))
    where = proxy.listeners.address("web")
    answers = []
    for _ in range(2):  # round-robin: one of the two goes to the dying backend
        reader, writer = await asyncio.open_connection(where.host, where.port)
        writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(5):
                while chunk := await reader.read(65536):
                    out += chunk
                    if out.endswith(b"\r\n\r\nB"):
                        break
        writer.close()
        answers.append(out)
    cut = [a for a in answers if a.endswith(b"h" * 10)]
    assert len(cut) == 1
    assert cut[0] == b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"h" * 10
    assert r.requests == [(1, b"GET /whoami HTTP/1.1")]
    assert [p for _, p, _ in b.requests if p != "/health"] == ["/whoami"]
    assert retries(proxy) == 0


# ---------------------------------------------------------------------------- WebSocket


async def test_websocket_upgrade_retried_when_connect_fails(make_backend, make_proxy):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(config_doc([a.address, b.address], group=checked(interval="10s")))
    await a.stop()
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.ws_connect(proxy_url(proxy, path="/ws")) as ws:
                await ws.send_str("whoami")
                assert (await ws.receive_str(timeout=5)) == "B"
                await ws.send_str("echo")
                assert (await ws.receive_str(timeout=5)) == "echo"
    assert retries(proxy) == 1
    assert server(proxy, a.address).health.state is State.DOWN


class FlippableHealth:
    def __init__(self) -> None:
        self.status = 200

    def middleware(self) -> Any:
        @web.middleware
        async def health(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path == "/health":
                return web.Response(status=self.status)
            resp: web.StreamResponse = await handler(request)
            return resp

        return health


async def test_open_tunnels_survive_their_server_going_down(make_backend, make_proxy):
    app = backend_app("A")
    flip = FlippableHealth()
    app.middlewares.insert(0, flip.middleware())
    a = await Backend(app).start()
    try:
        b = await make_backend("B")
        group = checked(interval="100ms", unhealthy_threshold=2)
        proxy = await make_proxy(config_doc([a.address, b.address], group=group))
        sa = server(proxy, a.address)
        async with aiohttp.ClientSession() as session:
            tunnels = [await session.ws_connect(proxy_url(proxy, path="/ws")) for _ in range(2)]
            names = []
            for ws in tunnels:
                await ws.send_str("whoami")
                names.append(await ws.receive_str(timeout=5))
            assert sorted(names) == ["A", "B"]
            to_a = tunnels[names.index("A")]

            flip.status = 500
            await wait_for(lambda: sa.health.state is State.DOWN, what="A to go down")
            for i in range(5):
                await to_a.send_str(f"still here {i}")
                assert (await to_a.receive_str(timeout=5)) == f"still here {i}"
            assert sa.active == 1  # the open tunnel

            async with session.ws_connect(proxy_url(proxy, path="/ws")) as ws:
                await ws.send_str("whoami")
                assert (await ws.receive_str(timeout=5)) == "B"
            for ws in tunnels:
                await ws.close()
    finally:
        await a.stop()


async def test_malformed_response_is_not_a_dead_server(make_raw, make_proxy):
    """Passive failures are connect failures and fresh resets only: a backend that answers
    one request with garbage stays in rotation (else one client could take every server
    out by asking for a broken page again and again)."""

    async def garbage_on_bad(n: int, head: bytes, body: bytes, w: Any) -> bool:
        if b" /bad " in head.split(b"\r\n", 1)[0]:
            w.write(b"HTTP/1.1 200 OK\r\nNo colon in this header\r\n\r\n")
        else:
            w.write(OK_KEEP_ALIVE)
        await w.drain()
        return True

    r = await make_raw(garbage_on_bad)
    proxy = await make_proxy(config_doc([r.address], group=checked(interval="10s")))
    sr = server(proxy, r.address)
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.get(proxy_url(proxy, path="/bad")) as resp:
                assert resp.status == 502
            assert sr.health.state is State.UP
            async with session.get(proxy_url(proxy, path="/ok")) as resp:
                assert (resp.status, await resp.text()) == (200, "raw")
    assert [line for _, line in r.requests].count(b"GET /bad HTTP/1.1") == 3  # never retried
    assert retries(proxy) == 0
