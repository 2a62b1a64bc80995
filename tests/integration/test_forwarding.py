"""HTTP forwarding through a live proxy to real backends.

Round-robin order, connection reuse, HTTP/1.0 and HTTP/1.1 clients, every method, 100 MiB
streams both ways with bounded memory, chunked framing in both directions, and the
hop-by-hop / X-Forwarded-* header rules. Where a client library would hide the bytes that
matter, requests are written by hand on a raw socket and backends are hand-written too.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import socket
from typing import Any

import aiohttp
import pytest

from tests.integration.test_websocket import accept_for, frame_head, upgrade_request
from tests.support import (
    RawServer,
    RssSampler,
    at_eof,
    config_doc,
    open_proxy,
    parse_head,
    proxy_buffered,
    proxy_url,
    read_request_head,
    read_response,
    wait_for,
)

MiB = 1024 * 1024
BIG = 100 * MiB
MEMORY_BOUND = 40 * MiB  # RSS growth allowed while 100 MiB stream through
BUFFER_BOUND = 4 * MiB  # bytes the proxy may hold in its write buffers at any moment
NO_CHECKS = {"health_check": {"enabled": False}}
PATTERN_BLOCK = bytes(range(256)) * 256  # what the backend's /download/N repeats


def pattern(n: int) -> bytes:
    """The first ``n`` bytes of a /download/N body."""
    reps = -(-n // len(PATTERN_BLOCK))
    return (PATTERN_BLOCK * reps)[:n]


def pattern_sha256(n: int) -> str:
    h = hashlib.sha256()
    full, rest = divmod(n, len(PATTERN_BLOCK))
    for _ in range(full):
        h.update(PATTERN_BLOCK)
    h.update(PATTERN_BLOCK[:rest])
    return h.hexdigest()


def get(path: str, host: str = "proxy.test", extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n".encode()


# ------------------------------------------------------------------ balancing and connections


@pytest.mark.parametrize("n", [2, 3])
async def test_round_robin_exact_sequence(make_backend, make_proxy, n):
    backends = [await make_backend(name) for name in "ABC"[:n]]
    proxy = await make_proxy(config_doc([b.address for b in backends]))
    seen = []
    async with aiohttp.ClientSession() as s:
        for _ in range(4 * n):
            async with s.get(proxy_url(proxy, path="/whoami")) as r:
                assert r.status == 200
                seen.append(await r.text())
    first = seen[:n]
    assert sorted(first) == list("ABC"[:n])
    assert seen == first * 4
    for b in backends:
        assert [r[1] for r in b.requests if r[1] == "/whoami"] == ["/whoami"] * 4


async def test_keepalive_client_reuses_one_connection(make_backend, make_proxy):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(config_doc([a.address, b.address]))
    stats = proxy.registry.listener("web")
    before = stats.connections_total
    reader, writer = await open_proxy(proxy)
    seen = []
    for _ in range(6):
        writer.write(get("/whoami"))
        resp = await read_response(reader)
        assert resp.status == 200
        assert resp.header("Connection") is None  # HTTP/1.1: persistent unless told otherwise
        seen.append(resp.body.decode())
    writer.close()
    assert seen == seen[:2] * 3 and sorted(seen[:2]) == ["A", "B"]
    assert stats.connections_total - before == 1


async def test_aiohttp_session_keeps_one_connection(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    stats = proxy.registry.listener("web")
    before = stats.connections_total
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        for i in range(5):
            async with s.post(proxy_url(proxy, path="/upload"), data=b"x" * i) as r:
                assert (await r.json())["bytes"] == i
    assert stats.connections_total - before == 1


async def test_http10_client_without_keepalive_gets_close(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(b"GET /whoami HTTP/1.0\r\n\r\n")  # HTTP/1.0 may omit Host
    resp = await read_response(reader)
    assert resp.status == 200
    assert resp.body == b"A"
    assert resp.header("Connection") == "close"
    assert await at_eof(reader)
    writer.close()
    # The backend got a valid HTTP/1.1 request: a Host was supplied for it.
    assert a.requests[-1][2]["Host"] == a.address


async def test_http10_client_with_keepalive_reuses_connection(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    reader, writer = await open_proxy(proxy)
    for _ in range(3):
        writer.write(b"GET /whoami HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = await read_response(reader)
        assert (resp.status, resp.body) == (200, b"A")
        assert resp.header("Connection") == "keep-alive"
        assert resp.header("Content-Length") == "1"
    writer.write(b"GET /whoami HTTP/1.0\r\n\r\n")  # the last one asks for nothing: closed
    resp = await read_response(reader)
    assert (resp.status, resp.body) == (200, b"A")
    assert await at_eof(reader)
    writer.close()


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_every_method_forwarded(make_backend, make_proxy, method):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    body = os.urandom(3000) if method in ("POST", "PUT", "PATCH") else b""
    reader, writer = await open_proxy(proxy)
    head = f"{method} /upload HTTP/1.1\r\nHost: proxy.test\r\n"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    # A second request follows on the same connection: if the proxy relayed any body bytes
    # for HEAD, they would be read as the next response's status line.
    writer.write(head.encode() + b"\r\n" + body + get("/whoami"))
    resp = await read_response(reader, method)
    assert resp.status == 200
    if method == "HEAD":
        assert resp.body == b""
        assert int(resp.header("Content-Length") or 0) > 0
    else:
        info = json.loads(resp.body)
        assert info == {
            "backend": "A",
            "bytes": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    nxt = await read_response(reader)
    assert (nxt.status, nxt.body) == (200, b"A")
    writer.close()
    assert [r[0] for r in a.requests if r[1] == "/upload"] == [method]


async def test_pipelined_requests_answered_in_order(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    reader, writer = await open_proxy(proxy)
    body = os.urandom(100_000)  # more than the proxy reads ahead: it must pause the client
    writer.write(
        get("/whoami")
        + b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
        + get("/download/70000?chunked=1")
        + b"HEAD /whoami HTTP/1.1\r\nHost: x\r\n\r\n"
        + get("/status/404")
    )
    r1 = await read_response(reader)
    r2 = await read_response(reader)
    r3 = await read_response(reader)
    r4 = await read_response(reader, "HEAD")
    r5 = await read_response(reader)
    writer.close()
    assert (r1.status, r1.body) == (200, b"A")
    assert json.loads(r2.body)["sha256"] == hashlib.sha256(body).hexdigest()
    assert r3.body == pattern(70000)
    assert (r4.status, r4.body, r4.header("Content-Length")) == (200, b"", "1")
    assert (r5.status, r5.body) == (404, b"A")
    assert [r[1] for r in a.requests if r[1] != "/health"] == [
        "/whoami",
        "/upload",
        "/download/70000?chunked=1",
        "/whoami",
        "/status/404",
    ]


async def test_expect_100_continue_relayed(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n")
    writer.write(b"hello")  # only now, as a careful client would
    resp = await read_response(reader)
    writer.close()
    assert json.loads(resp.body)["sha256"] == hashlib.sha256(b"hello").hexdigest()


async def test_client_gone_mid_download_releases_everything(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    stats = proxy.registry.listener("web")
    [server] = proxy.snapshot.groups["rs1"].servers
    reader, writer = await open_proxy(proxy)
    writer.write(get(f"/download/{BIG}"))
    await reader.readexactly(MiB)
    assert server.active == 1
    writer.transport.abort()
    await wait_for(
        lambda: stats.connections_active == 0 and server.active == 0,
        what="the connection and the server slot to be released",
    )
    assert server.pool.idle == []  # a half-read response leaves nothing reusable
    await wait_for(lambda: proxy_buffered(proxy) == 0, what="no buffers left")


# ------------------------------------------------------------------ 100 MiB streams


async def _warm_up(proxy) -> None:
    """One small transfer each way first, so buffers and caches exist before measuring."""
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy_url(proxy, path="/upload"), data=os.urandom(MiB)) as r:
            assert r.status == 200
        async with s.get(proxy_url(proxy, path="/download/1048576?chunked=1")) as r:
            assert len(await r.read()) == MiB
    gc.collect()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_upload_100mib_streams_with_bounded_memory(make_backend, make_proxy, chunked):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    await _warm_up(proxy)
    block = bytearray(os.urandom(MiB))
    sha = hashlib.sha256()
    reader, writer = await open_proxy(proxy)
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BIG}"
    writer.write(f"POST /upload HTTP/1.1\r\nHost: proxy.test\r\n{framing}\r\n\r\n".encode())
    async with RssSampler(proxy) as mem:
        for i in range(BIG // MiB):
            block[:8] = i.to_bytes(8, "big")  # every MiB differs: reordering would show
            piece = bytes(block)
            sha.update(piece)
            if chunked:
                # Odd chunk sizes, so chunk boundaries fall anywhere in the proxy's reads.
                for part in (piece[:1], piece[1:70001], piece[70001:]):
                    writer.write(b"%x\r\n" % len(part) + part + b"\r\n")
            else:
                writer.write(piece)
            await writer.drain()
        if chunked:
            writer.write(b"0\r\n\r\n")
        resp = await read_response(reader)
    writer.close()
    assert resp.status == 200
    assert json.loads(resp.body) == {"backend": "A", "bytes": BIG, "sha256": sha.hexdigest()}
    assert mem.growth < MEMORY_BOUND, f"RSS grew {mem.growth / MiB:.1f} MiB"
    assert mem.buffered_peak < BUFFER_BOUND, f"proxy buffered {mem.buffered_peak} bytes"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_download_100mib_streams_with_bounded_memory(make_backend, make_proxy, chunked):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    await _warm_up(proxy)
    expected = pattern_sha256(BIG)
    sha = hashlib.sha256()
    n = 0
    url = proxy_url(proxy, path=f"/download/{BIG}" + ("?chunked=1" if chunked else ""))
    async with aiohttp.ClientSession() as s, RssSampler(proxy) as mem, s.get(url) as r:
        assert r.status == 200
        if chunked:
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in r.headers
        else:
            assert r.headers["Content-Length"] == str(BIG)
        async for data in r.content.iter_any():
            sha.update(data)
            n += len(data)
    assert n == BIG
    assert sha.hexdigest() == expected
    assert mem.growth < MEMORY_BOUND, f"RSS grew {mem.growth / MiB:.1f} MiB"
    assert mem.buffered_peak < BUFFER_BOUND, f"proxy buffered {mem.buffered_peak} bytes"


# ------------------------------------------------------------------ chunked framing

CHUNKED_BODY = (
    b"5;ext=1\r\nhello\r\n"
    b'6;name="quoted value";flag\r\n world\r\n'
    b"1\r\n!\r\n"
    b"0\r\nX-Trailer: t1\r\nX-Other: t2\r\n\r\n"
)


async def test_chunked_request_with_extensions_and_trailers(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    reader, writer = await open_proxy(proxy)
    data = (
        b"POST /upload HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        + CHUNKED_BODY
        + get("/whoami")
    )
    # Three bytes at a time: every size line, extension and trailer is split across reads.
    for i in range(0, len(data), 3):
        writer.write(data[i : i + 3])
        await writer.drain()
    resp = await read_response(reader)
    assert resp.status == 200
    assert json.loads(resp.body) == {
        "backend": "A",
        "bytes": 12,
        "sha256": hashlib.sha256(b"hello world!").hexdigest(),
    }
    nxt = await read_response(reader)  # the body ended exactly where the framing said
    assert (nxt.status, nxt.body) == (200, b"A")
    writer.close()


async def test_chunked_request_framing_reaches_backend_byte_for_byte(make_proxy):
    got: list[tuple[str, list[tuple[str, str]], bytes]] = []

    async def backend(reader, writer):
        line, fields = await read_request_head(reader)
        body = await reader.readexactly(len(CHUNKED_BODY))
        got.append((line, fields, body))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        reader, writer = await open_proxy(proxy)
        writer.write(
            b"POST /in HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            + CHUNKED_BODY
        )
        resp = await read_response(reader)
        writer.close()
    assert (resp.status, resp.body) == (200, b"ok")
    [(line, fields, body)] = got
    assert line == "POST /in HTTP/1.1"
    assert body == CHUNKED_BODY
    names = [k.lower() for k, _ in fields]
    assert names.count("transfer-encoding") == 1
    assert ("Transfer-Encoding", "chunked") in fields
    assert "content-length" not in names


async def test_chunked_response_passed_through(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    reader, writer = await open_proxy(proxy)
    n = 300_001
    writer.write(get(f"/download/{n}?chunked=1"))
    resp = await read_response(reader)
    assert resp.status == 200
    assert resp.header("Transfer-Encoding") == "chunked"
    assert resp.header("Content-Length") is None
    assert len(resp.body) == n
    assert hashlib.sha256(resp.body).hexdigest() == pattern_sha256(n)
    writer.write(get("/whoami"))  # still usable: the terminating chunk was relayed
    assert (await read_response(reader)).body == b"A"
    writer.close()


RAW_CHUNKED_RESPONSE_BODY = b"3;a=b\r\nabc\r\nA\r\n0123456789\r\n0\r\nX-Checksum: 42\r\n\r\n"


async def test_chunked_response_framing_relayed_byte_for_byte(make_proxy):
    async def backend(reader, writer):
        while True:
            await read_request_head(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
                + RAW_CHUNKED_RESPONSE_BODY
            )
            await writer.drain()

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        reader, writer = await open_proxy(proxy)
        writer.write(get("/x"))
        resp = await read_response(reader)
        writer.close()
    assert resp.status == 200
    assert resp.raw_body == RAW_CHUNKED_RESPONSE_BODY
    assert resp.body == b"abc0123456789"
    assert resp.trailers == [("X-Checksum", "42")]
    assert resp.header("Trailer") is None  # hop-by-hop


@pytest.mark.parametrize("keep_alive", [False, True])
async def test_http10_client_gets_chunked_response_dechunked(make_backend, make_proxy, keep_alive):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    n = 200_003
    extra = b"Connection: keep-alive\r\n" if keep_alive else b""
    reader, writer = await open_proxy(proxy)
    writer.write(b"GET /download/%d?chunked=1 HTTP/1.0\r\n" % n + extra + b"\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    body = await asyncio.wait_for(reader.read(-1), 5)  # ended by the close, nothing else
    writer.close()
    start, fields = parse_head(head)
    names = {k.lower() for k, _ in fields}
    assert start.split(" ")[1] == "200"
    assert "transfer-encoding" not in names
    assert "content-length" not in names
    assert ("Connection", "close") in fields
    assert body == pattern(n)


# ------------------------------------------------------------------ header rules


def _seen_headers(resp) -> list[tuple[str, str]]:
    return [(k, v) for k, v in json.loads(resp.body)["headers"]]


async def test_hop_by_hop_request_headers_removed_and_forwarded_set(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(
        b"GET /headers HTTP/1.1\r\n"
        b"Host: example.test:8080\r\n"
        b"Connection: close, X-Secret\r\n"
        b"X-Secret: s3cret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-T\r\n"
        b"Upgrade: h2c\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil.test\r\n"
        b"X-Real-IP: 9.9.9.9\r\n"
        b"X-Kept: yes\r\n"
        b"\r\n"
    )
    resp = await read_response(reader)
    assert resp.status == 200
    assert resp.header("Connection") == "close"  # the client asked for it
    assert await at_eof(reader)
    writer.close()
    assert _seen_headers(resp) == [
        ("Host", "example.test:8080"),
        ("X-Kept", "yes"),
        ("X-Forwarded-For", "1.2.3.4, 127.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "example.test:8080"),
        ("X-Real-IP", "127.0.0.1"),
    ]


async def test_x_forwarded_for_lines_joined_in_order(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(get("/headers", extra="X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n"))
    resp = await read_response(reader)
    writer.close()
    seen = dict(_seen_headers(resp))
    assert seen["X-Forwarded-For"] == "1.2.3.4, 5.6.7.8, 127.0.0.1"
    assert seen["X-Real-IP"] == "127.0.0.1"


async def test_upgrade_on_plain_request_not_forwarded(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(get("/headers", extra="Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"))
    resp = await read_response(reader)
    assert resp.status == 200
    names = {k.lower() for k, _ in _seen_headers(resp)}
    assert names.isdisjoint({"connection", "upgrade", "http2-settings"})
    writer.write(get("/whoami"))  # not switched to anything: plain HTTP goes on
    assert (await read_response(reader)).body == b"A"
    writer.close()


async def test_x_forwarded_disabled_adds_nothing(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address], listener={"x_forwarded_for": False}))
    reader, writer = await open_proxy(proxy)
    writer.write(get("/headers", host="example.test", extra="X-Kept: 1\r\n"))
    resp = await read_response(reader)
    writer.close()
    assert _seen_headers(resp) == [("Host", "example.test"), ("X-Kept", "1")]


async def test_hop_by_hop_response_headers_removed(make_proxy):
    async def backend(reader, writer):
        while True:
            await read_request_head(reader)
            writer.write(
                b"HTTP/1.1 200 OK\r\n"
                b"Content-Length: 2\r\n"
                b"Connection: X-Foo\r\n"
                b"X-Foo: bar\r\n"
                b"Keep-Alive: timeout=5, max=100\r\n"
                b"Proxy-Connection: keep-alive\r\n"
                b"Upgrade: h2c\r\n"
                b"X-Kept: yes\r\n"
                b"\r\n"
                b"ok"
            )
            await writer.drain()

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        reader, writer = await open_proxy(proxy)
        writer.write(get("/"))
        resp = await read_response(reader)
        writer.close()
    assert (resp.status, resp.body) == (200, b"ok")
    assert resp.headers == [("Content-Length", "2"), ("X-Kept", "yes")]


# ------------------------------------------------------------------ pipelined behind a full buffer


async def _pipelined_behind_a_full_buffer(make_proxy: Any, upgrade: bool) -> bool | None:
    """One try: a client with a small receive buffer pipelines two GETs (the second a
    WebSocket upgrade with ``upgrade``) and reads slowly until the second reaches the
    backend, then stops reading. Returns None when the first response happened to end with
    the client's buffer below its mark (nothing to test this time), else whether the
    second's backend was held back (then both answers are checked whole once the client
    reads again)."""
    first, second = 100 * 1024, 32 * MiB
    # The second answer: a body, or a 101 and binary frames of one block each.
    unit = frame_head(0x2, len(PATTERN_BLOCK)) + PATTERN_BLOCK if upgrade else PATTERN_BLOCK
    got_second = asyncio.Event()
    backend_writer: list[asyncio.StreamWriter] = []
    sent = [0]
    proxies: list[Any] = []
    behind: list[bool] = []  # whether the client was behind when the second request came

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % first + pattern(first))
        await writer.drain()
        _, fields = await read_request_head(reader)
        # Read at once, before this backend answers anything: the client's state when the
        # proxy connected here (it can only have caught up since, never fallen behind).
        (conn,) = [c for c in proxies[0].connections() if getattr(c, "exchange", None)]
        behind.append(conn.write_paused)
        backend_writer.append(writer)
        got_second.set()
        if upgrade:
            key = dict((k.lower(), v) for k, v in fields)["sec-websocket-key"]
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n"
                % accept_for(key).encode()
            )
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % second)
        for _ in range(second // len(PATTERN_BLOCK)):
            writer.write(unit)
            sent[0] += len(PATTERN_BLOCK)
            await writer.drain()

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        proxies.append(proxy)
        a = proxy.listeners.address("web")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (a.host, a.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        # The proxy's side of the connection with a small fixed send buffer too (a slow
        # path to the client), so that the proxy's own buffer is what fills, soon.
        await wait_for(lambda: len(proxy.connections()) == 1, what="the connection accepted")
        (front,) = proxy.connections()
        front.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        then = upgrade_request() if upgrade else get("/two", extra="Connection: close\r\n")
        writer.write(get("/one") + then)
        got = bytearray()
        try:
            # Read slowly (the client's buffer drains and fills in turn) until the second
            # request is at the backend, then not at all.
            while not got_second.is_set():
                reading = asyncio.ensure_future(reader.read(1024))
                waiting = asyncio.ensure_future(got_second.wait())
                await asyncio.wait({reading, waiting}, timeout=30, return_when="FIRST_COMPLETED")
                waiting.cancel()
                if reading.done():
                    got += reading.result()
                else:  # cancelled before it took anything: what arrived stays in the reader
                    reading.cancel()
                    await asyncio.gather(reading, return_exceptions=True)
                    assert got_second.is_set(), "the second request never reached the backend"
            if not behind[0]:
                return None
            # The second backend connection is not read while the client is behind (for an
            # upgrade, not even its 101: the tunnel starts once the client has caught up)...
            waiting = [c for c in proxy.connections() if getattr(c, "exchange", None)]
            held = bool(waiting) and not waiting[0].exchange.dispatch.up.transport.is_reading()
            if held:
                # ...so its backend stops once the socket buffers are full, and the proxy
                # holds no more than its own buffers' marks.
                await wait_for(
                    lambda: backend_writer[0].transport.get_write_buffer_size() > 0,
                    what="the backend held back",
                )
                assert sent[0] < second and proxy_buffered(proxy) < BUFFER_BOUND
                # Then the client reads: both answers whole, in order.
                got += await asyncio.wait_for(reader.read(-1), 60)
                h1, _, rest = bytes(got).partition(b"\r\n\r\n")
                assert h1.startswith(b"HTTP/1.1 200") and rest[:first] == pattern(first)
                h2, _, b2 = rest[first:].partition(b"\r\n\r\n")
                assert h2.startswith(b"HTTP/1.1 101" if upgrade else b"HTTP/1.1 200")
                assert b2 == unit * (second // len(PATTERN_BLOCK))
            return held
        finally:
            writer.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("upgrade", [False, True], ids=["request", "websocket"])
async def test_a_pipelined_request_behind_a_full_client_buffer_starts_its_backend_paused(
    make_proxy, upgrade
):
    # A client that pipelines requests and stops reading: the first answer ends with the
    # client's buffer over its mark, and the transport says pause only once. Without
    # starting the second backend paused (and the tunnel, for an upgrade, blocked), the
    # proxy read the whole second answer, of any size, into memory.
    for _ in range(8):
        held = await _pipelined_behind_a_full_buffer(make_proxy, upgrade)
        if held is not None:
            assert held, "the second backend was read while the client was behind"
            return
    pytest.fail("in 8 tries the first answer never ended with the client's buffer full")


class _TasklessBackend(asyncio.Protocol):
    """A backend in Protocol callbacks (no task of its own, unlike asyncio.start_server and
    aiohttp): answers each request ``ok`` and closes, so that every request needs a new
    backend connection; an upgrade is answered 101 and its connection left open."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport  # uvloop's: not registered as an asyncio.Transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        if b"upgrade: websocket" in self.buf.lower():
            key = self.buf.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0].decode()
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %b\r\n\r\n"
                % accept_for(key).encode()
            )
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        self.transport.close()


async def test_a_new_backend_connection_is_opened_without_a_task(make_proxy):
    """A new plain connection to a backend (no PROXY header, no TLS: the common case) is
    opened in the loop's callbacks (``upstream.Connecting``): not one task for requests that
    each need a new backend connection, nor for a WebSocket upgrade. (Before, each new
    backend connection was a task: this counted 6.)"""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_TasklessBackend, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proxy = await make_proxy(
        config_doc([f"127.0.0.1:{port}"], group={"health_check": {"enabled": False}})
    )
    created: list[Any] = []
    before = loop.get_task_factory()

    def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        created.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(counting)
    try:
        reader, writer = await open_proxy(proxy)
        for _ in range(5):
            writer.write(b"GET / HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
            resp = await read_response(reader)
            assert (resp.status, resp.body) == (200, b"ok")
        writer.write(upgrade_request())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 ")
        writer.close()
    finally:
        loop.set_task_factory(before)
        server.close()
    assert created == []
