"""Prometheus /metrics end to end: known traffic through a real proxy, exact values back.

Every test starts a proxy and its ``AdminServer``, drives traffic whose outcome is known
(which server answers, with what status, how many connections and tunnels), then scrapes
/metrics over HTTP and parses it with prometheus-client's own parser. Assertions compare
whole families where possible, so an extra or missing series fails as loudly as a wrong
count.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.config import parse_config
from lbproxy.control.admin import AdminServer
from lbproxy.control.loading import load_config
from tests.support import (
    RawServer,
    config_doc,
    free_port,
    proxy_url,
    raw_request,
    read_request_head,
    wait_for,
)

NO_CHECKS = {"health_check": {"enabled": False}}


class Scrape:
    """One parsed /metrics answer: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            self.types[fam.name] = fam.type
            for s in fam.samples:
                self.samples.setdefault(s.name, []).append((dict(s.labels), s.value))

    def series(self, name: str, *labels: str, **match: str) -> dict[Any, float]:
        """``{label values: value}`` of sample ``name`` (only samples matching ``match``).

        With one label name the keys are plain strings, with several they are tuples."""
        out: dict[Any, float] = {}
        for lbl, value in self.samples.get(name, []):
            if any(lbl.get(k) != v for k, v in match.items()):
                continue
            key = tuple(lbl[k] for k in labels)
            out[key[0] if len(key) == 1 else key] = value
        return out

    def value(self, name: str, **labels: str) -> float | None:
        for lbl, value in self.samples.get(name, []):
            if lbl == labels:
                return value
        return None

    def has_server(self, server: str) -> bool:
        return any(
            lbl.get("server") == server for samples in self.samples.values() for lbl, _ in samples
        )


async def scrape(admin: AdminServer) -> Scrape:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://{admin.address}/metrics") as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        return Scrape(await r.text())


def group(servers: list[dict[str, Any]] | list[str], **extra: Any) -> dict[str, Any]:
    return {"servers": servers, **NO_CHECKS, **extra}


def listener(name: str, group_name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "bind": "127.0.0.1:0", "server_group": group_name, **extra}


def closed_port_address() -> str:
    """An address nothing listens on: connecting is refused."""
    return f"127.0.0.1:{free_port()}"


async def get(url: str) -> tuple[int, str]:
    """One request on its own connection (so connection counts are exact)."""
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s, s.get(url) as r:
        return r.status, await r.text()


async def test_request_counts_by_listener_group_server_and_code(
    make_backend, make_proxy, make_admin
):
    a = await make_backend("A")
    b = await make_backend("B")

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)  # then close without a word: a reset before response

    closer = await RawServer(hang_up).start()
    dead, dead2 = closed_port_address(), closed_port_address()
    doc = config_doc([])
    doc["listeners"] = [
        listener("web", "rs1"),
        listener("dead", "gdead"),
        listener("none", "gnone"),
        listener("slow", "gslow", request_timeout="300ms"),
        listener("retry", "gretry"),
        listener("reset", "greset"),
    ]
    doc["server_groups"] = {
        "rs1": group([a.address, b.address]),
        "gdead": group([dead]),
        "gnone": group([]),
        "gslow": group([a.address]),
        "gretry": group([dead2, b.address]),
        "greset": group([closer.address]),
    }
    try:
        proxy = await make_proxy(doc)
        admin = await make_admin(proxy)

        # rr starts at the first server: A B A B A B A, then the two 404s go to B and A.
        answers = [await get(proxy_url(proxy, "web", "/whoami")) for _ in range(7)]
        assert answers == [(200, n) for n in "ABABABA"]
        answers = [await get(proxy_url(proxy, "web", "/status/404")) for _ in range(2)]
        assert answers == [(404, "B"), (404, "A")]
        assert (await get(proxy_url(proxy, "dead", "/whoami")))[0] == 502
        assert (await get(proxy_url(proxy, "none", "/whoami")))[0] == 503
        assert (await get(proxy_url(proxy, "slow", "/sleep/5")))[0] == 504
        # Each request tries the refused server first, then is retried on B.
        for _ in range(2):
            assert await get(proxy_url(proxy, "retry", "/whoami")) == (200, "B")
        assert (await get(proxy_url(proxy, "reset", "/whoami")))[0] == 502

        await wait_for(
            lambda: all(ls.connections_active == 0 for ls in proxy.registry.listeners.values()),
            what="every client connection to be closed",
        )
        m = await scrape(admin)
    finally:
        await closer.stop()

    A, B = a.address, b.address
    assert m.types["lbproxy_requests"] == "counter"
    assert m.series("lbproxy_requests_total", "listener", "server_group", "server", "code") == {
        ("web", "rs1", A, "200"): 4,
        ("web", "rs1", B, "200"): 3,
        ("web", "rs1", A, "404"): 1,
        ("web", "rs1", B, "404"): 1,
        ("dead", "gdead", dead, "502"): 1,
        ("none", "gnone", "", "503"): 1,
        ("slow", "gslow", A, "504"): 1,
        ("retry", "gretry", B, "200"): 2,
        ("reset", "greset", closer.address, "502"): 1,
    }
    assert m.types["lbproxy_request_duration_seconds"] == "histogram"
    assert m.series("lbproxy_request_duration_seconds_count", "listener", "server_group") == {
        ("web", "rs1"): 9,
        ("dead", "gdead"): 1,
        ("none", "gnone"): 1,
        ("slow", "gslow"): 1,
        ("retry", "gretry"): 2,
        ("reset", "greset"): 1,
    }
    # The 504 waited for the 300 ms request timeout; everything else was fast.
    slow_sum = m.value(
        "lbproxy_request_duration_seconds_sum", listener="slow", server_group="gslow"
    )
    assert slow_sum is not None and 0.29 <= slow_sum < 2
    inf = m.series("lbproxy_request_duration_seconds_bucket", "listener", le="+Inf")
    assert inf == {"web": 9, "dead": 1, "none": 1, "slow": 1, "retry": 2, "reset": 1}
    below = m.series("lbproxy_request_duration_seconds_bucket", "listener", le="0.25")
    assert below["slow"] == 0

    # Time to response headers: only responses that had headers count.
    assert m.series("lbproxy_upstream_response_seconds_count", "server_group", "server") == {
        ("rs1", A): 5,
        ("rs1", B): 4,
        ("gdead", dead): 0,
        ("gslow", A): 0,
        ("gretry", dead2): 0,
        ("gretry", B): 2,
        ("greset", closer.address): 0,
    }
    # Every server has a series per kind; only the failures seen are non-zero.
    errors = {
        (g, srv, kind): 0
        for g, srv in [
            ("rs1", A),
            ("rs1", B),
            ("gdead", dead),
            ("gslow", A),
            ("gretry", dead2),
            ("gretry", B),
            ("greset", closer.address),
        ]
        for kind in ("connect", "timeout", "reset", "protocol")
    }
    errors[("gdead", dead, "connect")] = 1
    errors[("gslow", A, "timeout")] = 1
    errors[("gretry", dead2, "connect")] = 2
    errors[("greset", closer.address, "reset")] = 1
    assert m.series("lbproxy_upstream_errors_total", "server_group", "server", "kind") == errors
    assert m.series("lbproxy_retries_total", "server_group") == {"gretry": 2}
    assert m.series("lbproxy_connections_total", "listener") == {
        "web": 9,
        "dead": 1,
        "none": 1,
        "slow": 1,
        "retry": 2,
        "reset": 1,
    }
    assert m.types["lbproxy_connections_active"] == "gauge"
    assert set(m.series("lbproxy_connections_active", "listener").values()) == {0}

    # An open client connection is active until it closes.
    host, port = str(proxy.listeners.address("web").host), proxy.listeners.address("web").port
    _, writer = await asyncio.open_connection(host, port)
    try:
        await wait_for(lambda: proxy.registry.listener("web").connections_active == 1)
        m = await scrape(admin)
        assert m.value("lbproxy_connections_active", listener="web") == 1
        assert m.value("lbproxy_connections_total", listener="web") == 10
    finally:
        writer.close()
    await wait_for(lambda: proxy.registry.listener("web").connections_active == 0)
    assert (await scrape(admin)).value("lbproxy_connections_active", listener="web") == 0


async def test_bytes_exact_for_a_raw_request_and_growing_for_an_open_tunnel(
    make_backend, make_proxy, make_admin
):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], group=NO_CHECKS))
    admin = await make_admin(proxy)
    addr = proxy.listeners.address("web")
    request = b"GET /whoami HTTP/1.1\r\nHost: lb.test\r\nConnection: close\r\n\r\n"
    response = await raw_request(addr.host, addr.port, request)
    assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"A")
    await wait_for(lambda: proxy.registry.listener("web").connections_active == 0)
    m = await scrape(admin)
    assert m.series("lbproxy_bytes_total", "direction", listener="web") == {
        "in": len(request),
        "out": len(response),
    }

    async with aiohttp.ClientSession() as s, s.ws_connect(proxy_url(proxy, path="/ws")) as ws:
        before = (await scrape(admin)).series("lbproxy_bytes_total", "direction")
        for _ in range(3):
            await ws.send_bytes(b"x" * 1000)
            assert await ws.receive_bytes() == b"x" * 1000
        during = (await scrape(admin)).series("lbproxy_bytes_total", "direction")
        assert proxy.registry.listener("web").connections_active == 1  # still open
        # Three 1000-byte frames each way: payload plus client masking / frame headers.
        assert 3000 < during["in"] - before["in"] < 3100
        assert 3000 < during["out"] - before["out"] < 3100
    await wait_for(lambda: proxy.registry.listener("web").connections_active == 0)
    after = (await scrape(admin)).series("lbproxy_bytes_total", "direction")
    assert after["in"] > during["in"] and after["out"] > during["out"]  # the close frames


async def test_websocket_counts_durations_and_close_reasons(make_backend, make_proxy, make_admin):
    a = await make_backend("A")
    doc = config_doc([a.address], group=NO_CHECKS)
    doc["listeners"].append(listener("idle", "rs1", idle_timeout="300ms"))
    proxy = await make_proxy(doc)
    admin = await make_admin(proxy)
    A = a.address
    web = proxy.registry.listener("web")
    async with aiohttp.ClientSession() as s:
        ws = [await s.ws_connect(proxy_url(proxy, path="/ws")) for _ in range(3)]
        for w in ws:
            await w.send_str("ping")
            assert await w.receive_str() == "ping"
        m = await scrape(admin)
        assert m.types["lbproxy_websockets_active"] == "gauge"
        assert m.series("lbproxy_websockets_active", "listener", "server_group", "server") == {
            ("web", "rs1", A): 3
        }
        assert m.series("lbproxy_websockets_total", "listener", "server_group", "server") == {
            ("web", "rs1", A): 3
        }
        # The 101s are requests too.
        assert (
            m.value(
                "lbproxy_requests_total", listener="web", server_group="rs1", server=A, code="101"
            )
            == 3
        )

        await ws[0].close()  # the client closes
        await wait_for(lambda: web.ws_closes["client"] == 1, what="a client close")
        await ws[1].send_str("close:1000")  # the backend closes
        msg = await ws[1].receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1000
        await ws[1].close()
        await wait_for(lambda: web.ws_closes["server"] == 1, what="a server close")

        idle = await s.ws_connect(proxy_url(proxy, "idle", "/ws"))
        await wait_for(
            lambda: proxy.registry.listener("idle").ws_closes["idle_timeout"] == 1,
            what="the idle tunnel to time out",
        )
        assert (await idle.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

        m = await scrape(admin)
        assert m.series("lbproxy_websockets_active", "listener", "server") == {
            ("web", A): 1,
            ("idle", A): 0,
        }
        assert m.series("lbproxy_websockets_total", "listener", "server") == {
            ("web", A): 3,
            ("idle", A): 1,
        }
        await proxy.close(timeout=0.1)  # the third tunnel is closed by the shutdown
        last = await ws[2].receive()
        assert (last.type, last.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        await ws[2].close()
    m = await scrape(admin)
    reasons = (
        "client",
        "server",
        "idle_timeout",
        "shutdown",
        "drain",
        "rebalance",
        "policy",
        "error",
    )
    # Data messages each way: three pings and the "close:1000" order in, three echoes out.
    assert m.series("lbproxy_websocket_messages_total", "listener", "direction") == {
        ("web", "in"): 4,
        ("web", "out"): 3,
        ("idle", "in"): 0,
        ("idle", "out"): 0,
    }
    # Every close frame that passed, by sender: the client's close and the server's echo of
    # it, the server's close and the client's echo, and the proxy's own 1001 at shutdown
    # (the client's answer to it stops at the proxy). The idle timeout closes without frames.
    assert m.series("lbproxy_websocket_close_codes_total", "listener", "side", "code") == {
        ("web", "client", "1000"): 2,
        ("web", "server", "1000"): 2,
        ("web", "proxy", "1001"): 1,
    }
    assert m.series("lbproxy_websocket_closes_total", "listener", "reason") == {
        **{("web", r): 0 for r in reasons},
        **{("idle", r): 0 for r in reasons},
        ("web", "client"): 1,
        ("web", "server"): 1,
        ("web", "shutdown"): 1,
        ("idle", "idle_timeout"): 1,
    }
    assert m.types["lbproxy_websocket_duration_seconds"] == "histogram"
    assert m.series("lbproxy_websocket_duration_seconds_count", "listener", "server_group") == {
        ("web", "rs1"): 3,
        ("idle", "rs1"): 1,
    }
    idle_sum = m.value(
        "lbproxy_websocket_duration_seconds_sum", listener="idle", server_group="rs1"
    )
    assert idle_sum is not None and 0.29 <= idle_sum < 2
    assert m.series("lbproxy_websockets_active", "listener") == {"web": 0, "idle": 0}
    assert m.series("lbproxy_connections_active", "listener") == {"web": 0, "idle": 0}


async def test_backend_up_and_health_check_counts(make_backend, make_proxy, make_admin):
    a = await make_backend("A")
    b = await make_backend("B")
    doc = config_doc(
        [a.address, b.address],
        group={"health_check": {"interval": "100ms", "path": "/health", "unhealthy_threshold": 1}},
    )
    proxy = await make_proxy(doc)
    admin = await make_admin(proxy)
    m = await scrape(admin)
    assert m.series("lbproxy_backend_up", "server_group", "server") == {
        ("rs1", a.address): 1,
        ("rs1", b.address): 1,
    }
    await b.stop()

    async def b_down() -> bool:
        return (await scrape(admin)).value(
            "lbproxy_backend_up", server_group="rs1", server=b.address
        ) == 0

    await wait_for(b_down, what="backend_up of the stopped backend to drop to 0")
    await proxy.checker.close()  # freeze the counts to compare them with what the backends saw
    m = await scrape(admin)
    assert m.series("lbproxy_backend_up", "server") == {a.address: 1, b.address: 0}
    checks = m.series("lbproxy_health_checks_total", "server", "result")
    a_seen = sum(1 for _, path, _ in a.requests if path == "/health")
    b_seen = sum(1 for _, path, _ in b.requests if path == "/health")
    assert a_seen >= 2 and b_seen >= 1
    # A check the backend had answered when the checker closed may not be counted (cancelled
    # before its result was recorded): at most one per server, never more than were seen.
    assert a_seen - 1 <= checks[(a.address, "success")] <= a_seen
    assert checks[(a.address, "failure")] == 0
    assert b_seen - 1 <= checks[(b.address, "success")] <= b_seen
    assert checks[(b.address, "failure")] >= 1
    assert len(checks) == 4


async def test_reload_counts_result_and_timestamp(tmp_path, make_backend, make_proxy, make_admin):
    a = await make_backend("A")
    b = await make_backend("B")
    path = tmp_path / "lbproxy.yaml"
    path.write_text(yaml.safe_dump(config_doc([a.address], group=NO_CHECKS)))
    proxy = await make_proxy(load_config(str(path)), str(path))
    admin = await make_admin(proxy)
    m = await scrape(admin)
    assert m.series("lbproxy_config_reloads_total", "result") == {"success": 0, "failure": 0}
    assert m.value("lbproxy_config_last_reload_success") == 1

    path.write_text(yaml.safe_dump(config_doc([a.address, b.address], group=NO_CHECKS)))
    t0 = time.time()
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://{admin.address}/-/reload", json={}) as r:
            assert r.status == 200
        t1 = time.time()
        m = await scrape(admin)
        assert m.series("lbproxy_config_reloads_total", "result") == {"success": 1, "failure": 0}
        assert m.value("lbproxy_config_last_reload_success") == 1
        ts = m.value("lbproxy_config_last_reload_timestamp_seconds")
        assert ts is not None and t0 <= ts <= t1

        path.write_text("listeners: [oops\n")
        async with s.post(f"http://{admin.address}/-/reload", json={}) as r:
            assert r.status == 400
        t2 = time.time()
    m = await scrape(admin)
    assert m.types["lbproxy_config_reloads"] == "counter"
    assert m.series("lbproxy_config_reloads_total", "result") == {"success": 1, "failure": 1}
    assert m.types["lbproxy_config_last_reload_success"] == "gauge"
    assert m.value("lbproxy_config_last_reload_success") == 0
    ts2 = m.value("lbproxy_config_last_reload_timestamp_seconds")
    assert ts2 is not None and t1 <= ts2 <= t2
    # The failed reload changed nothing: both servers are still served.
    assert set(m.series("lbproxy_backend_up", "server")) == {a.address, b.address}


async def test_removed_server_series_go_with_its_last_connection(
    tmp_path, make_backend, make_proxy, make_admin
):
    a = await make_backend("A")
    b = await make_backend("B")
    group_doc = {**NO_CHECKS, "keepalive_timeout": "200ms"}
    proxy = await make_proxy(config_doc([a.address, b.address], group=group_doc))
    admin = await make_admin(proxy)
    async with aiohttp.ClientSession() as s:
        assert await get(proxy_url(proxy, path="/whoami")) == (200, "A")
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"))  # the next pick: B
        await ws.send_str("whoami")
        assert await ws.receive_str() == "B"
        assert await get(proxy_url(proxy, path="/whoami")) == (200, "A")
        m = await scrape(admin)
        assert m.has_server(b.address)

        a_state = proxy.state.servers[f"rs1/{a.address}"]
        assert len(a_state.pool.idle) == 1  # expired by the sweep once keepalive_timeout passes
        result = await proxy.apply_config(
            parse_config(config_doc([a.address], group=group_doc)), "test"
        )
        assert result.ok and result.changed
        # B is gone from the config but its tunnel is open: its series stay, sweep or not.
        await wait_for(lambda: not a_state.pool.idle, what="a sweep after the reload")
        m = await scrape(admin)
        assert m.series("lbproxy_websockets_active", "server") == {b.address: 1}
        assert (
            m.value(
                "lbproxy_requests_total",
                listener="web",
                server_group="rs1",
                server=b.address,
                code="101",
            )
            == 1
        )
        await ws.send_str("still here")
        assert await ws.receive_str() == "still here"
        await ws.close()

    async def b_forgotten() -> bool:
        return not (await scrape(admin)).has_server(b.address)

    await wait_for(b_forgotten, what="the removed server's series to go")
    m = await scrape(admin)
    assert m.series("lbproxy_requests_total", "server", "code") == {
        (a.address, "200"): 2,
    }
    assert m.series("lbproxy_upstream_response_seconds_count", "server") == {a.address: 2}
    # The listener's own counters keep what the removed server did.
    assert m.series("lbproxy_websocket_closes_total", "reason", listener="web")["client"] == 1
    assert m.series("lbproxy_websocket_duration_seconds_count", "listener") == {"web": 1}


async def test_admin_is_not_on_the_proxied_listener(make_backend, make_proxy, make_admin):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], group=NO_CHECKS))
    admin = await make_admin(proxy)
    status, body = await get(proxy_url(proxy, path="/metrics"))
    assert status == 404 and "lbproxy_" not in body
    assert [p for _, p, _ in a.requests] == ["/metrics"]
    status, body = await get(proxy_url(proxy, path="/healthz"))
    assert status == 404
    status, body = await get(f"http://{admin.address}/healthz")
    assert status == 200
    status, body = await get(f"http://{admin.address}/metrics")
    assert status == 200 and "lbproxy_requests_total" in body
