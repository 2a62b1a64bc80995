"""What a client gets when things go wrong, and the idle timeouts, through a live proxy.

Each failure answers with the proxy's own short text/plain response — 502 for a refused or
reset backend, 503 (with Retry-After) when no server is available, 504 when no response head
comes within request_timeout, 400 for a malformed request — and the same listener goes on
serving normal clients afterwards. Idle connections, HTTP keep-alive and WebSocket alike,
are closed after idle_timeout and not before, while traffic keeps them open.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import WSMsgType

from lbproxy.config import parse_config
from tests.support import (
    RawResponse,
    RawServer,
    at_eof,
    config_doc,
    free_port,
    open_proxy,
    proxy_url,
    raw_request,
    read_request_head,
    read_response,
    wait_for,
)

NO_CHECKS = {"health_check": {"enabled": False}}
FAST_CHECKS = {
    "health_check": {
        "interval": "100ms",
        "timeout": "1s",
        "path": "/health",
        "healthy_threshold": 1,
        "unhealthy_threshold": 1,
    }
}
REASONS = {
    400: "Bad Request",
    408: "Request Timeout",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def assert_proxy_error(resp: RawResponse, status: int) -> None:
    """The proxy's own answer: the status, a one-line text body, and the connection closing."""
    assert resp.status == status, resp
    assert resp.head.startswith(f"HTTP/1.1 {status} {REASONS[status]}\r\n".encode())
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"
    assert resp.header("Connection") == "close"
    assert resp.body.startswith(f"{status} {REASONS[status]}".encode())
    assert resp.body.endswith(b"\n") and resp.body.count(b"\n") == 1
    assert len(resp.body) < 200
    assert int(resp.header("Content-Length") or -1) == len(resp.body)


async def request(proxy, data: bytes = b"", path: str = "/whoami") -> RawResponse:
    """One request on a fresh connection; the answer must end with the connection closed."""
    a = proxy.listeners.address("web")
    data = data or f"GET {path} HTTP/1.1\r\nHost: proxy.test\r\nConnection: close\r\n\r\n".encode()
    raw = await raw_request(a.host, a.port, data)
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    resp = await read_response(reader)
    assert await at_eof(reader)
    return resp


async def assert_serves(proxy, body: bytes = b"A") -> None:
    resp = await request(proxy)
    assert (resp.status, resp.body) == (200, body)


# ------------------------------------------------------------------ 502


async def test_refused_backend_gives_502_then_serves(make_backend, make_proxy):
    port = free_port()  # nothing listens here (yet)
    proxy = await make_proxy(config_doc([f"127.0.0.1:{port}"], group=NO_CHECKS))
    for _ in range(2):
        resp = await request(proxy)
        assert_proxy_error(resp, 502)
        assert b"refused" in resp.body
    await make_backend("A", port)
    await assert_serves(proxy)


@pytest.mark.parametrize("how", ["close", "reset", "after-head"])
async def test_backend_closing_before_response_gives_502_then_serves(make_proxy, how):
    failing = [True]

    async def backend(reader, writer):
        while True:
            if failing[0]:
                if how == "after-head":
                    await read_request_head(reader)
                if how == "reset":
                    writer.transport.abort()
                else:
                    writer.close()
                return
            await read_request_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
            await writer.drain()

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        resp = await request(proxy)
        assert_proxy_error(resp, 502)
        assert srv.accepted == 1  # one server, tried once: nowhere else to retry
        failing[0] = False
        await assert_serves(proxy)


async def test_invalid_response_head_gives_502(make_proxy):
    async def backend(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 OK-ish\r\n\r\n")
        await writer.drain()

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        assert_proxy_error(await request(proxy), 502)


# ------------------------------------------------------------------ 503


async def test_all_servers_down_gives_503_then_serves_again(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], group=FAST_CHECKS))
    [server] = proxy.snapshot.groups["rs1"].servers
    await assert_serves(proxy)
    port = a.port
    await a.stop()
    await wait_for(lambda: not server.health.available, what="the checker to mark A down")
    resp = await request(proxy)
    assert_proxy_error(resp, 503)
    assert resp.header("Retry-After") == "1"
    await make_backend("A", port)
    await wait_for(lambda: server.health.available, what="the checker to mark A up")
    await assert_serves(proxy)


async def test_group_without_servers_gives_503(make_backend, make_proxy):
    proxy = await make_proxy(config_doc([]))
    for _ in range(2):  # the listener keeps accepting and answering
        resp = await request(proxy)
        assert_proxy_error(resp, 503)
        assert resp.header("Retry-After") == "1"
    a = await make_backend("A")
    result = await proxy.apply_config(parse_config(config_doc([a.address])), "test")
    assert result.ok
    [server] = proxy.snapshot.groups["rs1"].servers
    await wait_for(lambda: server.health.available, what="the new server to come up")
    await assert_serves(proxy)


# ------------------------------------------------------------------ 504


async def test_no_response_head_within_request_timeout_gives_504(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], listener={"request_timeout": "300ms"}))
    t0 = time.monotonic()
    resp = await request(proxy, path="/sleep/10")
    elapsed = time.monotonic() - t0
    assert_proxy_error(resp, 504)  # cut by the timeout, not answered by the backend at 10 s
    assert MIN_IDLE <= elapsed < MAX_WAIT, elapsed
    await assert_serves(proxy)
    # A response head that comes in time is not cut by the same timeout.
    assert (await request(proxy, path="/sleep/0.1")).body == b"A slept"


async def test_request_timeout_counts_from_the_end_of_the_body(make_proxy):
    """A slow upload is not a slow server: the 504 clock starts once the body is sent."""
    answer = [True]

    async def backend(reader, writer):
        while True:
            _, fields = await read_request_head(reader)
            length = int(dict((k.lower(), v) for k, v in fields)["content-length"])
            await reader.readexactly(length)
            if not answer[0]:
                await reader.read()  # never answers
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    async with RawServer(backend) as srv:
        doc = config_doc([srv.address], listener={"request_timeout": "300ms"}, group=NO_CHECKS)
        proxy = await make_proxy(doc)
        for answers in (True, False):
            answer[0] = answers
            reader, writer = await open_proxy(proxy)
            writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 8\r\n\r\n")
            for _ in range(8):  # 8 bytes over ~1.2 s: four times the request timeout
                await asyncio.sleep(0.15)
                writer.write(b"x")
                await writer.drain()
            t_sent = time.monotonic()
            resp = await asyncio.wait_for(read_response(reader), 15)
            elapsed = time.monotonic() - t_sent
            writer.close()
            if answers:
                assert (resp.status, resp.body) == (200, b"ok")
            else:
                assert_proxy_error(resp, 504)
                assert MIN_IDLE <= elapsed < MAX_WAIT, elapsed


async def test_stalled_request_body_gets_408(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], listener={"idle_timeout": "300ms"}))
    reader, writer = await open_proxy(proxy)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly this")
    t0 = time.monotonic()
    resp = await asyncio.wait_for(read_response(reader), 15)
    elapsed = time.monotonic() - t0
    writer.close()
    assert resp.status == 408
    assert resp.body.startswith(b"408 Request Timeout")
    assert MIN_IDLE <= elapsed < MAX_WAIT, elapsed
    await assert_serves(proxy)


# ------------------------------------------------------------------ 400


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: v\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS to a plain listener
    ],
    ids=[
        "garbage",
        "no-version",
        "extra-token",
        "no-colon",
        "space-in-name",
        "bad-length",
        "nul",
        "tls",
    ],
)
async def test_malformed_request_gives_400_and_close(make_backend, make_proxy, data):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    assert_proxy_error(await request(proxy, data), 400)
    assert [r for r in a.requests if r[1] != "/health"] == []  # nothing reached the backend
    await assert_serves(proxy)


async def test_client_closing_mid_head_gets_400_at_once(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))  # default idle timeout: 60 s
    reader, writer = await open_proxy(proxy)
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n")  # no final CRLF
    writer.write_eof()
    resp = await asyncio.wait_for(read_response(reader), 15)  # at once, not at the 60 s
    assert_proxy_error(resp, 400)
    assert await at_eof(reader, timeout=15)
    writer.close()
    await assert_serves(proxy)


async def test_malformed_second_request_on_keepalive_connection(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader)).body == b"A"
    writer.write(b"NOT HTTP AT ALL\r\n\r\n")
    resp = await read_response(reader)
    assert_proxy_error(resp, 400)
    assert await at_eof(reader)
    writer.close()
    await assert_serves(proxy)


# ------------------------------------------------------------------ idle timeouts

IDLE = {"idle_timeout": "300ms"}
# The event loop reads its clock once per iteration, so a timer may fire a few ms "early"
# by a clock read elsewhere; the lower bounds allow for that and nothing more.
MIN_IDLE = 0.3 - 0.02
# The upper bound of a 300 ms timeout is only a hang guard: on a loaded machine the close is
# seen late (what cut the connection is proved by the status, the reason or the counter).
MAX_WAIT = 0.3 + 5
# The "stays open" tests: traffic every 100 ms against a 600 ms timeout, so that a loaded
# machine's delays (tens of ms) cannot make a gap look idle; three timeouts long.
BUSY_IDLE = {"idle_timeout": "600ms"}
BUSY_FOR = 3 * 0.6


async def test_idle_http_keepalive_connection_closed(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], listener=IDLE))
    reader, writer = await open_proxy(proxy)
    # Before the request: the proxy's clock starts when it has sent the response, which may
    # be well before this task reads it on a loaded machine.
    t0 = time.monotonic()
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await read_response(reader)).body == b"A"
    assert await at_eof(reader, timeout=MAX_WAIT)
    elapsed = time.monotonic() - t0
    writer.close()
    assert MIN_IDLE <= elapsed < MAX_WAIT, elapsed
    assert proxy.registry.listener("web").connections_active == 0


async def test_silent_new_connection_closed_after_idle_timeout(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], listener=IDLE))
    t0 = time.monotonic()
    reader, writer = await open_proxy(proxy)
    assert await at_eof(reader, timeout=MAX_WAIT)
    elapsed = time.monotonic() - t0
    writer.close()
    assert MIN_IDLE <= elapsed < MAX_WAIT, elapsed


async def test_http_connection_with_requests_stays_open(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], listener=BUSY_IDLE))
    reader, writer = await open_proxy(proxy)
    t0 = time.monotonic()
    while time.monotonic() - t0 < BUSY_FOR:
        writer.write(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader)).body == b"A"
        await asyncio.sleep(0.1)  # the traffic's pace (what the test is about), not a wait
    writer.close()


async def test_silent_websocket_closed_after_idle_timeout(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], listener=IDLE))
    stats = proxy.registry.listener("web")
    async with aiohttp.ClientSession() as s:
        # Before the handshake: the tunnel's clock starts when the proxy relays the 101, which
        # may be well before this task sees it on a loaded machine.
        t0 = time.monotonic()
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"), autoping=False)
        msg = await ws.receive(timeout=MAX_WAIT)
        elapsed = time.monotonic() - t0
        assert msg.type in (WSMsgType.CLOSED, WSMsgType.CLOSE), msg
        await ws.close()
    assert MIN_IDLE <= elapsed < MAX_WAIT, elapsed
    assert stats.ws_closes["idle_timeout"] == 1


async def test_websocket_with_traffic_stays_open(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], listener=BUSY_IDLE))
    stats = proxy.registry.listener("web")
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(proxy_url(proxy, path="/ws"), autoping=False) as ws,
    ):
        t0 = time.monotonic()
        i = 0
        while True:
            # Before the send: the echo, the last byte through the tunnel, passes the proxy
            # after this (and maybe well before this task reads it).
            last = time.monotonic()
            await ws.send_str(f"tick {i}")
            msg = await ws.receive(timeout=10)
            assert (msg.type, msg.data) == (WSMsgType.TEXT, f"tick {i}")
            if last - t0 > BUSY_FOR:
                break
            await asyncio.sleep(0.1)  # the traffic's pace (what the test is about), not a wait
            i += 1
        assert not ws.closed
        assert stats.ws_closes["idle_timeout"] == 0
        # Once the traffic stops, the same timeout applies, counted from the last byte.
        msg = await ws.receive(timeout=10)
        assert msg.type in (WSMsgType.CLOSED, WSMsgType.CLOSE), msg
        assert 0.6 - 0.02 <= time.monotonic() - last < 0.6 + 5
    assert stats.ws_closes["idle_timeout"] == 1
