"""Socket.IO behind lbproxy (issue 7): the real deployment, with Engine.IO sid pinning.

Two python-socketio servers (``tests/socketio_app.py``, each in its own process) share a real
``redis-server`` through ``socketio.AsyncRedisManager``, behind an in-process lbproxy with
``scheduler: rr`` and ``sticky_session: {socketio: true}``. python-socketio clients use the
default transport sequence: an Engine.IO handshake over long-polling, then an upgrade to
WebSocket carrying ``sid=``. Without sid pinning, round-robin would send the upgrade to the
server that did not issue the sid, which answers 400 ("Invalid session"; Node's engine.io says
"Session ID unknown"): the test runs that configuration too and requires it to fail, so the
main test cannot pass by accident.

Cookies play no part: no cookie persistence is configured and half of the clients use an
``aiohttp.DummyCookieJar`` (they drop every cookie).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import socketio

from lbproxy.app import Proxy
from lbproxy.snapshot import GroupRuntime
from tests.support import config_doc, free_port, proxy_url, wait_for

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
REDIS_MISSING = (
    "redis-server not found: the Socket.IO test needs a real Redis; install it with "
    "`apt-get install -y redis-server`"
)
# What a server says about a request for a session it does not know: python-engineio logs
# "Invalid session <sid>", Node's engine.io answers "Session ID unknown".
UNKNOWN_SESSION = ("Invalid session", "Session ID unknown")


# ------------------------------------------------------------------ redis-server and the servers


class RedisServer:
    """A throwaway redis-server (no persistence) on a free port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.log = workdir / "redis.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
                + ["--appendonly", "no", "--dir", str(workdir), "--loglevel", "warning"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"redis-server exited on start:\n{self.log.read_text()}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=0.5
            ) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.01)
        pytest.fail(f"redis-server on port {self.port} does not answer PING")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server") or next(
        (p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if Path(p).is_file()),
        None,
    )
    if binary is None:
        pytest.fail(REDIS_MISSING, pytrace=False)
    server = RedisServer(binary, tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@dataclass
class SioServer:
    """One ``tests.socketio_app`` process; its stderr (access log, Engine.IO errors) in ``log``."""

    name: str
    log: Path
    proc: asyncio.subprocess.Process
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def statuses(self) -> collections.Counter[str]:
        """Response statuses of the access log lines (``NAME "GET /... HTTP/1.1" STATUS``)."""
        out: collections.Counter[str] = collections.Counter()
        for line in self.output().splitlines():
            if line.startswith("aiohttp.access") and f" {self.name} " in line:
                out[line.rsplit(" ", 1)[1]] += 1
        return out


async def start_sio_server(name: str, redis_url: str, log: Path) -> SioServer:
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.socketio_app",
            "--name",
            name,
            "--redis",
            redis_url,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    server = SioServer(name, log, proc)
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
    except TimeoutError:
        line = b""
    if not line.startswith(b"READY "):
        proc.kill()
        await proc.wait()
        pytest.fail(f"socketio server {name} did not start:\n{server.output()}")
    server.port = int(line.split()[1])
    return server


@pytest.fixture
async def sio_servers(redis_server: RedisServer, tmp_path: Path) -> AsyncIterator[list[SioServer]]:
    """Servers A and B sharing ``redis_server``, both subscribed to its channel."""
    servers = await asyncio.gather(
        *(start_sio_server(n, redis_server.url, tmp_path / f"{n}.log") for n in "AB")
    )
    r = aioredis.Redis.from_url(redis_server.url)
    try:

        async def subscribed() -> bool:
            ((_, n),) = await r.pubsub_numsub("socketio")
            return bool(n == 2)

        await wait_for(subscribed, timeout=10, what="both servers to subscribe to Redis")
        yield list(servers)
    finally:
        await r.aclose()
        for s in servers:
            if s.proc.returncode is None:
                s.proc.terminate()
        for s in servers:
            await s.proc.wait()


def sio_doc(servers: list[SioServer], *, pin_sids: bool) -> dict[str, Any]:
    group: dict[str, Any] = {"scheduler": "rr"}
    if pin_sids:
        group["sticky_session"] = {"socketio": True}
    return config_doc(
        [s.address for s in servers], listener={"idle_timeout": "10s"}, group=group
    )


def rs1(proxy: Proxy) -> GroupRuntime:
    return proxy.holder.current.groups["rs1"]


def statuses(proxy: Proxy) -> collections.Counter[str]:
    """Responses the proxy counted on listener ``web``, by status code."""
    out: collections.Counter[str] = collections.Counter()
    for (_, _, code), n in proxy.registry.listeners["web"].requests.items():
        out[code] += n
    return out


# ------------------------------------------------------------------ clients


@dataclass
class Client:
    """A python-socketio client and what it saw."""

    index: int
    cookies: bool  # False: its HTTP session drops every cookie
    sio: socketio.AsyncClient = field(init=False)
    session: aiohttp.ClientSession | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)
    backend: str = ""

    def __post_init__(self) -> None:
        options: dict[str, Any] = {}
        if not self.cookies:
            self.session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
            options["http_session"] = self.session
        self.sio = socketio.AsyncClient(reconnection=False, handle_sigint=False, **options)
        self.sio.on("chat", self.received.append)
        self.sio.on("connect_error", self.errors.append)

    async def connect(self, url: str, wait_timeout: float = 5) -> None:
        try:
            await self.sio.connect(url, wait_timeout=wait_timeout)  # default transports
        except socketio.exceptions.ConnectionError as exc:
            self.errors.append(exc)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.sio.disconnect()
        if self.session is not None:
            await self.session.close()


# ------------------------------------------------------------------ tests


async def test_socketio_clients_upgrade_and_chat_through_both_servers(sio_servers, make_proxy):
    proxy = await make_proxy(sio_doc(sio_servers, pin_sids=True))
    url = proxy_url(proxy).rstrip("/")
    clients = [Client(i, cookies=i % 4 < 2) for i in range(20)]
    try:
        await asyncio.gather(*(c.connect(url) for c in clients))
        assert [c.errors for c in clients] == [[]] * 20
        # Long-polling first, then the upgrade to WebSocket, through the proxy.
        await wait_for(
            lambda: all(c.sio.transport() == "websocket" for c in clients),
            what="every client to upgrade to websocket",
        )
        for c in clients:
            c.backend = await c.sio.call("whoami", timeout=5)
        # Round-robin spread the sessions (one scheduled request, the handshake, per client):
        # without sid pinning half of them would have had their upgrade refused.
        assert collections.Counter(c.backend for c in clients) == {"A": 10, "B": 10}
        for kind in (True, False):
            assert {c.backend for c in clients if c.cookies is kind} == {"A", "B"}
        assert len(rs1(proxy).pins.sids) == 20

        for c in clients:
            await c.sio.emit("chat", {"from": c.index, "text": f"hello from {c.index}"})
        await wait_for(
            lambda: all(len(c.received) == 20 for c in clients),
            timeout=10,
            what="every client to receive all 20 broadcasts",
        )
        backend_of = {c.index: c.backend for c in clients}
        for c in clients:
            assert sorted(m["from"] for m in c.received) == list(range(20))
            # Each message came through the server of its sender, so the ones from clients
            # on the other server crossed Redis.
            assert all(m["via"] == backend_of[m["from"]] for m in c.received)
            assert {m["via"] for m in c.received} == {"A", "B"}
    finally:
        await asyncio.gather(*(c.close() for c in clients))

    # Sessions ended: their tunnels closed and their sid pins went with them.
    await wait_for(lambda: not proxy.connections(), what="every tunnel to close")
    await wait_for(lambda: len(rs1(proxy).pins.sids) == 0, what="the sid pins to be forgotten")

    # Zero "Session ID unknown" / 400 anywhere: clients, proxy, servers.
    assert [c.errors for c in clients] == [[]] * 20
    codes = statuses(proxy)
    assert set(codes) == {"200", "101"}, codes
    assert codes["101"] == 20
    for s in sio_servers:
        log = s.output()
        assert not any(text in log for text in UNKNOWN_SESSION), log
        seen = s.statuses()
        assert set(seen) == {"200", "101"}, (s.name, seen, log)
        assert seen["101"] == 10


async def test_without_sid_pinning_the_upgrade_hits_the_wrong_server(sio_servers, make_proxy):
    """The same deployment without ``socketio: true`` fails: the test above is sensitive."""
    proxy = await make_proxy(sio_doc(sio_servers, pin_sids=False))
    url = proxy_url(proxy).rstrip("/")
    clients = [Client(i, cookies=i % 2 == 0) for i in range(2)]
    try:
        for c in clients:  # one at a time: rr alternates between the handshake and the upgrade
            await c.connect(url, wait_timeout=1)
        upgraded = [c.sio.transport() == "websocket" and c.sio.connected for c in clients]
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert upgraded == [False, False]
    codes = statuses(proxy)
    assert codes["400"] >= 2, codes
    assert "101" not in codes
    assert any(UNKNOWN_SESSION[0] in s.output() for s in sio_servers)
