"""Warm server sets and the websocket health check (issue 12), over real sockets.

Start: no client request is answered 502/503 because servers have not been checked yet (in
one process and with ``--workers 2``, a real ``python -m lbproxy`` started under load); a
server down at start serves after its first good check, not ``healthy_threshold`` of them.
Reload: servers new to a group, and every server of a group whose checks were just enabled,
are checked before the new snapshot goes live; one that fails its warm-up is down and the
swap goes ahead; the check loop does not check a warmed server again at once.
``health_check.protocol: websocket``: a real upgrade, 101 with the right accept key, a clean
masked close; a plain HTTP answer, a wrong key or a server that never closes fail it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import WSMsgType, web

from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from lbproxy.control.checker import ws_accept
from lbproxy.core.health import State
from lbproxy.core.snapshot import ServerState
from tests.support import (
    RawServer,
    config_doc,
    free_port,
    proxy_url,
    read_request_head,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def launch() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Proxy]]]:
    """Start a proxy (``start`` returns once its servers are warmed) and close it after."""
    started: list[Proxy] = []

    async def go(doc: dict[str, Any]) -> Proxy:
        p = Proxy(parse_config(doc))
        await p.start()
        started.append(p)
        return p

    yield go
    for p in started:
        await p.close(timeout=0.5)


def server(proxy: Proxy, address: str) -> ServerState:
    return proxy.state.servers[f"rs1/{address}"]


def health_checks(s: ServerState) -> int:
    return s.stats.health_checks["success"] + s.stats.health_checks["failure"]


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as r:
        return r.status, await r.text()


def group(**check: Any) -> dict[str, Any]:
    return {"health_check": {"interval": "200ms", "timeout": "2s", "path": "/health", **check}}


# ---------------------------------------------------------------------------- startup


async def test_server_down_at_start_serves_after_one_good_check(make_backend, launch):
    port = free_port()
    address = f"127.0.0.1:{port}"
    proxy = await launch(config_doc([address], group=group(healthy_threshold=3)))
    s = server(proxy, address)
    # Its warm-up check was refused: down, and the only server, so 503.
    assert s.health.state is State.DOWN
    async with aiohttp.ClientSession() as session:
        assert (await get(session, proxy_url(proxy, path="/whoami")))[0] == 503
        await make_backend("B", port)
        await wait_for(lambda: s.health.state is State.UP, what="the backend started late to be up")
        assert s.health.last_change_reason is not None
        assert s.health.last_change_reason.startswith("check ok, never up before")
        assert await get(session, proxy_url(proxy, path="/whoami")) == (200, "B")


async def test_start_returns_after_a_hanging_first_check_times_out(launch):
    """Warming is bounded by the check timeout: a server whose check hangs is down then,
    and the proxy serves its other servers."""

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with RawServer(hang) as srv:
        proxy = await launch(config_doc([srv.address], group=group(timeout="300ms")))
        s = server(proxy, srv.address)
        assert s.health.state is State.DOWN
        assert s.health.last_reason == "timeout after 0.3s"


def process_doc(servers: list[str], port: int, admin: int) -> dict[str, Any]:
    # Each check takes 1.5 s to answer: a proxy accepting before it knows the result (or a
    # worker before the supervisor's first round reached it) would answer 503 meanwhile.
    return config_doc(
        servers,
        listener={"bind": f"127.0.0.1:{port}"},
        group=group(path="/sleep/1.5", timeout="5s", interval="10s"),
        admin={"bind": f"127.0.0.1:{admin}"},
    )


@pytest.mark.parametrize("workers", [1, 2])
async def test_startup_under_load_answers_no_502_or_503(make_backend, tmp_path, workers):
    """Clients hammer the port before lbproxy exists; once it binds, every answer is 200,
    and no request fails otherwise (a reset, a dropped connection, an empty answer)."""
    a, b = await make_backend("A"), await make_backend("B")
    port, admin = free_port(), free_port()
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(process_doc([a.address, b.address], port, admin)))
    statuses: list[int] = []
    errors: list[BaseException] = []
    stop = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                try:
                    statuses.append((await get(session, f"http://127.0.0.1:{port}/whoami"))[0])
                except aiohttp.ClientConnectorError as exc:
                    # Refused: nothing listens yet. Once anything was answered the port is
                    # bound for good, and a refused connection is a failure like any other.
                    if statuses or not isinstance(exc.os_error, ConnectionRefusedError):
                        errors.append(exc)
                    await asyncio.sleep(0.01)
                except Exception as exc:  # a reset, a dropped connection: the test fails
                    errors.append(exc)

    clients = [asyncio.create_task(client()) for _ in range(8)]
    args = ["--workers", str(workers)] if workers > 1 else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbproxy", "--config", str(path), *args, cwd=ROOT
    )
    try:
        await wait_for(
            lambda: len(statuses) >= 200 or proc.returncode is not None,
            timeout=30,
            what="200 answers",
        )
        assert proc.returncode is None
    finally:
        stop.set()
        await asyncio.gather(*clients)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await proc.wait()
    assert errors == []
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    # The warm-up checks were the first thing each backend saw.
    for backend in (a, b):
        assert backend.requests[0][1] == "/sleep/1.5"


# ---------------------------------------------------------------------------- reload


async def test_full_swap_by_reload_serves_the_new_servers_at_once(make_backend, make_proxy):
    a, b, c, d = [await make_backend(n) for n in "ABCD"]
    proxy = await make_proxy(config_doc([a.address, b.address], group=group(interval="10s")))
    result = await proxy.apply_config(
        parse_config(config_doc([c.address, d.address], group=group(interval="10s"))), "test"
    )
    assert result.ok, result.message
    # Checked before the swap: up the moment the new snapshot is live.
    assert [s.health.state for s in proxy.snapshot.groups["rs1"].servers] == [State.UP] * 2
    async with aiohttp.ClientSession() as session:
        answers = [await get(session, proxy_url(proxy, path="/whoami")) for _ in range(4)]
    assert sorted(answers) == [(200, "C"), (200, "C"), (200, "D"), (200, "D")]
    for x in (c, d):
        assert x.requests[0][1] == "/health"


async def test_reload_waits_for_the_warm_up_and_old_servers_serve_meanwhile(
    make_backend, make_proxy
):
    a = await make_backend("A")
    gate = asyncio.Event()
    arrived = asyncio.Event()

    def slow_health(name: str) -> web.Application:
        app = web.Application()

        async def whoami(request: web.Request) -> web.Response:
            return web.Response(text=name)

        async def health(request: web.Request) -> web.Response:
            arrived.set()
            await gate.wait()
            return web.Response(text="ok")

        app.router.add_get("/whoami", whoami)
        app.router.add_route("*", "/slowhealth", health)
        return app

    b = await make_backend("B", app=slow_health)
    proxy = await make_proxy(config_doc([a.address], group=group()))
    new = config_doc([b.address], group=group(path="/slowhealth", interval="10s"))
    reload = asyncio.create_task(proxy.apply_config(parse_config(new), "test"))
    async with aiohttp.ClientSession() as session:
        await asyncio.wait_for(arrived.wait(), 10)
        # The warm-up of B is under way: the old snapshot (A) is still the live one.
        assert not reload.done()
        assert await get(session, proxy_url(proxy, path="/whoami")) == (200, "A")
        gate.set()
        assert (await reload).ok
        assert await get(session, proxy_url(proxy, path="/whoami")) == (200, "B")


async def test_warm_up_failure_is_down_and_the_swap_goes_ahead(make_backend, make_proxy, caplog):
    caplog.set_level(logging.INFO, logger="lbproxy")
    a = await make_backend("A")
    dead = f"127.0.0.1:{free_port()}"
    proxy = await make_proxy(config_doc([a.address], group=group()))
    both = config_doc([a.address, dead], group=group())
    result = await proxy.apply_config(parse_config(both), "test")
    assert result.ok and result.changed
    s = server(proxy, dead)
    assert s.health.state is State.DOWN and s.health.last_reason == "refused"
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            assert await get(session, proxy_url(proxy, path="/whoami")) == (200, "A")


async def test_a_warmed_server_is_not_checked_again_at_once(make_backend, make_proxy):
    a, b = await make_backend("A"), await make_backend("B")
    proxy = await make_proxy(config_doc([a.address], group=group(interval="30s")))
    await proxy.apply_config(
        parse_config(config_doc([a.address, b.address], group=group(interval="30s"))), "t"
    )
    sb = server(proxy, b.address)
    assert health_checks(sb) == 1
    assert proxy.checker._tasks[sb.id] is not None
    # A window for the check loop to misbehave in: without the warm-up mark it checks at
    # once (within milliseconds); with it, the next check is 30 s away.
    await asyncio.sleep(0.5)
    assert health_checks(sb) == 1
    assert [p for _, p, _ in b.requests] == ["/health"]


async def test_enabling_checks_by_reload_answers_no_503(make_backend, make_proxy):
    a, b = await make_backend("A"), await make_backend("B")
    on = config_doc([a.address, b.address], group=group(interval="10s", healthy_threshold=5))
    off = config_doc([a.address, b.address], group={"health_check": {"enabled": False}})
    proxy = await make_proxy(on)
    assert (await proxy.apply_config(parse_config(off), "test")).ok
    # A passive failure while nothing checks leaves B down (after having been up): when
    # checks come back on, that stale record must not make B wait for healthy_threshold.
    sb = server(proxy, b.address)
    proxy.ctx.report_health.passive_failure(sb, "connect refused")
    assert sb.health.state is State.DOWN
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                statuses.append((await get(session, proxy_url(proxy, path="/whoami")))[0])

    clients = [asyncio.create_task(client()) for _ in range(4)]
    await wait_for(lambda: len(statuses) >= 20, what="traffic before the reload")
    result = await proxy.apply_config(parse_config(on), "test")
    assert result.ok, result.message
    n = len(statuses)
    await wait_for(lambda: len(statuses) >= n + 40, what="traffic after the reload")
    stop.set()
    await asyncio.gather(*clients)
    assert set(statuses) == {200}
    assert [s.health.state for s in proxy.snapshot.groups["rs1"].servers] == [State.UP] * 2


# ---------------------------------------------------------------------------- websocket check


def ws_only_app(name: str, closes: list[int | None]) -> web.Application:
    """A backend that serves only WebSockets (a plain HEAD / gets 400, like many do)."""
    app = web.Application()

    async def ws(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(status=400, text="websocket only")
        resp = web.WebSocketResponse()
        await resp.prepare(request)
        async for msg in resp:
            if msg.type == WSMsgType.TEXT:
                await resp.send_str(msg.data)
        closes.append(resp.close_code)
        return resp

    app.router.add_route("*", "/", ws)
    app.router.add_route("*", "/socket", ws)
    return app


async def test_websocket_check_upgrades_and_closes_cleanly(make_backend, launch):
    closes: list[int | None] = []
    a = await make_backend("A", app=lambda n: ws_only_app(n, closes))
    # An http check marks it down: the plain request gets 400.
    http = await launch(config_doc([a.address], group=group(path="/")))
    assert server(http, a.address).health.state is State.DOWN
    ws = await launch(config_doc([a.address], group=group(protocol="websocket", path="/socket")))
    s = server(ws, a.address)
    assert s.health.state is State.UP
    assert s.health.last_reason == "101 Switching Protocols, closed cleanly"
    await wait_for(lambda: len(closes) >= 1, what="the backend to see the close")
    assert closes[0] == 1000
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(proxy_url(ws, path="/socket")) as conn,
    ):
        await conn.send_str("hi")
        assert await conn.receive_str() == "hi"


async def raw_ws_backend(
    answer: Callable[[bytes], bytes], after: str
) -> tuple[RawServer, list[Any]]:
    """A hand-written backend: answers the upgrade with ``answer(key)``; then ``after``:
    "close" reads the client's close frame and answers one, "hang" never closes."""
    seen: list[Any] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start, fields = await read_request_head(reader)
        seen.append((start, dict(fields)))
        key = dict((k.lower(), v) for k, v in fields)["sec-websocket-key"].encode()
        writer.write(answer(key))
        if after == "close":
            frame = await reader.readexactly(8)
            seen.append(frame)
            writer.write(b"\x88\x02\x03\xe8")
            await writer.drain()
        else:
            await reader.read()

    return await RawServer(handler).start(), seen


def upgrade_answer(accept: bytes) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )


async def test_websocket_check_sends_a_real_upgrade_and_a_masked_close(launch):
    srv, seen = await raw_ws_backend(lambda key: upgrade_answer(ws_accept(key)), "close")
    try:
        doc = config_doc(
            [srv.address], group=group(protocol="websocket", path="/live?x=1", host="chat.test")
        )
        proxy = await launch(doc)
        assert server(proxy, srv.address).health.state is State.UP
    finally:
        await srv.stop()
    (start, fields), frame = seen[0], seen[1]
    assert start == "GET /live?x=1 HTTP/1.1"
    assert fields["Host"] == "chat.test"
    assert fields["Upgrade"].lower() == "websocket" and fields["Connection"] == "Upgrade"
    assert fields["Sec-WebSocket-Version"] == "13"
    # FIN + close, MASK + length 2, a 4-byte key, then code 1000 masked with it.
    assert frame[:2] == b"\x88\x82"
    mask = frame[2:6]
    assert bytes(x ^ mask[i % 4] for i, x in enumerate(frame[6:])) == b"\x03\xe8"


@pytest.mark.parametrize(
    ("answer", "after", "reason"),
    [
        (
            lambda key: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            "hang",
            "unexpected status 200 OK (expected 101 to a websocket upgrade)",
        ),
        (
            lambda key: upgrade_answer(b"d3JvbmcgYWNjZXB0IGtleSE="),
            "hang",
            "101 with a wrong Sec-WebSocket-Accept",
        ),
        (
            lambda key: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
            "hang",
            "101 without Sec-WebSocket-Accept",
        ),
        (
            lambda key: upgrade_answer(ws_accept(key)),
            "hang",  # never answers the close, never ends the connection
            "timeout after 0.5s",
        ),
    ],
    ids=["no-upgrade", "wrong-accept", "no-accept", "no-close"],
)
async def test_websocket_check_failures(launch, answer, after, reason):
    srv, _ = await raw_ws_backend(answer, after)
    try:
        doc = config_doc([srv.address], group=group(protocol="websocket", timeout="500ms"))
        proxy = await launch(doc)
        s = server(proxy, srv.address)
        assert s.health.state is State.DOWN
        assert s.health.last_reason == reason
    finally:
        await srv.stop()
