"""Per-client limits through a live proxy (issue 16), with real clients on several loopback
addresses and real backends:

- ``connections_per_client``: past it a new connection from that address is closed at once,
  before anything is read, and counted (``lbproxy_connections_refused_total{reason=
  "connections_per_client"}``); a WebSocket tunnel counts until it closes; another address
  is served meanwhile.
- ``requests_per_second``/``burst``: exactly ``burst`` requests pass, the next ones get 429
  with ``Retry-After`` and never reach a backend; WebSocket upgrades count; another client
  is unaffected.
- ``trusted_proxies``: behind one, the client is the X-Forwarded-For address the proxy
  appended, and a client cannot escape by inventing hops.
- The per-client table stays within ``table_size`` under 100,000 distinct addresses (sent as
  X-Forwarded-For behind a trusted proxy), while a regular client keeps being served.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from tests.hardening import closed_without_answer, metric
from tests.support import config_doc, read_response, wait_for


async def connect(proxy, source: str):
    a = proxy.listeners.address("web")
    return await asyncio.open_connection(a.host, a.port, local_addr=(source, 0))


async def get(proxy, source: str, path: str = "/whoami", extra: str = "", close: bool = True):
    reader, writer = await connect(proxy, source)
    conn = "Connection: close\r\n" if close else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: chat.test\r\n{conn}{extra}\r\n".encode())
    resp = await read_response(reader)
    writer.close()
    return resp


async def keep_alive(reader, writer) -> int:
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: chat.test\r\n\r\n")
    return (await read_response(reader)).status


def refused(proxy) -> float | None:
    return metric(
        proxy.registry,
        "lbproxy_connections_refused_total",
        listener="web",
        reason="connections_per_client",
    )


# ------------------------------------------------------------------------------ connections


async def test_connections_per_client(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(
        config_doc([a.address], listener={"limits": {"connections_per_client": 2}})
    )
    stats = proxy.registry.listeners["web"]
    url = f"http://{proxy.listeners.address('web')}/ws"
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.1", 0))
    async with aiohttp.ClientSession(connector=connector) as s:
        ws = await s.ws_connect(url)  # one WebSocket tunnel ...
        r1, w1 = await connect(proxy, "127.0.0.1")  # ... and one keep-alive connection
        assert await keep_alive(r1, w1) == 200

        r3, w3 = await connect(proxy, "127.0.0.1")  # the third: closed at once
        w3.write(b"GET /never HTTP/1.1\r\nHost: chat.test\r\n\r\n")
        assert await closed_without_answer(r3)
        w3.close()
        assert refused(proxy) == 1
        assert stats.connections_refused["connections_per_client"] == 1
        assert "/never" not in [p for _, p, _ in a.requests]

        # another address is served meanwhile, with connections of its own
        others = [await connect(proxy, "127.0.0.2") for _ in range(2)]
        for r, w in others:
            assert await keep_alive(r, w) == 200

        # the open ones go on
        await ws.send_str("still")
        assert (await ws.receive()).data == "still"
        assert await keep_alive(r1, w1) == 200

        # the tunnel's close gives its slot back
        await ws.close()
        await wait_for(
            lambda: proxy.ctx.edges.of("web").connections.open.get("127.0.0.1") == 1,
            what="the closed tunnel's slot to be given back",
        )
    r3, w3 = await connect(proxy, "127.0.0.1")
    assert await keep_alive(r3, w3) == 200
    r4, w4 = await connect(proxy, "127.0.0.1")
    assert await closed_without_answer(r4)
    assert refused(proxy) == 2
    for w in (w1, w3, w4, *(w for _, w in others)):
        w.close()
    await wait_for(
        lambda: proxy.ctx.edges.of("web").connections.open == {},
        what="every slot to be given back",
    )


# ------------------------------------------------------------------------------ request rate


async def test_request_rate_exact_counts_and_retry_after(make_backend, make_proxy):
    a = await make_backend("A")
    limits = {"requests_per_second": 0.01, "burst": 5}  # a token every 100 s
    proxy = await make_proxy(config_doc([a.address], listener={"limits": limits}))
    before = len(a.requests)
    answers = [await get(proxy, "127.0.0.1", f"/whoami?n={i}") for i in range(8)]
    assert [r.status for r in answers] == [200] * 5 + [429] * 3
    for r in answers[5:]:
        # The bucket is ~0 tokens short of one: 100 s, or 99 if the machine stalled a second.
        assert r.header("Retry-After") in ("100", "99")
        assert r.header("Connection") == "close"
        assert b"429 Too Many Requests" in r.body
    assert len(a.requests) - before == 5  # a refused request never reaches a backend
    assert metric(proxy.registry, "lbproxy_requests_total", listener="web", server_group="rs1",
                  server="", code="429") == 3  # fmt: skip

    # a well-behaved client on another address is unaffected
    assert [(await get(proxy, "127.0.0.2")).status for _ in range(5)] == [200] * 5


async def test_websocket_upgrades_count_as_requests(make_backend, make_proxy):
    a = await make_backend("A")
    limits = {"requests_per_second": 0.01, "burst": 2}
    proxy = await make_proxy(config_doc([a.address], listener={"limits": limits}))
    url = f"http://{proxy.listeners.address('web')}"
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/whoami") as resp:
            assert resp.status == 200
        ws = await s.ws_connect(f"{url}/ws")
        with pytest.raises(aiohttp.WSServerHandshakeError) as err:
            await s.ws_connect(f"{url}/ws")
        assert err.value.status == 429
        assert err.value.headers is not None and err.value.headers["Retry-After"] in ("100", "99")
        await ws.send_str("open one unaffected")
        assert (await ws.receive()).data == "open one unaffected"
        await ws.close()


async def test_behind_a_trusted_proxy_the_forwarded_client_is_limited(make_backend, make_proxy):
    a = await make_backend("A")
    listener = {
        "limits": {"requests_per_second": 0.01, "burst": 1, "connections_per_client": 1},
        "trusted_proxies": ["127.0.0.2/32"],
    }
    proxy = await make_proxy(config_doc([a.address], listener=listener))
    # A trusted proxy's connections carry many clients: not counted per connection.
    held = [await connect(proxy, "127.0.0.2") for _ in range(3)]
    for i, (r, w) in enumerate(held):
        w.write(b"GET /whoami HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 203.0.113.%d\r\n\r\n" % i)
        assert (await read_response(r)).status == 200
    assert refused(proxy) == 0
    for _, w in held:
        w.close()

    async def via_proxy(xff: str) -> int:
        return (await get(proxy, "127.0.0.2", extra=f"X-Forwarded-For: {xff}\r\n")).status

    assert await via_proxy("198.51.100.1") == 200
    assert await via_proxy("198.51.100.1") == 429
    assert await via_proxy("6.6.6.6, 198.51.100.1") == 429  # an invented hop changes nothing
    assert await via_proxy("198.51.100.2") == 200  # another client behind the same proxy
    # from an untrusted peer, X-Forwarded-For is not believed: the peer is the client
    untrusted = await get(proxy, "127.0.0.3", extra="X-Forwarded-For: 198.51.100.3\r\n")
    assert untrusted.status == 200
    again = await get(proxy, "127.0.0.3", extra="X-Forwarded-For: 198.51.100.4\r\n")
    assert again.status == 429
    # and its connections are counted
    open_ = proxy.ctx.edges.of("web").connections.open
    await wait_for(lambda: "127.0.0.3" not in open_, what="the closed ones to be given back")
    r, w = await connect(proxy, "127.0.0.3")
    assert await keep_alive(r, w) == 429  # admitted (its rate is spent)
    r2, w2 = await connect(proxy, "127.0.0.3")
    assert await closed_without_answer(r2)
    assert refused(proxy) == 1
    w.close()
    w2.close()


# ------------------------------------------------------------------------------ the table bound

FLOOD = 100_000
BATCH = 500  # pipelined requests per write
FLOODERS = 4  # connections flooding at once
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


async def test_table_bounded_under_100000_addresses_regular_client_served(make_proxy):
    answered = 0

    class Fast(asyncio.Protocol):
        """Answers at once, so the flood costs the proxy, not the backend."""

        def connection_made(self, transport):
            self.transport = transport

        def data_received(self, data):
            nonlocal answered
            n = data.count(b"\r\n\r\n")
            answered += n
            self.transport.write(NO_CONTENT * n)

    server = await asyncio.get_running_loop().create_server(Fast, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    size = 1000
    listener = {
        "limits": {"requests_per_second": 100, "burst": 100, "table_size": size},
        "trusted_proxies": ["127.0.0.0/8"],  # every flood request names another client
        "x_forwarded_for": False,
    }
    doc = config_doc([f"127.0.0.1:{port}"], listener=listener)
    doc["server_groups"]["rs1"]["health_check"] = {"enabled": False}
    proxy = await make_proxy(doc)
    table = proxy.ctx.edges.of("web").rates
    largest = 0

    async def flood(first: int, count: int) -> None:
        """``count`` requests, each from another client, pipelined BATCH at a time."""
        nonlocal largest
        reader, writer = await connect(proxy, "127.0.0.1")
        for start in range(first, first + count, BATCH):
            writer.write(
                b"".join(
                    b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.%d.%d.%d\r\n\r\n"
                    % (i >> 16 & 255, i >> 8 & 255, i & 255)
                    for i in range(start, start + BATCH)
                )
            )
            want = len(NO_CONTENT) * BATCH
            got = bytearray()
            while len(got) < want:
                got += await reader.read(want - len(got))
            assert got == NO_CONTENT * BATCH
            largest = max(largest, len(table))
        writer.close()

    async def regular() -> int:
        """A client behind the same proxy, well within its rate: served throughout, and
        remembered throughout (recently seen)."""
        served = 0
        mine = None
        while not flooders.done():
            r = await get(proxy, "127.0.0.2", "/", extra="X-Forwarded-For: 192.0.2.1\r\n")
            assert r.status == 204
            mine = mine or table.buckets["192.0.2.1"]
            assert table.buckets["192.0.2.1"] is mine  # never forgotten meanwhile
            served += 1
            await asyncio.sleep(0.02)
        return served

    t0 = time.perf_counter()
    part = FLOOD // FLOODERS
    flooders = asyncio.gather(*(flood(k * part, part) for k in range(FLOODERS)))
    served = await regular()
    await flooders
    elapsed = time.perf_counter() - t0
    server.close()
    print(f"{FLOOD} flood requests in {elapsed:.1f}s")
    assert largest == size == len(table)
    assert table.evicted == FLOOD + 1 - size  # every distinct client but the last 1,000
    assert served > 10
    assert answered == FLOOD + served


# ------------------------------------------------------------------------------ reloads


async def test_a_reload_keeps_each_clients_state_and_applies_new_numbers(make_backend, make_proxy):
    from lbproxy.config import parse_config

    a = await make_backend("A")

    def with_limits(limits: dict | None) -> dict:
        return config_doc([a.address], listener={"limits": limits} if limits else {})

    proxy = await make_proxy(
        with_limits({"requests_per_second": 0.01, "burst": 2, "connections_per_client": 2})
    )
    early_r, early_w = await connect(proxy, "127.0.0.1")  # opened before the reload
    assert await keep_alive(early_r, early_w) == 200
    assert (await get(proxy, "127.0.0.1")).status == 200
    assert (await get(proxy, "127.0.0.1")).status == 429  # the bucket is empty

    new = {"requests_per_second": 0.01, "burst": 5, "connections_per_client": 1}
    assert (await proxy.apply_config(parse_config(with_limits(new)), "test")).ok
    # The connection opened before the reload still counts: with the new limit of 1, full.
    r, w = await connect(proxy, "127.0.0.1")
    assert await closed_without_answer(r)
    w.close()
    assert refused(proxy) == 1
    # It goes on under the new numbers, and its client's bucket was not forgotten (a fresh
    # one would hold 5 tokens).
    assert await keep_alive(early_r, early_w) == 429
    await wait_for(lambda: proxy.ctx.edges.of("web").connections.open == {}, what="release")
    assert (await get(proxy, "127.0.0.1")).status == 429  # admitted now; its rate spent
    assert (await get(proxy, "127.0.0.2")).status == 200  # another client: burst 5
    assert (await proxy.apply_config(parse_config(with_limits(None)), "test")).ok
    assert (await get(proxy, "127.0.0.1")).status == 200  # limits gone
