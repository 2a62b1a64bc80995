"""Hot reload (issue 4): a new config applies to new connections only, never to open ones.

Real backends and a real proxy on loopback. Covers the acceptance test (200 WebSocket
tunnels exchanging numbered messages through 50 reloads that remove their servers, change
their idle timeout and move their listener), HTTP requests in flight and keep-alive
connections across a reload, every kind of invalid reload, listeners added, removed and
moved, health and scheduler state carried over, the reload budget, and the three triggers
(SIGHUP, the file changing on disk, POST /-/reload) on a real ``python -m lbproxy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from lbproxy.core.health import State
from tests.support import config_doc, free_port, proxy_url, wait_for

ROOT = Path(__file__).resolve().parents[2]


def doc(
    servers: list[str],
    *,
    name: str = "web",
    bind: str = "127.0.0.1:0",
    idle: str = "3s",
    extra_listeners: tuple[dict[str, Any], ...] = (),
    group: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    d = config_doc(servers, listener={"name": name, "bind": bind, "idle_timeout": idle}, **top)
    d["listeners"].extend(extra_listeners)
    d["server_groups"]["rs1"].update(group or {})
    return d


async def apply(proxy: Proxy, d: dict[str, Any]) -> Any:
    result = await proxy.apply_config(parse_config(d), "test")
    assert result.ok, result.message
    return result


def write_config(path: Path, d: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(d, sort_keys=False))


def ws_url(proxy: Proxy, listener: str = "web") -> str:
    return f"ws://{proxy.listeners.address(listener)}/ws"


async def get_text(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as r:
        return r.status, await r.text()


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


async def echo(ws: aiohttp.ClientWebSocketResponse, text: str) -> str:
    await ws.send_str(text)
    msg = await asyncio.wait_for(ws.receive(), 5)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    return str(msg.data)


# ------------------------------------------------------------------ the acceptance test


class EchoClient:
    """One tunnel: sends ``i:n`` every ``interval`` and checks the echoes arrive in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, index: int, interval: float) -> None:
        self.ws = ws
        self.index = index
        self.interval = interval
        self.sent = 0
        self.received = 0
        self.error: str | None = None
        self.closing = False  # set by the test before it closes the tunnel itself

    async def send_loop(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.ws.send_str(f"{self.index}:{self.sent}")
                self.sent += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        except Exception as exc:  # a dropped tunnel shows up here or in receive_loop
            self.error = self.error or f"send failed after {self.sent}: {exc!r}"

    async def receive_loop(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                self.error = self.error or f"unexpected {msg.type} after {self.received}"
                return
            want = f"{self.index}:{self.received}"
            if msg.data != want:
                self.error = self.error or f"got {msg.data!r}, expected {want!r}"
                return
            self.received += 1
        if not self.closing:
            self.error = self.error or (
                f"tunnel ended after {self.received} echoes: close code {self.ws.close_code}, "
                f"{self.ws.exception()!r}"
            )


async def test_200_tunnels_survive_50_reloads(make_backend, make_proxy, tmp_path):
    """The acceptance test: zero tunnels dropped, zero messages lost, duplicated, reordered."""
    a, b, c = [await make_backend(n) for n in "ABC"]
    fixed = free_port()
    path = tmp_path / "lb.yaml"
    # Tunnels start with a 3 s idle timeout; reloads take it down to 200 ms. The fast
    # tunnels talk every 50 ms, the slow ones every 500 ms: longer than any reloaded
    # timeout, shorter than the one they started with.
    variants = [
        doc([a.address, b.address], idle="3s"),
        doc([c.address], idle="200ms"),  # every tunnel's server removed
        doc([b.address, c.address], name="web2", idle="300ms"),  # listener renamed
        doc([c.address, a.address], bind=f"127.0.0.1:{fixed}", idle="200ms"),  # bind moved
        doc(
            [a.address, c.address],
            name="web2",
            idle="250ms",
            group={"scheduler": "wlc", "health_check": {"interval": "1s", "path": "/health"}},
        ),
        doc([b.address], idle="200ms", shutdown_timeout="5s"),
    ]
    write_config(path, variants[0])
    proxy = await make_proxy(variants[0], str(path))
    url = ws_url(proxy)
    stop = asyncio.Event()
    clients: list[EchoClient] = []
    tasks: list[asyncio.Task[None]] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets: list[aiohttp.ClientWebSocketResponse] = []
        for _ in range(11):  # in batches of 20: quick, without a connect storm
            sockets += await asyncio.gather(*(session.ws_connect(url) for _ in range(20)))
        for i, ws in enumerate(sockets):
            cl = EchoClient(ws, i, 0.05 if i < 200 else 0.5)
            clients.append(cl)
            tasks.append(asyncio.create_task(cl.receive_loop()))
            tasks.append(asyncio.create_task(cl.send_loop(stop)))
        stats = proxy.registry.listeners["web"]
        assert sum(1 for x in stats.live if type(x).__name__ == "Tunnel") == 220
        by_server = {s.label: s.active for s in proxy.snapshot.groups["rs1"].servers}
        assert by_server == {a.address: 110, b.address: 110}

        fast_clients, slow_clients = clients[:200], clients[200:]

        async def traffic(tunnels: list[EchoClient], more: int, at_least: int = 0) -> None:
            """Until every tunnel has had ``more`` more echoes (and ``at_least`` in all): the
            traffic is counted, not timed, so a loaded machine only makes it slower."""
            want = [(cl, max(cl.received + more, at_least)) for cl in tunnels]
            await wait_for(
                lambda: all(cl.received >= n or cl.error for cl, n in want),
                timeout=30,
                what=f"{more} more echoes on each of {len(tunnels)} tunnels",
            )

        applied = 0
        for n in range(1, 51):
            d = variants[n % len(variants)]
            if n % 3 == 0:
                write_config(path, d)
                result = await proxy.reload("file")
            else:
                result = await proxy.apply_config(parse_config(d), "test")
            assert result.ok, result.message
            applied += result.changed
            await traffic(fast_clients, 2)  # traffic between reloads is the point of the test
        assert applied == 50
        assert proxy.registry.reloads.success == 50
        # The config in force has a 300 ms idle timeout; the slow tunnels (500 ms) live on.
        assert proxy.snapshot.config.listeners[0].timeouts.idle == 0.3
        # Two more rounds of the slow tunnels under the new timeout (and ten in all).
        await traffic(slow_clients, 2, at_least=10)
        # New connections meanwhile follow the config in force: listener web2, servers B, C.
        assert refused(int(url.rsplit(":", 1)[1].split("/")[0]))
        group = proxy.snapshot.groups["rs1"]
        await wait_for(lambda: len(group.available()) == 2, what="B and C to be up")
        fresh = await session.ws_connect(ws_url(proxy, "web2"))
        assert await echo(fresh, "whoami") in ("B", "C")
        await fresh.close()

        stop.set()
        with contextlib.suppress(AssertionError):  # what is missing is reported just below
            await wait_for(
                lambda: all(cl.received == cl.sent or cl.error for cl in clients),
                timeout=10,
                what="every echo to arrive",
            )
        errors = [
            f"tunnel {cl.index}: {cl.error or f'{cl.sent - cl.received} echoes missing'}"
            for cl in clients
            if cl.error or cl.received != cl.sent
        ]
        assert errors == []
        assert sum(1 for x in stats.live if type(x).__name__ == "Tunnel") == 220
        assert stats.ws_closes == dict.fromkeys(stats.ws_closes, 0)
        web2 = proxy.registry.listeners["web2"]
        await wait_for(lambda: web2.ws_closes["client"] == 1, what="the fresh tunnel's close")
        fast = [cl.sent for cl in fast_clients]
        assert min(fast) >= 100, f"fast tunnels sent too little: {min(fast)}"
        assert min(cl.sent for cl in slow_clients) >= 10
        for cl in clients:
            cl.closing = True
            await cl.ws.close()
        await asyncio.gather(*tasks)
    await wait_for(lambda: stats.ws_closes["client"] == 220, what="every tunnel to be closed")
    assert stats.ws_closes == {
        "client": 220,
        "server": 0,
        "idle_timeout": 0,
        "shutdown": 0,
        "drain": 0,
        "rebalance": 0,
        "policy": 0,
        "error": 0,
    }


async def test_open_tunnel_keeps_its_idle_timeout_and_new_ones_take_the_new_one(
    make_backend, make_proxy
):
    a = await make_backend("A")
    # The old timeout is long, so that the new tunnel's bound below (a hang guard) still tells
    # the new 200 ms from it.
    proxy = await make_proxy(doc([a.address], idle="30s"))
    stats = proxy.registry.listeners["web"]
    async with aiohttp.ClientSession() as s:
        old = await s.ws_connect(ws_url(proxy))
        assert await echo(old, "before") == "before"
        old_quiet_since = time.monotonic()
        await apply(proxy, doc([a.address], idle="200ms"))
        t0 = time.monotonic()  # before the handshake: the tunnel's clock starts at its 101
        new = await s.ws_connect(ws_url(proxy))
        msg = await asyncio.wait_for(new.receive(), 10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert 0.15 < time.monotonic() - t0 < 0.2 + 8  # the new 200 ms, not the old 30 s
        assert stats.ws_closes["idle_timeout"] == 1
        # The old tunnel has been silent longer than 200 ms; its own timeout is 30 s.
        assert time.monotonic() - old_quiet_since > 0.2
        assert await echo(old, "after") == "after"
        assert stats.ws_closes["idle_timeout"] == 1
        await old.close()


# ------------------------------------------------------------------ HTTP across a reload


async def test_request_in_flight_completes_after_its_server_is_removed(make_backend, make_proxy):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(doc([a.address], group={"keepalive_timeout": "300ms"}))
    [old_a] = proxy.snapshot.groups["rs1"].servers
    async with aiohttp.ClientSession() as s:
        slow = asyncio.create_task(get_text(s, proxy_url(proxy, path="/sleep/1")))
        await wait_for(lambda: old_a.active == 1, what="the request to reach A")
        result = await apply(proxy, doc([b.address], group={"keepalive_timeout": "300ms"}))
        assert f"servers removed: rs1/{a.address}" in result.message
        assert not slow.done()
        await wait_for(lambda: proxy.snapshot.groups["rs1"].available() != [], what="B up")
        assert await get_text(s, proxy_url(proxy, path="/whoami")) == (200, "B")
        assert await asyncio.wait_for(slow, 5) == (200, "A slept")
    assert old_a.active == 0
    # The removed server's upstream connection is not kept in its pool for nobody.
    await wait_for(lambda: not old_a.pool.idle, what="A's pooled connection to be closed")


async def test_keepalive_connection_next_request_uses_the_new_config(make_backend, make_proxy):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(doc([a.address]))
    stats = proxy.registry.listeners["web"]
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as s:
        url = proxy_url(proxy, path="/whoami")
        assert await get_text(s, url) == (200, "A")
        await apply(proxy, doc([b.address], group={"scheduler": "wrr"}))
        await wait_for(lambda: proxy.snapshot.groups["rs1"].available() != [], what="B up")
        assert await get_text(s, url) == (200, "B")
        assert await get_text(s, url) == (200, "B")
    assert stats.connections_total == 1  # the same client connection throughout


# ------------------------------------------------------------------ invalid reloads


def line_of(path: str | Path, text: str) -> int:
    """The 1-based line of the first line of ``path`` holding ``text``."""
    lines = Path(path).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def occupied_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


async def test_invalid_reloads_change_nothing(make_backend, make_proxy, tmp_path):
    a = await make_backend("A")
    b = await make_backend("B")
    path = tmp_path / "lb.yaml"
    good = doc([a.address])
    write_config(path, good)
    proxy = await make_proxy(good, str(path))
    snap = proxy.snapshot
    web = proxy.listeners.address("web")
    blocker = occupied_socket()
    taken = blocker.getsockname()[1]
    spare = free_port()
    good_text = yaml.safe_dump(good, sort_keys=False)
    bad_files = {
        "yaml syntax": (
            good_text + "listeners: [oops\n",
            f"{path}:",
            "YAML syntax error",
        ),
        "unknown key": (
            yaml.safe_dump(doc([b.address], group={"max_conns": 5})),
            "server_groups.rs1.max_conns",
            "unknown key",
        ),
        "bad value": (
            yaml.safe_dump(doc([b.address], idle="soon")),
            "listeners[0].idle_timeout",
            "expected a duration",
        ),
        "bind in use": (
            yaml.safe_dump(
                doc(
                    [b.address],
                    extra_listeners=(
                        {"name": "ok", "bind": f"127.0.0.1:{spare}", "server_group": "rs1"},
                        {"name": "taken", "bind": f"127.0.0.1:{taken}", "server_group": "rs1"},
                    ),
                )
            ),
            "listeners[2].bind",
            f"cannot listen on 127.0.0.1:{taken}",
        ),
    }
    try:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(ws_url(proxy))
            assert await echo(ws, "start") == "start"
            for n, (kind, (text, place, problem)) in enumerate(bad_files.items(), 1):
                path.write_text(text)
                result = await proxy.reload("test")
                assert not result.ok, kind
                assert not result.changed
                assert len(result.problems) == 1, result.problems
                # a problem of the file names its line; one found later (a bind) has none
                shown = result.problems[0].removeprefix(f"{path}:")
                shown = shown.split(": ", 1)[1] if shown[:1].isdigit() else result.problems[0]
                assert shown.startswith(place) or result.problems[0].startswith(place), (
                    kind,
                    result.problems,
                )
                assert problem in result.problems[0], (kind, result.problems)
                assert proxy.registry.reloads.failure == n
                assert proxy.registry.reloads.last_success == 0
                assert proxy.last_reload[1] is False
                assert proxy.snapshot is snap
                assert proxy.listeners.address("web") == web
                assert set(proxy.listeners.bound) == {"web"}
                assert refused(spare), f"{kind}: a listener of the failed reload is open"
                assert await echo(ws, f"after {kind}") == f"after {kind}"
                assert await get_text(s, proxy_url(proxy, path="/whoami")) == (200, "A")
            assert b.requests == []
            # No metric series for the servers and listeners of a config never in force.
            assert set(proxy.registry.servers) == {f"rs1/{a.address}"}
            assert set(proxy.registry.listeners) == {"web"}
            # A good file afterwards is applied and clears the failure flag.
            write_config(path, doc([b.address]))
            result = await proxy.reload("test")
            assert result.ok and result.changed
            assert proxy.registry.reloads.last_success == 1
            assert proxy.registry.reloads.success == 1
            assert await echo(ws, "end") == "end"
            await ws.close()
    finally:
        blocker.close()


# ------------------------------------------------------------------ listeners


async def test_added_listener_starts_listening(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(doc([a.address]))
    api = {"name": "api", "bind": "127.0.0.1:0", "server_group": "rs1"}
    result = await apply(proxy, doc([a.address], extra_listeners=(api,)))
    assert result.message == "listeners added: api"
    async with aiohttp.ClientSession() as s:
        assert await get_text(s, proxy_url(proxy, "api", "/whoami")) == (200, "A")
        assert await get_text(s, proxy_url(proxy, "web", "/whoami")) == (200, "A")
    assert proxy.registry.listeners["api"].connections_total == 1


async def test_removed_listener_stops_accepting_but_its_connections_go_on(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(doc([a.address]))
    port = proxy.listeners.address("web").port
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as s, aiohttp.ClientSession() as s2:
        ws = await s2.ws_connect(ws_url(proxy))
        url = proxy_url(proxy, path="/whoami")
        assert await get_text(s, url) == (200, "A")
        result = await apply(proxy, doc([a.address], name="api"))
        assert result.message == "listeners added: api; listeners removed: web"
        assert refused(port)
        assert await echo(ws, "still here") == "still here"
        assert await get_text(s, url) == (200, "A")  # the open keep-alive connection
        assert proxy.registry.listeners["web"].connections_total == 2  # keep-alive + ws
        assert await get_text(s2, proxy_url(proxy, "api", "/whoami")) == (200, "A")
        await ws.close()


async def test_changed_bind_opens_the_new_socket_before_closing_the_old(make_backend, make_proxy):
    """Seen through the sockets: while the new address cannot be bound, the move fails and the
    old socket never stopped accepting; once it can, the listener moves, its tunnels stay."""
    a = await make_backend("A")
    p1 = free_port()
    proxy = await make_proxy(doc([a.address], bind=f"127.0.0.1:{p1}"))
    old_server = proxy.listeners.bound["web"].server
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        p2 = taken.getsockname()[1]
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"ws://127.0.0.1:{p1}/ws")
            result = await proxy.apply_config(
                parse_config(doc([a.address], bind=f"127.0.0.1:{p2}")), "test"
            )
            assert not result.ok and "listeners[0].bind: cannot listen on" in result.message
            assert old_server.is_serving()
            assert await get_text(s, f"http://127.0.0.1:{p1}/whoami") == (200, "A")
            taken.close()
            result = await apply(proxy, doc([a.address], bind=f"127.0.0.1:{p2}"))
            assert result.message == "listeners changed: web"
            assert not old_server.is_serving()
            assert refused(p1)
            assert await get_text(s, f"http://127.0.0.1:{p2}/whoami") == (200, "A")
            assert await echo(ws, "moved") == "moved"
            await ws.close()


async def test_renamed_listener_on_the_same_bind(make_backend, make_proxy):
    """Renaming a listener without moving it must not fail on its own socket."""
    a = await make_backend("A")
    port = free_port()
    proxy = await make_proxy(doc([a.address], bind=f"127.0.0.1:{port}"))
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"ws://127.0.0.1:{port}/ws")
        result = await proxy.apply_config(
            parse_config(doc([a.address], name="public", bind=f"127.0.0.1:{port}")), "test"
        )
        assert result.ok, result.message
        assert await get_text(s, f"http://127.0.0.1:{port}/whoami") == (200, "A")
        assert proxy.registry.listeners["public"].connections_total == 1
        assert await echo(ws, "renamed") == "renamed"
        await ws.close()


async def test_two_listeners_swap_their_binds(make_backend, make_proxy):
    a = await make_backend("A")
    b = await make_backend("B")
    p1, p2 = free_port(), free_port()

    def swap_doc(web: int, api: int) -> dict[str, Any]:
        d = doc(
            [a.address],
            bind=f"127.0.0.1:{web}",
            extra_listeners=({"name": "api", "bind": f"127.0.0.1:{api}", "server_group": "other"},),
        )
        d["server_groups"]["other"] = {"servers": [b.address], "health_check": {"path": "/health"}}
        return d

    proxy = await make_proxy(swap_doc(p1, p2))
    async with aiohttp.ClientSession() as s:
        assert await get_text(s, f"http://127.0.0.1:{p1}/whoami") == (200, "A")
        assert await get_text(s, f"http://127.0.0.1:{p2}/whoami") == (200, "B")
        result = await apply(proxy, swap_doc(p2, p1))
        assert result.message == "listeners changed: web, api"
    async with aiohttp.ClientSession() as s:
        assert await get_text(s, f"http://127.0.0.1:{p1}/whoami") == (200, "B")
        assert await get_text(s, f"http://127.0.0.1:{p2}/whoami") == (200, "A")
    assert proxy.registry.listeners["api"].connections_total == 2
    assert proxy.registry.listeners["web"].connections_total == 2


# ------------------------------------------------------------------ health and scheduler state


async def test_up_server_stays_up_and_rotation_continues(make_backend, make_proxy):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(doc([a.address, b.address]))
    group = proxy.snapshot.groups["rs1"]
    sa, sb = group.servers
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as s:
        url = proxy_url(proxy, path="/whoami")
        first = [(await get_text(s, url))[1] for _ in range(3)]
        checks = sa.stats.health_checks["success"]
        # Unrelated changes, and checks so rare that none runs during the rest of the test.
        await apply(
            proxy,
            doc(
                [a.address, b.address],
                idle="10s",
                group={"health_check": {"interval": "1m", "path": "/health"}},
            ),
        )
        assert proxy.snapshot.groups["rs1"].servers == (sa, sb)
        assert sa.health.state is State.UP and sb.health.state is State.UP
        assert proxy.snapshot.groups["rs1"].scheduler is group.scheduler
        # No re-warming and no restart of the rotation at the first server.
        after = [(await get_text(s, url))[1] for _ in range(3)]
        assert first + after in (["A", "B"] * 3, ["B", "A"] * 3)
    # At most the one check whose (old, 200 ms) wait was already running at the reload.
    assert sa.stats.health_checks["success"] <= checks + 1


async def test_added_server_is_checked_before_it_gets_traffic(make_backend, make_proxy):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(doc([a.address]))
    await apply(proxy, doc([a.address, b.address]))
    sb = proxy.snapshot.groups["rs1"].servers[1]
    # Warmed before the swap: up (one good check) by the time the reload is applied.
    assert sb.health.state is State.UP and sb.health.successes == 1
    assert [p for _, p, _ in b.requests] == ["/health"]
    async with aiohttp.ClientSession() as s:
        answers = await asyncio.gather(
            *(get_text(s, proxy_url(proxy, path="/whoami")) for _ in range(10))
        )
    assert {st for st, _ in answers} == {200}
    assert {name for _, name in answers} == {"A", "B"}


async def test_removed_servers_check_loops_stop(make_backend, make_proxy):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(doc([a.address, b.address]))
    sid_a, sid_b = f"rs1/{a.address}", f"rs1/{b.address}"
    task_a = proxy.checker._tasks[sid_a]
    task_b = proxy.checker._tasks[sid_b]
    await apply(proxy, doc([b.address]))
    assert set(proxy.checker._tasks) == {sid_b}
    assert proxy.checker._tasks[sid_b] is task_b  # the persisting server's loop goes on
    await wait_for(task_a.done, what="A's check loop to end")
    checks_a = sum(1 for _, p, _ in a.requests if p == "/health")
    checks_b = sum(1 for _, p, _ in b.requests if p == "/health")
    await wait_for(
        lambda: sum(1 for _, p, _ in b.requests if p == "/health") >= checks_b + 3,
        what="three more checks of B",
    )
    assert sum(1 for _, p, _ in a.requests if p == "/health") == checks_a
    assert sid_a not in proxy.registry.backend_up


# ------------------------------------------------------------------ the reload budget


def big_doc(port: int, idle: str) -> dict[str, Any]:
    """100 server groups of 10 servers (checks disabled), a listener on every tenth group."""
    return {
        "listeners": [
            {
                "name": f"l{g:03d}",
                "bind": "127.0.0.1:0",
                "server_group": f"g{g:03d}",
                "idle_timeout": idle,
            }
            for g in range(0, 100, 10)
        ],
        "server_groups": {
            f"g{g:03d}": {
                "servers": [f"127.0.{g}.{s + 1}:{port}" for s in range(10)],
                "health_check": {"enabled": False},
            }
            for g in range(100)
        },
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }


@pytest.mark.parametrize("change", ["timeouts", "servers"])
async def test_apply_config_of_100_groups_of_10_servers(make_proxy, change):
    """Such reloads apply and change what they should; how long they take (issue 4's 100 ms
    budget) is a figure: bench/reload_budget.py. The bound below is only a hang guard."""
    proxy = await make_proxy(big_doc(9000, "60s"))
    if change == "timeouts":
        configs = [parse_config(big_doc(9000, idle)) for idle in ("30s", "60s")]
    else:
        configs = [parse_config(big_doc(port, "60s")) for port in (9001, 9002)]
    best = float("inf")
    for i in range(3):
        t0 = time.perf_counter()
        result = await proxy.apply_config(configs[i % 2], "test")
        best = min(best, time.perf_counter() - t0)
        assert result.ok and result.changed, result.message
    assert len(proxy.state.servers) == 1000
    assert best < 10.0, f"apply_config took {best * 1000:.1f} ms"


# ------------------------------------------------------------------ triggers, on a real process


class ProxyProcess:
    """``python -m lbproxy --config F`` with its log collected; stopped by the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def start(self, admin_port: int) -> ProxyProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lbproxy",
            "--config",
            str(self.path),
            cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read())
        self.admin = f"http://127.0.0.1:{admin_port}"
        await wait_for(lambda: any("admin on" in line for line in self.log), 10, "startup")
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.log.append(line.decode(errors="replace").rstrip())

    def logged(self, text: str) -> int:
        return sum(1 for line in self.log if text in line)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            rc = await self.proc.wait()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return rc


def write_keeping_signature(path: Path, d: dict[str, Any], size: int) -> None:
    """Rewrite in place with the same size, inode and mtime: invisible to the file watcher.

    Lets a test prove that SIGHUP or POST /-/reload (not the watcher) applied the change.
    """
    st = path.stat()
    text = yaml.safe_dump(d, sort_keys=False)
    assert len(text) < size
    text += "#" * (size - len(text) - 1) + "\n"
    with open(path, "r+") as f:
        f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == size


PAD = 4096


def write_padded(path: Path, d: dict[str, Any]) -> None:
    text = yaml.safe_dump(d, sort_keys=False)
    path.write_text(text + "#" * (PAD - len(text) - 1) + "\n")


def process_doc(servers: list[str], port: int, admin_port: int, **kw: Any) -> dict[str, Any]:
    return doc(
        servers,
        bind=f"127.0.0.1:{port}",
        admin={"bind": f"127.0.0.1:{admin_port}"},
        **kw,
    )


async def whoami(s: aiohttp.ClientSession, port: int) -> tuple[int, str]:
    return await get_text(s, f"http://127.0.0.1:{port}/whoami")


async def served_by(s: aiohttp.ClientSession, port: int, name: str) -> bool:
    try:
        return await whoami(s, port) == (200, name)
    except aiohttp.ClientError:
        return False


@pytest.fixture
async def lbproxy_process(tmp_path):
    started: list[ProxyProcess] = []

    async def start(d: dict[str, Any], admin_port: int) -> ProxyProcess:
        path = tmp_path / "lb.yaml"
        write_padded(path, d)
        p = await ProxyProcess(path).start(admin_port)
        started.append(p)
        return p

    yield start
    for p in started:
        await p.stop()


async def test_sighup_reloads_and_unchanged_file_is_a_noop(make_backend, lbproxy_process):
    a = await make_backend("A")
    b = await make_backend("B")
    port, admin = free_port(), free_port()
    p = await lbproxy_process(process_doc([a.address], port, admin), admin)
    async with aiohttp.ClientSession() as s:
        await wait_for(lambda: served_by(s, port, "A"), 5, "A to serve")
        write_keeping_signature(p.path, process_doc([b.address], port, admin), PAD)
        assert p.proc is not None
        p.proc.send_signal(signal.SIGHUP)
        await wait_for(lambda: p.logged("reload (SIGHUP): applied") == 1, 5, "the reload")
        await wait_for(lambda: served_by(s, port, "B"), 5, "B to serve")
        async with s.get(f"{p.admin}/status") as r:
            st = await r.json()
        assert st["last_reload"]["success"] is True
        assert [x["address"] for x in st["server_groups"][0]["servers"]] == [b.address]
        # The same file again: a no-op, and the log says so.
        p.proc.send_signal(signal.SIGHUP)
        await wait_for(
            lambda: p.logged("reload (SIGHUP): configuration unchanged, nothing to do") == 1,
            5,
            "the no-op reload",
        )
        assert await whoami(s, port) == (200, "B")
    assert p.logged("file change") == 0
    assert await p.stop() == 0


@pytest.mark.parametrize("how", ["in place", "rename over"])
async def test_file_change_triggers_reload(make_backend, lbproxy_process, how):
    a = await make_backend("A")
    b = await make_backend("B")
    port, admin = free_port(), free_port()
    p = await lbproxy_process(process_doc([a.address], port, admin), admin)
    async with aiohttp.ClientSession() as s:
        await wait_for(lambda: served_by(s, port, "A"), 5, "A to serve")
        new = process_doc([b.address], port, admin)
        if how == "in place":
            write_config(p.path, new)
        else:
            tmp = p.path.with_name(".lb.yaml.swp")
            write_config(tmp, new)
            os.rename(tmp, p.path)
        await wait_for(lambda: served_by(s, port, "B"), 5, "B to serve after the edit")
        assert p.logged("reload (file change): applied") == 1
        async with s.get(f"{p.admin}/metrics") as r:
            text = await r.text()
        assert 'lbproxy_config_reloads_total{result="success"} 1.0' in text
        assert "lbproxy_config_last_reload_success 1.0" in text
    assert await p.stop() == 0


async def test_admin_reload_answers_with_summary_or_errors(make_backend, lbproxy_process):
    a = await make_backend("A")
    b = await make_backend("B")
    port, admin = free_port(), free_port()
    p = await lbproxy_process(process_doc([a.address], port, admin), admin)
    async with aiohttp.ClientSession() as s:
        await wait_for(lambda: served_by(s, port, "A"), 5, "A to serve")
        write_keeping_signature(p.path, process_doc([b.address], port, admin), PAD)
        async with s.post(f"{p.admin}/-/reload", json={}) as r:
            assert r.status == 200
            body = await r.json()
        assert body == {
            "result": "ok",
            "changed": True,
            "summary": (
                f"groups changed: rs1; servers added: rs1/{b.address}; "
                f"servers removed: rs1/{a.address}"
            ),
        }
        await wait_for(lambda: served_by(s, port, "B"), 5, "B to serve")

        async with s.post(f"{p.admin}/-/reload", json={}) as r:
            assert r.status == 200
            assert await r.json() == {
                "result": "ok",
                "changed": False,
                "summary": "configuration unchanged",
            }

        bad = process_doc([b.address], port, admin, group={"weights": 1})
        bad["listeners"][0]["idle_timeout"] = "forever"
        write_keeping_signature(p.path, bad, PAD)
        async with s.post(f"{p.admin}/-/reload", json={}) as r:
            assert r.status == 400
            body = await r.json()
        assert body["result"] == "error"
        # each error: "file:line: place: message"
        assert [e.split(": ")[:1] for e in body["errors"]] == [  # in the file's order
            [f"{p.path}:{line_of(p.path, 'idle_timeout:')}"],
            [f"{p.path}:{line_of(p.path, 'weights:')}"],
        ]
        assert [e.split(": ")[1] for e in body["errors"]] == [
            "listeners[0].idle_timeout",
            "server_groups.rs1.weights",
        ]
        assert await whoami(s, port) == (200, "B")
        async with s.get(f"{p.admin}/metrics") as r:
            text = await r.text()
        assert 'lbproxy_config_reloads_total{result="failure"} 1.0' in text
        assert "lbproxy_config_last_reload_success 0.0" in text
        async with s.get(f"{p.admin}/status") as r:
            st = await r.json()
        assert st["last_reload"]["success"] is False
        assert "listeners[0].idle_timeout" in st["last_reload"]["message"]
    assert p.logged("reload (admin) failed") == 1
    assert p.logged("file change") == 0
    assert await p.stop() == 0


async def test_admin_bind_moves_on_reload_and_a_bad_one_changes_nothing(make_backend, make_proxy):
    from lbproxy.control.admin import AdminServer

    a = await make_backend("A")
    first, second = free_port(), free_port()
    d = config_doc([a.address])
    d["admin"] = {"bind": f"127.0.0.1:{first}"}
    proxy = await make_proxy(d)
    admin = AdminServer(proxy)
    await admin.start()
    proxy.admin = admin

    async def healthz(port: int) -> int | None:
        try:
            async with (
                aiohttp.ClientSession() as s,
                s.get(f"http://127.0.0.1:{port}/healthz") as r,
            ):
                return r.status
        except aiohttp.ClientConnectionError:
            return None

    try:
        assert await healthz(first) == 200
        # A port someone else holds: the reload fails and the admin stays where it was.
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            busy = taken.getsockname()[1]
            d["admin"] = {"bind": f"127.0.0.1:{busy}"}
            result = await proxy.apply_config(parse_config(d), "test")
            assert not result.ok
            assert result.problems[0].startswith(f"admin.bind: cannot listen on 127.0.0.1:{busy}")
        assert await healthz(first) == 200
        # A free one: the admin moves, the old port stops answering.
        d["admin"] = {"bind": f"127.0.0.1:{second}"}
        result = await apply(proxy, d)
        assert result.ok and result.changed
        assert await healthz(second) == 200
        assert await healthz(first) is None
        assert admin.address is not None and admin.address.port == second
    finally:
        await admin.close()
