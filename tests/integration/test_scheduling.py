"""Schedulers through a live proxy (issue 7): wrr, wlc and sh as clients see them.

The schedulers themselves are unit-tested (tests/unit/test_balancer.py); here real requests
and WebSocket tunnels go through a real proxy to real backends, so what is checked is the
wiring: that ``active`` counts open tunnels, that a reload hands the scheduler over, that
weights, health and the hash key reach the scheduler.

- wrr 1:2:3: 600 requests give exactly 100/200/300, in nginx's smooth interleaved order;
  weight 0 (by reload) takes nothing new while a WebSocket to it goes on.
- wlc: 300 WebSockets spread 100/100/100; a server back from the dead takes every new tunnel
  until it has caught up; ties go round-robin.
- sh: a client address always lands on the same server (real distinct source addresses,
  127.0.0.x); with ``hash_key: x_forwarded_for`` the first X-Forwarded-For address decides;
  removing one of three servers by reload moves only that server's clients.
- Scheduler state survives a reload for the servers that persist.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest

from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from lbproxy.core.balancer import ConsistentHash
from lbproxy.core.health import State
from lbproxy.core.snapshot import ServerState
from tests.support import Backend, config_doc, proxy_url, wait_for

pytestmark = pytest.mark.timeout(30)

WS = aiohttp.ClientWebSocketResponse


def sched_doc(
    backends: Sequence[Backend],
    scheduler: str,
    weights: Sequence[int] | None = None,
    **group: Any,
) -> dict[str, Any]:
    d = config_doc([b.address for b in backends], group={"scheduler": scheduler, **group})
    if weights is not None:
        for server, weight in zip(d["server_groups"]["rs1"]["servers"], weights, strict=True):
            server["weight"] = weight
    return d


async def apply(proxy: Proxy, d: dict[str, Any]) -> None:
    result = await proxy.apply_config(parse_config(d), "test")
    assert result.ok, result.message


def server(proxy: Proxy, backend: Backend) -> ServerState:
    return proxy.state.servers[f"rs1/{backend.address}"]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # No connection limit: the WebSocket tests hold hundreds of connections at once.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


async def whoami(
    session: aiohttp.ClientSession, proxy: Proxy, headers: dict[str, str] | None = None
) -> str:
    async with session.get(proxy_url(proxy, path="/whoami"), headers=headers) as r:
        assert r.status == 200
        return await r.text()


async def names(session: aiohttp.ClientSession, proxy: Proxy, n: int) -> list[str]:
    return [await whoami(session, proxy) for _ in range(n)]


async def open_ws(session: aiohttp.ClientSession, proxy: Proxy) -> WS:
    return await session.ws_connect(proxy_url(proxy, path="/ws"))


async def ask(ws: WS, text: str = "whoami") -> str:
    await ws.send_str(text)
    msg = await ws.receive(timeout=5)
    assert msg.type is aiohttp.WSMsgType.TEXT, msg
    return str(msg.data)


async def open_many(session: aiohttp.ClientSession, proxy: Proxy, n: int) -> list[WS]:
    """``n`` tunnels opened concurrently (the proxy picks for each as its upgrade arrives)."""
    return list(await asyncio.gather(*(open_ws(session, proxy) for _ in range(n))))


async def spread(tunnels: Sequence[WS]) -> collections.Counter[str]:
    """Which backend each tunnel reaches, asked through the tunnel itself."""
    return collections.Counter(await asyncio.gather(*(ask(ws) for ws in tunnels)))


async def close_all(tunnels: Sequence[WS]) -> None:
    await asyncio.gather(*(ws.close() for ws in tunnels), return_exceptions=True)


# ------------------------------------------------------------------ wrr


# nginx's smooth weighted round-robin for weights A=1, B=2, C=3, from zero: every pick adds
# each weight to its server's current value, the largest (first in config order on a tie)
# wins and loses the total (6).  (1,2,3)->C  (2,4,0)->B  (3,0,3)->A  (-2,2,6)->C  (-1,4,3)->B
# (0,0,6)->C, back to (0,0,0): the cycle repeats every 6 picks.
SMOOTH_1_2_3 = ["C", "B", "A", "C", "B", "C"]


async def test_wrr_1_2_3_gives_exact_interleaved_shares(make_backend, make_proxy, session):
    backends = [await make_backend(n) for n in "ABC"]
    proxy = await make_proxy(sched_doc(backends, "wrr", [1, 2, 3]))
    got = await names(session, proxy, 600)
    assert collections.Counter(got) == {"A": 100, "B": 200, "C": 300}
    assert got[:6] == SMOOTH_1_2_3
    # Interleaved, not in bursts: every window of 6 consecutive responses holds exactly the
    # shares, so no server ever gets more than its share in a row.
    for i in range(len(got) - 5):
        assert collections.Counter(got[i : i + 6]) == {"A": 1, "B": 2, "C": 3}, (i, got[i : i + 6])


async def test_wrr_state_survives_a_reload(make_backend, make_proxy, session):
    backends = [await make_backend(n) for n in "ABC"]
    d = sched_doc(backends, "wrr", [1, 2, 3])
    proxy = await make_proxy(d)
    before = await names(session, proxy, 3)
    # A reload that keeps the three servers (the group and listener change otherwise).
    d["server_groups"]["rs1"]["keepalive_connections"] = 8
    d["listeners"][0]["idle_timeout"] = "30s"
    await apply(proxy, d)
    after = await names(session, proxy, 3)
    # The sequence goes on where it was; a fresh scheduler would start over with C, B, A.
    assert before + after == SMOOTH_1_2_3


async def test_weight_0_drains_while_an_open_websocket_goes_on(make_backend, make_proxy, session):
    a, b = await make_backend("A"), await make_backend("B")
    d = sched_doc([a, b], "wrr", [100, 100])
    proxy = await make_proxy(d)
    ws = await open_ws(session, proxy)
    try:
        pinned = await ask(ws)
        drained, other = (a, b) if pinned == "A" else (b, a)
        for s in d["server_groups"]["rs1"]["servers"]:
            s["weight"] = 0 if s["address"] == drained.address else 100
        await apply(proxy, d)
        assert server(proxy, drained).weight == 0

        assert set(await names(session, proxy, 20)) == {other.name}
        fresh = await open_many(session, proxy, 4)
        assert await spread(fresh) == {other.name: 4}
        await close_all(fresh)
        # The open tunnel to the drained server carries on, both ways.
        for i in range(5):
            assert await ask(ws, f"still here {i}") == f"still here {i}"
        assert await ask(ws) == drained.name
        assert server(proxy, drained).active == 1
    finally:
        await ws.close()
    await wait_for(lambda: server(proxy, drained).active == 0, what="the tunnel to close")


# ------------------------------------------------------------------ wlc


async def test_wlc_spreads_300_websockets_evenly(make_backend, make_proxy, session):
    backends = [await make_backend(n) for n in "ABC"]
    proxy = await make_proxy(sched_doc(backends, "wlc"))
    tunnels = await open_many(session, proxy, 300)
    try:
        assert await spread(tunnels) == {"A": 100, "B": 100, "C": 100}
        assert [server(proxy, b).active for b in backends] == [100, 100, 100]
    finally:
        await close_all(tunnels)
    await wait_for(
        lambda: all(server(proxy, b).active == 0 for b in backends), what="every tunnel to close"
    )


async def test_wlc_sends_new_tunnels_to_a_recovered_server(make_backend, make_proxy, session):
    a, b, c = [await make_backend(n) for n in "ABC"]
    check = {"interval": "100ms", "timeout": "1s", "path": "/health", "healthy_threshold": 1}
    proxy = await make_proxy(sched_doc([a, b, c], "wlc", health_check=check))
    await c.stop()
    await wait_for(lambda: server(proxy, c).health.state is State.DOWN, what="C to be down")

    old = await open_many(session, proxy, 200)
    tunnels = list(old)
    try:
        assert await spread(old) == {"A": 100, "B": 100}
        await make_backend("C", c.port)
        await wait_for(lambda: server(proxy, c).health.available, what="C to be up again")

        # Round-robin would give C a third of these; wlc gives it all of them, until it holds
        # as many as the others.
        fresh = await open_many(session, proxy, 100)
        tunnels += fresh
        assert await spread(fresh) == {"C": 100}
        # All even again: ties go round-robin, one each.
        tied = await open_many(session, proxy, 3)
        tunnels += tied
        assert await spread(tied) == {"A": 1, "B": 1, "C": 1}
        assert [server(proxy, x).active for x in (a, b, c)] == [101, 101, 101]
    finally:
        await close_all(tunnels)


async def test_wlc_ties_are_broken_round_robin(make_backend, make_proxy, session):
    backends = [await make_backend(n) for n in "ABC"]
    proxy = await make_proxy(sched_doc(backends, "wlc"))
    # Each request ends before the next: all three are always tied at 0 open connections.
    assert await names(session, proxy, 9) == ["A", "B", "C"] * 3
    ws = await open_ws(session, proxy)  # the tie goes on: A, which then holds a tunnel
    try:
        assert await ask(ws) == "A"
        assert await names(session, proxy, 6) == ["B", "C"] * 3
    finally:
        await ws.close()
    await wait_for(lambda: server(proxy, backends[0]).active == 0, what="the tunnel to close")
    assert await names(session, proxy, 3) == ["A", "B", "C"]


# ------------------------------------------------------------------ sh


def ring_choice(proxy: Proxy, key: str) -> str:
    """The server a fresh consistent-hash ring over the group's servers gives ``key``:
    the answer computed apart from the proxy's own scheduler."""
    servers = proxy.holder.current.groups["rs1"].servers
    chosen = ConsistentHash().pick(servers, key)
    assert chosen is not None
    return chosen.label


async def test_sh_same_client_address_same_server(make_backend, make_proxy):
    backends = [await make_backend(n) for n in "ABC"]
    name_of = {b.address: b.name for b in backends}
    proxy = await make_proxy(sched_doc(backends, "sh"))
    chosen: dict[str, set[str]] = {}
    for i in range(2, 22):
        source = f"127.0.0.{i}"
        # A new connection per request, each from this source address.
        connector = aiohttp.TCPConnector(local_addr=(source, 0), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as s:
            chosen[source] = {await whoami(s, proxy) for _ in range(3)}
    assert all(len(got) == 1 for got in chosen.values()), chosen
    mapping = {source: got.pop() for source, got in chosen.items()}
    assert mapping == {src: name_of[ring_choice(proxy, src)] for src in mapping}
    assert len(set(mapping.values())) > 1  # hashed, not all on one server


async def test_sh_hashes_the_first_x_forwarded_for_address(make_backend, make_proxy):
    backends = [await make_backend(n) for n in "ABC"]
    name_of = {b.address: b.name for b in backends}
    proxy = await make_proxy(sched_doc(backends, "sh", hash_key="x_forwarded_for"))
    connector = aiohttp.TCPConnector(limit=1)  # one keep-alive connection for everything
    async with aiohttp.ClientSession(connector=connector) as s:
        mapping = {}
        for i in range(30):
            client = f"198.51.100.{i}"
            got = {
                await whoami(s, proxy, {"X-Forwarded-For": xff})
                for xff in (client, f"{client}, 10.0.0.1", f" {client} ,10.0.0.{i}, 10.9.9.9")
            }
            assert len(got) == 1, (client, got)
            mapping[client] = got.pop()
        # Without the header the connection's own address is hashed.
        plain = {await whoami(s, proxy) for _ in range(3)}
    assert mapping == {c: name_of[ring_choice(proxy, c)] for c in mapping}
    assert len(set(mapping.values())) > 1
    assert plain == {name_of[ring_choice(proxy, "127.0.0.1")]}
    assert proxy.registry.listeners["web"].connections_total == 1


async def test_sh_removing_one_of_three_servers_moves_only_its_clients(
    make_backend, make_proxy, session
):
    a, b, c = [await make_backend(n) for n in "ABC"]
    d = sched_doc([a, b, c], "sh", hash_key="x_forwarded_for")
    proxy = await make_proxy(d)
    clients = [f"10.{i // 250}.{i % 250}.7" for i in range(300)]

    async def mapping() -> dict[str, str]:
        return {x: await whoami(session, proxy, {"X-Forwarded-For": x}) for x in clients}

    before = await mapping()
    on_c = {x for x, name in before.items() if name == "C"}
    assert 0 < len(on_c) <= 130  # about a third (the unit tests bound the ratio)

    servers = d["server_groups"]["rs1"]["servers"]
    d["server_groups"]["rs1"]["servers"] = [s for s in servers if s["address"] != c.address]
    await apply(proxy, d)
    after = await mapping()
    moved = {x for x in clients if after[x] != before[x]}
    assert moved == on_c
    assert {after[x] for x in on_c} <= {"A", "B"}

    # C back: every client is where it was at first.
    d["server_groups"]["rs1"]["servers"] = servers
    await apply(proxy, d)
    await wait_for(lambda: server(proxy, c).health.available, what="C to pass its check")
    assert await mapping() == before
