"""DNS service discovery (issue 14) against a real DNS server on loopback whose records the
tests change: A, AAAA, SRV, TTL-paced re-resolution, growth, shrink, failure and hold, a name
missing at start, and what /status and /metrics say about discovered servers. Also: a host
name written under ``servers`` is resolved once per load, and connects use its addresses.

Backends found through A/AAAA records share one port on several loopback addresses
(127.0.0.2, 127.0.0.3, ::1), as a fleet of hosts would; SRV records name their own ports.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.control.app import Proxy
from tests.dns_server import DnsServer
from tests.support import Backend, free_port, proxy_url, wait_for

MakeBackend = Callable[..., Awaitable[Backend]]
MakeProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    server = await DnsServer().start()
    yield server
    server.close()


def discovery_doc(
    dns: DnsServer, discovery: dict[str, Any], servers: list[str] | None = None, **group: Any
) -> dict[str, Any]:
    g: dict[str, Any] = {
        "discovery": {"interval": "1s", "timeout": "300ms", **discovery},
        "health_check": {"interval": "100ms", "timeout": "1s", "path": "/health"},
        **group,
    }
    if servers is not None:
        g["servers"] = servers
    return {
        "listeners": [{"name": "web", "bind": "127.0.0.1:0", "server_group": "rs1"}],
        "server_groups": {"rs1": g},
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
        "resolvers": [dns.address],
    }


def ids(proxy: Proxy) -> set[str]:
    return {s.id for s in proxy.snapshot.groups["rs1"].servers}


def up_ids(proxy: Proxy) -> set[str]:
    return {s.id for s in proxy.snapshot.groups["rs1"].available()}


async def until_servers(proxy: Proxy, expected: set[str], timeout: float = 10.0) -> None:
    """Wait until the group is exactly ``expected`` and every one of them takes traffic."""
    await wait_for(
        lambda: ids(proxy) == expected and up_ids(proxy) == expected,
        timeout,
        f"servers {sorted(expected)} (have {sorted(ids(proxy))})",
    )


async def who(session: aiohttp.ClientSession, proxy: Proxy, n: int = 1) -> list[str]:
    out = []
    for _ in range(n):
        async with session.get(proxy_url(proxy, path="/whoami")) as r:
            out.append(f"{r.status} {await r.text()}" if r.status != 200 else await r.text())
    return out


async def test_a_records_growth_and_shrink_keep_state_like_a_reload(
    dns_server: DnsServer, make_backend: MakeBackend, make_proxy: MakeProxy
) -> None:
    port = free_port()
    b2 = await make_backend("B2", port, host="127.0.0.2")
    b3 = await make_backend("B3", port, host="127.0.0.3")
    dns_server.set("chat.test", "A", ["127.0.0.2"], ttl=1)
    proxy = await make_proxy(discovery_doc(dns_server, {"dns": "chat.test", "port": port}))
    first = f"rs1/127.0.0.2:{port}"
    second = f"rs1/127.0.0.3:{port}"
    await until_servers(proxy, {first})
    s2 = proxy.state.servers[first]
    assert s2.discovered
    async with aiohttp.ClientSession() as session:
        assert await who(session, proxy, 3) == ["B2"] * 3
        # An open WebSocket to the first server, to see it survive the shrink.
        ws = await session.ws_connect(proxy_url(proxy, path="/ws"))
        await ws.send_str("whoami")
        assert (await ws.receive()).data == "B2"

        dns_server.set("chat.test", "A", ["127.0.0.2", "127.0.0.3"], ttl=1)  # growth
        await until_servers(proxy, {first, second})
        assert proxy.state.servers[first] is s2  # the same state: health, counters, pool
        assert s2.health.available
        assert set(await who(session, proxy, 6)) == {"B2", "B3"}

        dns_server.set("chat.test", "A", ["127.0.0.3"], ttl=1)  # shrink
        await until_servers(proxy, {second})
        assert await who(session, proxy, 4) == ["B3"] * 4
        # As on a reload: the tunnel to the removed server goes on.
        await ws.send_str("still there")
        assert (await ws.receive()).data == "still there"
        await ws.close()
    # A discovered change is not a config reload.
    assert proxy.registry.reloads.success == 0 and proxy.registry.reloads.failure == 0
    assert b2.requests and b3.requests
    # Each new set is an event of the history (GET /status/history), not a reload event.
    dns = [e for e in proxy.events.since(0) if e["kind"] == "dns"]
    assert [e["text"] for e in dns][-2:] == [
        f"rs1: DNS found 127.0.0.2:{port}, 127.0.0.3:{port}",
        f"rs1: DNS found 127.0.0.3:{port}",
    ]
    assert all(e["group"] == "rs1" for e in dns)
    assert not [e for e in proxy.events.since(0) if e["kind"] == "reload"]


async def test_new_addresses_are_warmed_and_removed_ones_drain_like_a_reload(
    dns_server: DnsServer, make_backend: MakeBackend, make_proxy: MakeProxy
) -> None:
    """Issue 12's reload path, taken by discovery: an address that appears is checked before
    the swap (up the moment it is in the group, and no 503 in between); one that disappears
    drains: its WebSocket gets 1001 within the group's drain_timeout."""
    port = free_port()
    await make_backend("B2", port, host="127.0.0.2")
    await make_backend("B3", port, host="127.0.0.3")
    dns_server.set("chat.test", "A", ["127.0.0.2"], ttl=1)
    doc = discovery_doc(dns_server, {"dns": "chat.test", "port": port}, drain_timeout="500ms")
    doc["server_groups"]["rs1"]["health_check"]["interval"] = "30s"  # only warm-ups check
    proxy = await make_proxy(doc)
    first, second = f"rs1/127.0.0.2:{port}", f"rs1/127.0.0.3:{port}"
    await until_servers(proxy, {first})
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(proxy_url(proxy, path="/ws"))
        await ws.send_str("whoami")
        assert (await ws.receive()).data == "B2"
        dns_server.set("chat.test", "A", ["127.0.0.3"], ttl=1)  # a full swap
        await wait_for(lambda: ids(proxy) == {second}, 10, "the swap")
        # In the group means checked: the warm-up ran before the swap (the check interval
        # is 30 s, so no loop check can have brought it up).
        assert proxy.state.servers[second].health.available
        assert await who(session, proxy, 3) == ["B3"] * 3
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        await ws.close()
    # Counted as a drain (the removed server's own series went with its last tunnel).
    assert proxy.registry.listener("web").ws_closes["drain"] == 1


async def test_aaaa_records_reach_an_ipv6_backend(
    dns_server: DnsServer, make_backend: MakeBackend, make_proxy: MakeProxy
) -> None:
    port = free_port()
    await make_backend("V6", port, host="::1")
    dns_server.set("chat6.test", "AAAA", ["::1"], ttl=1)
    proxy = await make_proxy(discovery_doc(dns_server, {"dns": "chat6.test", "port": port}))
    await until_servers(proxy, {f"rs1/[::1]:{port}"})
    async with aiohttp.ClientSession() as session:
        assert await who(session, proxy, 2) == ["V6", "V6"]


async def test_srv_records_ports_weights_and_target_lookups(
    dns_server: DnsServer, make_backend: MakeBackend, make_proxy: MakeProxy
) -> None:
    a = await make_backend("A")
    b = await make_backend("B")
    name = "_chat._tcp.service.test"
    dns_server.set(name, "SRV", [f"10 10 {a.port} a.test.", f"10 30 {b.port} b.test."], ttl=1)
    dns_server.set("a.test", "A", ["127.0.0.1"], ttl=1)
    dns_server.set("b.test", "A", ["127.0.0.1"], ttl=1)
    proxy = await make_proxy(discovery_doc(dns_server, {"dns": name}, scheduler="wrr"))
    ida, idb = f"rs1/127.0.0.1:{a.port}", f"rs1/127.0.0.1:{b.port}"
    await until_servers(proxy, {ida, idb})
    assert proxy.state.servers[ida].weight == 33
    assert proxy.state.servers[idb].weight == 100
    # The addresses came in the additional section: no lookup of the targets.
    assert dns_server.count("a.test", "A") == 0
    async with aiohttp.ClientSession() as session:
        got = await who(session, proxy, 8)
    assert got.count("B") == 6 and got.count("A") == 2  # wrr over 33:100

    # Without the additional section, each target is looked up; new weights follow.
    dns_server.additional = False
    dns_server.set(name, "SRV", [f"10 50 {a.port} a.test.", f"10 50 {b.port} b.test."], ttl=1)
    await wait_for(lambda: proxy.state.servers[ida].weight == 100, 10, "new SRV weights")
    assert dns_server.count("a.test", "A") >= 1 and dns_server.count("b.test", "A") >= 1
    # A higher priority value is a backup: left out while the best priority has servers.
    dns_server.set(name, "SRV", [f"5 1 {b.port} b.test.", f"10 50 {a.port} a.test."], ttl=1)
    await until_servers(proxy, {idb})


async def test_ttl_paces_re_resolution_never_more_than_once_a_second(
    dns_server: DnsServer, make_proxy: MakeProxy
) -> None:
    dns_server.set("chat.test", "A", ["127.0.0.2"], ttl=0)  # "ask every time"
    doc = discovery_doc(dns_server, {"dns": "chat.test", "port": 9, "interval": "30s"})
    doc["server_groups"]["rs1"]["health_check"] = {"enabled": False}
    await make_proxy(doc)
    # With a 30 s interval, several lookups within a few seconds come from the TTL...
    await wait_for(lambda: dns_server.count("chat.test", "A") >= 4, 15, "4 lookups")
    times = [t for n, q, t in dns_server.queries if n == "chat.test" and q == "A"]
    # ...and a TTL of 0 still waits a second between lookups (the timer may fire a
    # millisecond early: the loop's clock has millisecond resolution).
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.98, gaps

    dns_server.queries.clear()
    dns_server.set("chat.test", "A", ["127.0.0.2"], ttl=3600)  # a long TTL: the interval wins
    await wait_for(lambda: dns_server.count("chat.test", "A") >= 1, 5, "one more lookup")


async def test_failure_holds_the_last_set_then_empty_answers_empty_the_group(
    dns_server: DnsServer,
    make_backend: MakeBackend,
    make_proxy: MakeProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lbproxy.control.discovery")
    port = free_port()
    await make_backend("B2", port, host="127.0.0.2")
    dns_server.set("chat.test", "A", ["127.0.0.2"], ttl=1)
    proxy = await make_proxy(discovery_doc(dns_server, {"dns": "chat.test", "port": port}))
    sid = f"rs1/127.0.0.2:{port}"
    await until_servers(proxy, {sid})
    lookups = proxy.registry.dns_lookups

    async with aiohttp.ClientSession() as session:
        dns_server.mode = "drop"  # the name server stops answering: timeouts
        await wait_for(lambda: lookups.get(("rs1", "timeout"), 0) >= 3, 15, "3 timeouts")
        dns_server.mode = "servfail"
        await wait_for(lambda: lookups.get(("rs1", "error"), 0) >= 2, 15, "2 errors")
        assert ids(proxy) == {sid}  # held all along
        assert await who(session, proxy, 2) == ["B2", "B2"]
        failed = [r for r in caplog.records if "lookup failed" in r.getMessage()]
        assert len(failed) == 1, [r.getMessage() for r in failed]  # once per outage
        assert failed[0].levelno == logging.WARNING

        dns_server.mode = "answer"
        dns_server.remove("chat.test")  # NXDOMAIN from now on
        await wait_for(lambda: lookups.get(("rs1", "nxdomain"), 0) >= 3, 15, "3 NXDOMAIN")
        assert ids(proxy) == {sid}  # three empty answers: not yet three intervals
        assert await who(session, proxy) == ["B2"]
        await wait_for(lambda: not ids(proxy), 15, "the group to empty")
        assert lookups[("rs1", "nxdomain")] >= 4
        assert any("now empty" in r.getMessage() for r in caplog.records)
        assert (await who(session, proxy))[0].startswith("503")

        dns_server.set("chat.test", "A", ["127.0.0.2"], ttl=1)  # the name is back
        await until_servers(proxy, {sid})
        assert await who(session, proxy) == ["B2"]
    assert any("resolves again" in r.getMessage() for r in caplog.records)
    assert lookups[("rs1", "ok")] >= 2


async def test_a_name_missing_at_start_answers_503_then_fills(
    dns_server: DnsServer, make_backend: MakeBackend, make_proxy: MakeProxy
) -> None:
    port = free_port()
    await make_backend("B3", port, host="127.0.0.3")
    # Not a config error: the group starts empty.
    proxy = await make_proxy(discovery_doc(dns_server, {"dns": "later.test", "port": port}))
    await wait_for(lambda: dns_server.count("later.test", "A") >= 1, 5, "a first lookup")
    async with aiohttp.ClientSession() as session:
        assert (await who(session, proxy))[0].startswith("503")
        dns_server.set("later.test", "A", ["127.0.0.3"], ttl=1)
        await until_servers(proxy, {f"rs1/127.0.0.3:{port}"})
        assert await who(session, proxy) == ["B3"]


async def test_literal_and_discovered_servers_side_by_side_on_status_and_metrics(
    dns_server: DnsServer, make_backend: MakeBackend, make_proxy: MakeProxy
) -> None:
    from lbproxy.control.admin import AdminServer

    port = free_port()
    await make_backend("B2", port, host="127.0.0.2")
    literal = await make_backend("L", port)
    # 127.0.0.1:<port> is written in the file; DNS returns it too: listed once, as written.
    dns_server.set("chat.test", "A", ["127.0.0.1", "127.0.0.2"], ttl=1)
    doc = discovery_doc(dns_server, {"dns": "chat.test", "port": port}, servers=[literal.address])
    proxy = await make_proxy(doc)
    lit, disc = f"rs1/{literal.address}", f"rs1/127.0.0.2:{port}"
    await until_servers(proxy, {lit, disc})
    assert not proxy.state.servers[lit].discovered
    admin = AdminServer(proxy)
    await admin.start()
    try:
        base = f"http://{admin.address}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/status") as r:
                st = await r.json()
            servers = {s["id"]: s for s in st["server_groups"][0]["servers"]}
            assert servers[lit]["discovered"] is False
            assert servers[disc]["discovered"] is True
            assert servers[disc]["state"] == "up"
            async with session.get(f"{base}/") as r:
                page = await r.text()
            assert f"127.0.0.2:{port} (dns)" in page
            async with session.get(f"{base}/metrics") as r:
                text = await r.text()
    finally:
        await admin.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    key = ("lbproxy_backend_discovered", (("server", f"127.0.0.2:{port}"), ("server_group", "rs1")))
    assert samples[key] == 1
    key = ("lbproxy_backend_discovered", (("server", literal.address), ("server_group", "rs1")))
    assert samples[key] == 0
    ok = ("lbproxy_dns_lookups_total", (("result", "ok"), ("server_group", "rs1")))
    assert samples[ok] >= 1


async def test_a_reload_keeps_discovered_servers_and_a_new_name_replaces_them(
    dns_server: DnsServer, make_backend: MakeBackend, make_proxy: MakeProxy, tmp_path: Any
) -> None:
    import yaml

    port = free_port()
    await make_backend("B2", port, host="127.0.0.2")
    await make_backend("B3", port, host="127.0.0.3")
    dns_server.set("one.test", "A", ["127.0.0.2"], ttl=60)
    dns_server.set("two.test", "A", ["127.0.0.3"], ttl=60)
    path = tmp_path / "lb.yaml"
    doc = discovery_doc(dns_server, {"dns": "one.test", "port": port, "interval": "1h"})
    path.write_text(yaml.safe_dump(doc))
    proxy = await make_proxy(doc, str(path))
    await until_servers(proxy, {f"rs1/127.0.0.2:{port}"})
    s2 = proxy.state.servers[f"rs1/127.0.0.2:{port}"]
    # A reload that changes something else keeps the discovered set (no new lookup needed).
    doc["shutdown_timeout"] = "5s"
    path.write_text(yaml.safe_dump(doc))
    result = await proxy.reload("test")
    assert result.ok and result.changed, result
    assert ids(proxy) == {f"rs1/127.0.0.2:{port}"} and proxy.state.servers[s2.id] is s2
    # A reload naming another name: the old name's servers go, the new name's come.
    doc["server_groups"]["rs1"]["discovery"]["dns"] = "two.test"
    path.write_text(yaml.safe_dump(doc))
    assert (await proxy.reload("test")).ok
    await until_servers(proxy, {f"rs1/127.0.0.3:{port}"})


async def test_close_stops_lookups(dns_server: DnsServer, make_proxy: MakeProxy) -> None:
    dns_server.set("chat.test", "A", ["127.0.0.2"], ttl=0)
    doc = discovery_doc(dns_server, {"dns": "chat.test", "port": 9})
    doc["server_groups"]["rs1"]["health_check"] = {"enabled": False}
    proxy = await make_proxy(doc)
    await wait_for(lambda: dns_server.count("chat.test", "A") >= 1, 5, "a lookup")
    await proxy.close(timeout=0.1)
    n = dns_server.count("chat.test", "A")
    await asyncio.sleep(1.5)  # longer than the 1 s pace: a live loop would have asked again
    assert dns_server.count("chat.test", "A") == n


async def test_a_server_name_is_resolved_at_load_and_connects_use_the_addresses(
    make_backend: MakeBackend, make_proxy: MakeProxy
) -> None:
    from lbproxy.config import Address

    a = await make_backend("A")
    b = await make_backend("B")
    doc = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:0", "server_group": "rs1"}],
        "server_groups": {
            "rs1": {"servers": [f"localhost:{a.port}"], "health_check": {"enabled": False}}
        },
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }
    proxy = await make_proxy(doc)
    (server,) = proxy.snapshot.groups["rs1"].servers
    assert server.id == f"rs1/localhost:{a.port}"  # the id and label keep the name
    # Resolved once, through the system's resolver (/etc/hosts: localhost).
    assert Address("127.0.0.1", a.port) in server.connect_to
    assert all(x.host != "localhost" for x in server.connect_to)
    async with aiohttp.ClientSession() as session:
        assert await who(session, proxy, 2) == ["A", "A"]
        # Connects go to the resolved addresses, not to the name: point them at B.
        closed = Address("127.0.0.1", free_port())  # refused: the next address is tried
        server.connect_to = (closed, Address("127.0.0.1", b.port))
        server.pool.close()  # no pooled keep-alive connection to A
        assert await who(session, proxy, 2) == ["B", "B"]
