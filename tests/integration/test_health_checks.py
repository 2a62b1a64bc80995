"""Acceptance tests of the active health checks (issue 3), end to end over real sockets.

Each test runs the proxy in-process in front of real aiohttp backends whose ``/health``
answer the test controls (status, a script of statuses, or a gate that holds the answer),
and watches what the checker does: the checks it sends (method, Host, port), the state of
each server (``ServerState.health``), the check counters and the transition log lines.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from lbproxy.core.health import State
from lbproxy.core.snapshot import ServerState
from tests.support import (
    WS_UPGRADE,
    Backend,
    backend_app,
    config_doc,
    free_port,
    proxy_url,
    read_response,
    wait_for,
)


class HealthControl:
    """What the backend answers on /health, and a record of every check it received."""

    def __init__(self) -> None:
        self.status = 200
        self.script: list[int] = []  # answered first, one per check, before ``status``
        self.gate: asyncio.Event | None = None  # when set: hold each answer until it is set
        self.hang = False  # never answer
        self.seen: list[tuple[str, str | None, int]] = []  # (method, Host, status answered)
        self.arrived = 0  # checks received, answered or not
        self.on_arrival: Callable[[], None] | None = None

    def middleware(self) -> Any:
        @web.middleware
        async def health(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path != "/health":
                resp: web.StreamResponse = await handler(request)
                return resp
            self.arrived += 1
            if self.on_arrival is not None:
                self.on_arrival()
            if self.hang:
                await asyncio.Event().wait()
            if self.gate is not None:
                await self.gate.wait()
            status = self.script.pop(0) if self.script else self.status
            self.seen.append((request.method, request.headers.get("Host"), status))
            return web.Response(status=status, text="health")

        return health


class Controlled(Backend):
    """A ``backend_app`` whose /health is driven by ``self.health``."""

    def __init__(self, name: str, port: int = 0) -> None:
        app = backend_app(name)
        self.health = HealthControl()
        app.middlewares.insert(0, self.health.middleware())
        super().__init__(app, port)


@pytest.fixture
async def make_controlled() -> AsyncIterator[Callable[..., Awaitable[Controlled]]]:
    started: list[Controlled] = []

    async def make(name: str, port: int = 0) -> Controlled:
        b = await Controlled(name, port).start()
        started.append(b)
        return b

    yield make
    for b in started:
        b.health.hang = False
        if b.health.gate is not None:
            b.health.gate.set()
        await b.stop()


@pytest.fixture
async def launch() -> AsyncIterator[Callable[[dict[str, Any]], Awaitable[Proxy]]]:
    """Start a proxy without waiting for its servers to come up (``make_proxy`` waits)."""
    started: list[Proxy] = []

    async def go(doc: dict[str, Any]) -> Proxy:
        p = Proxy(parse_config(doc))
        await p.start()
        started.append(p)
        return p

    yield go
    for p in started:
        await p.close(timeout=0.5)


def checked(**settings: Any) -> dict[str, Any]:
    """A group's ``health_check`` section: config_doc's defaults (200ms on /health) + these."""
    return {"health_check": {"interval": "200ms", "timeout": "1s", "path": "/health", **settings}}


def server(proxy: Proxy, address: str) -> ServerState:
    return proxy.state.servers[f"rs1/{address}"]


def checks(s: ServerState) -> tuple[int, int]:
    """(successful, failed) active checks of ``s`` so far."""
    hc = s.stats.health_checks
    return hc["success"], hc["failure"]


def transitions(caplog: pytest.LogCaptureFixture, s: ServerState, word: str) -> list[str]:
    """The transition log lines "server ID is WORD ..." logged so far for ``s``."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "lbproxy" and r.getMessage().startswith(f"server {s.id} is {word} ")
    ]


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as r:
        return r.status, await r.text()


# ---------------------------------------------------------------------------- thresholds


async def test_thresholds_count_consecutive_checks(make_controlled, make_proxy, caplog):
    caplog.set_level(logging.INFO, logger="lbproxy")
    a = await make_controlled("A")
    group = checked(interval="250ms", unhealthy_threshold=3, healthy_threshold=2)
    proxy = await make_proxy(config_doc([a.address], group=group))
    s = server(proxy, a.address)
    assert s.health.state is State.UP

    ok0, failed0 = checks(s)
    a.health.status = 500
    await wait_for(lambda: s.health.failures == 2, what="two failed checks")
    assert s.health.state is State.UP
    assert checks(s)[1] - failed0 == 2
    assert await get(proxy_url(proxy, path="/whoami")) == (200, "A")

    await wait_for(lambda: s.health.state is State.DOWN, what="the server to go down")
    assert s.health.failures == 3
    assert checks(s)[1] - failed0 == 3
    assert [st for _, _, st in a.health.seen].count(500) == 3
    status, _ = await get(proxy_url(proxy, path="/whoami"))
    assert status == 503

    a.health.status = 200
    await wait_for(lambda: s.health.successes == 1, what="one good check")
    assert s.health.state is State.DOWN
    await wait_for(lambda: s.health.state is State.UP, what="the server to come back")
    assert s.health.successes == 2
    assert checks(s)[0] - ok0 == 2
    assert await get(proxy_url(proxy, path="/whoami")) == (200, "A")

    down = transitions(caplog, s, "DOWN")
    assert len(down) == 1
    assert "3 consecutive checks failed" in down[0]
    assert "500" in down[0]
    up = transitions(caplog, s, "UP")
    assert len(up) == 2  # unknown -> up at start, then down -> up
    assert "(was unknown)" in up[0]
    assert "(was down)" in up[1] and "2 consecutive checks ok" in up[1]


# ---------------------------------------------------------------------------- expected codes


@pytest.mark.parametrize(
    ("answer", "expected", "state"),
    [
        (301, ["http_2xx"], State.DOWN),
        (301, ["http_3xx"], State.UP),
        (204, [204], State.UP),
        (200, [204], State.DOWN),
        (404, ["http_2xx", "http_3xx"], State.DOWN),
        (404, ["http_4xx"], State.UP),
        (503, ["http_2xx", 503], State.UP),
    ],
)
async def test_expected_codes(make_controlled, launch, caplog, answer, expected, state):
    caplog.set_level(logging.INFO, logger="lbproxy")
    a = await make_controlled("A")
    a.health.status = answer
    proxy = await launch(config_doc([a.address], group=checked(expected_codes=expected)))
    s = server(proxy, a.address)
    await wait_for(lambda: s.health.state is not State.UNKNOWN, what="the first check")
    assert s.health.state is state
    if state is State.DOWN:
        assert f"unexpected status {answer}" in s.health.last_reason
        (line,) = transitions(caplog, s, "DOWN")
        assert f"unexpected status {answer}" in line
    else:
        assert s.health.last_reason.startswith(str(answer))


# ---------------------------------------------------------------------------- what is sent


@pytest.mark.parametrize(("method", "sent"), [(None, "HEAD"), ("GET", "GET"), ("HEAD", "HEAD")])
async def test_check_method(make_controlled, make_proxy, method, sent):
    a = await make_controlled("A")
    group = checked() if method is None else checked(method=method)
    await make_proxy(config_doc([a.address], group=group))
    await wait_for(lambda: len(a.health.seen) >= 2, what="two checks")
    assert {m for m, _, _ in a.health.seen} == {sent}


async def test_host_header_defaults_to_the_server_address(make_controlled, make_proxy):
    a = await make_controlled("A")
    await make_proxy(config_doc([a.address]))
    assert a.health.seen[0][1] == f"127.0.0.1:{a.port}"


async def test_host_header_configured(make_controlled, make_proxy):
    a = await make_controlled("A")
    await make_proxy(config_doc([a.address], group=checked(host="health.example.com")))
    assert {h for _, h, _ in a.health.seen} == {"health.example.com"}


async def test_port_overrides_the_port_checked(make_controlled, make_proxy):
    a = await make_controlled("A")  # serves traffic; its own /health would fail
    a.health.status = 500
    responder = await make_controlled("H")  # the health responder on another port
    proxy = await make_proxy(config_doc([a.address], group=checked(port=responder.port)))
    await wait_for(lambda: len(responder.health.seen) >= 2, what="two checks on the check port")
    assert server(proxy, a.address).health.state is State.UP
    assert a.health.seen == []
    assert responder.health.seen[0][1] == f"127.0.0.1:{responder.port}"
    # Traffic still goes to the server's own port.
    assert await get(proxy_url(proxy, path="/whoami")) == (200, "A")


# ---------------------------------------------------------------------------- timeout


async def test_hanging_check_is_cut_at_timeout(make_controlled, make_backend, launch, caplog):
    caplog.set_level(logging.INFO, logger="lbproxy")
    a = await make_controlled("A")
    a.health.hang = True
    b = await make_backend("B")
    started = time.monotonic()
    proxy = await launch(config_doc([a.address, b.address], group=checked(timeout="300ms")))
    sa, sb = server(proxy, a.address), server(proxy, b.address)
    await wait_for(lambda: sa.health.state is not State.UNKNOWN, 10, "the first check of A")
    took = time.monotonic() - started
    assert sa.health.state is State.DOWN
    # Not before the 300 ms timeout; the reason below says it was the timeout that cut it (the
    # upper bound is only a hang guard).
    assert 0.29 <= took < 0.3 + 5, took
    assert "timeout" in sa.health.last_reason
    (line,) = transitions(caplog, sa, "DOWN")
    assert "timeout" in line

    # The hanging check blocks neither B's checks nor the data path.
    assert sb.health.state is State.UP
    before = checks(sb)[0]
    await wait_for(lambda: checks(sb)[0] >= before + 3, what="B to keep being checked")
    for _ in range(3):
        assert await get(proxy_url(proxy, path="/whoami")) == (200, "B")


# ---------------------------------------------------------------------------- tcp checks


async def test_tcp_check(launch, caplog):
    caplog.set_level(logging.INFO, logger="lbproxy")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never speaks HTTP
        writer.close()

    listening = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        up_addr = f"127.0.0.1:{listening.sockets[0].getsockname()[1]}"
        closed_addr = f"127.0.0.1:{free_port()}"
        group = checked(protocol="tcp")
        proxy = await launch(config_doc([up_addr, closed_addr], group=group))
        up, closed = server(proxy, up_addr), server(proxy, closed_addr)
        await wait_for(
            lambda: checks(up)[0] >= 2 and checks(closed)[1] >= 2, what="two rounds of checks"
        )
        assert up.health.state is State.UP
        assert up.health.last_reason == "connected"
        assert closed.health.state is State.DOWN
        assert closed.health.last_reason == "refused"
        (line,) = transitions(caplog, closed, "DOWN")
        assert "refused" in line
    finally:
        listening.close()
        await listening.wait_closed()


async def test_http_check_of_a_non_http_server_fails(launch):
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(garbage, "127.0.0.1", 0)
    try:
        addr = f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
        proxy = await launch(config_doc([addr]))
        s = server(proxy, addr)
        await wait_for(lambda: s.health.state is not State.UNKNOWN, what="the first check")
        assert s.health.state is State.DOWN
        assert s.health.last_reason == "not an HTTP response"
    finally:
        srv.close()
        await srv.wait_closed()


# ---------------------------------------------------------------------------- startup


async def test_clients_wait_for_the_first_check_instead_of_getting_503(make_controlled):
    """Start binds, then holds accepting until the first check answers: a client that
    connects meanwhile waits in the listen backlog and is served, never answered 503."""
    a = await make_controlled("A")
    a.health.gate = asyncio.Event()
    port = free_port()
    doc = config_doc([a.address], listener={"bind": f"127.0.0.1:{port}"})
    proxy = Proxy(parse_config(doc))
    starting = asyncio.create_task(proxy.start())
    try:
        await wait_for(lambda: a.health.arrived == 1, what="the first check to arrive")
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for _, w in clients:
            w.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert not starting.done()
        assert [r[1] for r in a.requests if r[1] != "/health"] == []
        a.health.gate.set()
        await starting
        s = server(proxy, a.address)
        assert s.health.state is State.UP and s.health.successes == 1
        for r, w in clients:
            resp = await read_response(r)
            assert (resp.status, resp.body) == (200, b"A")
            w.close()
    finally:
        a.health.gate.set()
        await starting
        await proxy.close(timeout=0.5)


async def test_live_backends_serve_within_one_check(make_backend, launch):
    a = await make_backend("A")
    b = await make_backend("B")
    # A threshold wait would take interval * (healthy_threshold - 1) = 20 s at least; even a
    # second check would come 10 s after the first.
    started = time.monotonic()
    group = checked(interval="10s", healthy_threshold=3)
    proxy = await launch(config_doc([a.address, b.address], group=group))
    url = proxy_url(proxy, path="/whoami")
    seen: set[str] = set()
    async with aiohttp.ClientSession() as session:
        while len(seen) < 2:
            async with session.get(url) as r:
                if r.status == 200:
                    seen.add(await r.text())
                else:
                    assert r.status == 503
                    await asyncio.sleep(0.005)
            assert time.monotonic() - started < 8, "not served within one check round trip"
    assert seen == {"A", "B"}


# ---------------------------------------------------------------------------- all down


async def test_all_down_503_with_retry_after_then_recovery(make_backend, make_proxy):
    a = await make_backend("A")
    group = checked(interval="100ms", unhealthy_threshold=1, healthy_threshold=2)
    proxy = await make_proxy(config_doc([a.address], group=group))
    s = server(proxy, a.address)
    await a.stop()
    await wait_for(lambda: s.health.state is State.DOWN, what="the server to go down")

    async with aiohttp.ClientSession() as session:
        async with session.get(proxy_url(proxy, path="/whoami")) as r:
            assert r.status == 503
            assert r.headers["Retry-After"].isdigit()
        where = proxy.listeners.address("web")
        reader, writer = await asyncio.open_connection(where.host, where.port)
        writer.write(WS_UPGRADE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
        assert head.startswith(b"HTTP/1.1 503 ")
        assert b"\r\nRetry-After: " in head

        await a.start()
        await wait_for(lambda: s.health.state is State.UP, what="the server to come back")
        async with session.get(proxy_url(proxy, path="/whoami")) as r:
            assert r.status == 200
            assert await r.text() == "A"


# ---------------------------------------------------------------------------- flapping


async def test_flapping_backend_never_changes_state(make_controlled, make_proxy, caplog):
    caplog.set_level(logging.INFO, logger="lbproxy")
    a = await make_controlled("A")
    ok, bad = 200, 500
    flap = [bad, ok] * 6
    # First answer (at start) takes it up; flapping keeps it up; three failures take it
    # down; flapping keeps it down.
    a.health.script = [ok, *flap, bad, bad, bad, *flap]
    a.health.status = bad  # once the script is over: stays down
    total = len(a.health.script)
    group = checked(interval="50ms", unhealthy_threshold=3, healthy_threshold=3)
    proxy = await make_proxy(config_doc([a.address], group=group))
    s = server(proxy, a.address)
    history: list[State] = []

    def observe() -> bool:
        history.append(s.health.state)
        return sum(checks(s)) >= 1 + len(flap)

    await wait_for(observe, what="the first flapping phase")
    assert set(history) == {State.UP}
    history.clear()
    await wait_for(lambda: s.health.state is State.DOWN, what="three failures in a row")
    assert sum(checks(s)) == 1 + len(flap) + 3

    def observe_down() -> bool:
        history.append(s.health.state)
        return sum(checks(s)) >= total

    await wait_for(observe_down, what="the second flapping phase")
    assert set(history) == {State.DOWN}
    assert s.health.state is State.DOWN
    (up,) = transitions(caplog, s, "UP")
    assert "(was unknown)" in up
    (down,) = transitions(caplog, s, "DOWN")
    assert "3 consecutive checks failed" in down


# ---------------------------------------------------------------------------- logging


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        ("status", "unexpected status 500 Internal Server Error"),
        ("wrong code", "unexpected status 301 Moved Permanently"),
        ("timeout", "timeout after 0.3s"),
        ("refused", "refused"),
    ],
)
async def test_each_transition_logged_once_with_reason(
    make_controlled, make_proxy, caplog, failure, reason
):
    caplog.set_level(logging.INFO, logger="lbproxy")
    a = await make_controlled("A")
    group = checked(interval="100ms", timeout="300ms", unhealthy_threshold=2, healthy_threshold=2)
    proxy = await make_proxy(config_doc([a.address], group=group))
    s = server(proxy, a.address)
    if failure == "status":
        a.health.status = 500
    elif failure == "wrong code":
        a.health.status = 301  # expected_codes default to 2xx and 3xx: 301 passes...
        await wait_for(lambda: checks(s)[0] >= 3, what="a 301 check to pass")
        assert s.health.state is State.UP
        await proxy.apply_config(
            parse_config(
                config_doc(
                    [a.address],
                    group=checked(
                        interval="100ms",
                        timeout="300ms",
                        unhealthy_threshold=2,
                        healthy_threshold=2,
                        expected_codes=["http_2xx"],  # ...until 3xx is no longer expected
                    ),
                )
            ),
            "test",
        )
    elif failure == "timeout":
        a.health.hang = True
    else:
        await a.stop()
    await wait_for(lambda: s.health.state is State.DOWN, what="the server to go down")
    await wait_for(lambda: s.health.failures >= 4, what="two more failed checks")
    (down,) = transitions(caplog, s, "DOWN")
    assert down == (
        f"server {s.id} is DOWN (was up): 2 consecutive checks failed "
        f"(unhealthy_threshold 2), last: {reason}"
    )

    if failure == "refused":
        await a.start()
    a.health.hang = False
    a.health.status = 200
    await wait_for(lambda: s.health.state is State.UP, what="the server to come back")
    await wait_for(lambda: s.health.successes >= 4, what="two more good checks")
    up = transitions(caplog, s, "UP")
    assert len(up) == 2
    assert up[1] == (
        f"server {s.id} is UP (was down): 2 consecutive checks ok "
        "(healthy_threshold 2), last: 200 OK"
    )


async def test_host_header_of_an_ipv6_server(launch):
    """The Host header brackets an IPv6 address, with the server's port or the check port."""
    controls = [HealthControl(), HealthControl()]
    runners = []
    ports = []
    for ctl in controls:
        app = web.Application()
        app.middlewares.append(ctl.middleware())
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "::1", 0)
        await site.start()
        runners.append(runner)
        ports.append(runner.addresses[0][1])
    try:
        own, other = ports
        proxy = await launch(config_doc([f"[::1]:{own}"], group=checked()))
        await wait_for(lambda: len(controls[0].seen) >= 1, what="a check on the server's port")
        assert controls[0].seen[0][1] == f"[::1]:{own}"

        group = checked(port=other)
        proxy = await launch(config_doc([f"[::1]:{own}"], group=group))
        await wait_for(lambda: len(controls[1].seen) >= 1, what="a check on the check port")
        assert controls[1].seen[0][1] == f"[::1]:{other}"
        await wait_for(lambda: server(proxy, f"[::1]:{own}").health.state is State.UP)
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_server_added_by_reload_is_checked_at_once(make_backend, make_proxy):
    a = await make_backend("A")
    b = await make_backend("B")
    group = checked(interval="30s", healthy_threshold=3)
    proxy = await make_proxy(config_doc([a.address], group=group))
    added = time.monotonic()
    result = await proxy.apply_config(
        parse_config(config_doc([a.address, b.address], group=group)), "test"
    )
    assert result.ok
    sb = server(proxy, b.address)
    assert sb.health.state in (State.UNKNOWN, State.UP)
    await wait_for(lambda: sb.health.state is State.UP, timeout=15, what="B to come up")
    assert time.monotonic() - added < 15  # at once, not after one 30 s interval
    assert [p for _, p, _ in b.requests] == ["/health"]
    seen = set()
    for _ in range(2):
        seen.add((await get(proxy_url(proxy, path="/whoami")))[1])
    assert seen == {"A", "B"}


async def test_checks_are_spread_over_the_interval(make_controlled, make_proxy):
    backends = [await make_controlled(name) for name in "ABCD"]
    arrivals: list[tuple[float, str]] = []
    for b in backends:
        b.health.on_arrival = lambda name=b.name: arrivals.append((time.monotonic(), name))
    # Four servers over 2 s: one check every 500 ms, not four at once every 2 s. The steps are
    # wide so that a loaded machine's delays (tens of ms) cannot blur them.
    group = checked(interval="2s")
    await make_proxy(config_doc([b.address for b in backends], group=group))
    await wait_for(lambda: len(arrivals) >= 4 * 2, timeout=15, what="two rounds of checks")
    first_round = arrivals[:4]
    assert first_round[-1][0] - first_round[0][0] < 0.4  # all checked at once at start
    later = [t for t, _ in arrivals[4:8]]
    gaps = [b - a for a, b in itertools.pairwise(later)]
    assert min(gaps) > 0.2, gaps
    assert max(gaps) < 0.9, gaps
