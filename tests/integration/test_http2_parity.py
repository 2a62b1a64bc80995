"""HTTP/2 requests get what HTTP/1.1 requests get (issue 15): backend pooling, rules,
stickiness, retries, health-aware choice, timeouts and the proxy's own answers, each on its
stream while the connection goes on; a backend failure after the head resets only its
stream; a stream the client resets releases its backend (499)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import ssl
from typing import Any

import httpx
import pytest
from hyperframe.frame import HeadersFrame

from lbproxy.control.app import Proxy
from lbproxy.proxy.exchange import Exchange
from lbproxy.proxy.http2 import Http2Connection
from lbproxy.proxy.http2_stream import Stream
from tests.h2client import GoAwayFrame, RawH2, RstStreamFrame
from tests.hardening import make_cert, openssl_available
from tests.support import RawServer, read_request_head, wait_for

INTERNAL_ERROR = 2


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    openssl_available()
    return make_cert(str(tmp_path_factory.mktemp("h2pcerts")), "h2p")


def doc(
    cert: tuple[str, str], groups: dict[str, list[str]], group: dict[str, Any] | None = None,
    **listener: Any,
) -> dict[str, Any]:  # fmt: skip
    return {
        "listeners": [
            {
                "name": "secure",
                "bind": "127.0.0.1:0",
                "protocol": "https",
                "server_group": next(iter(groups)),
                "tls": {"cert": cert[0], "key": cert[1]},
                **listener,
            }
        ],
        "server_groups": {
            name: {"servers": servers, "health_check": {"enabled": False}, **(group or {})}
            for name, servers in groups.items()
        },
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }


def client(cert: tuple[str, str]) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        http2=True, verify=ssl.create_default_context(cafile=cert[0]), timeout=20
    )


def url(proxy: Proxy, path: str) -> str:
    return f"https://{proxy.listeners.address('secure')}{path}"


async def raw(proxy: Proxy, cert: tuple[str, str]) -> RawH2:
    a = proxy.listeners.address("secure")
    return await RawH2.connect(a.host, a.port, cert[0])


async def test_pooling_rules_and_a_counted_body(make_backend, make_proxy, cert):
    a = await make_backend("A")
    api = await make_backend("API")
    proxy = await make_proxy(
        doc(
            cert,
            {"rs1": [a.address], "api": [api.address]},
            rules=[{"path": "/api/", "server_group": "api"}],
        )
    )
    body = bytes(range(256)) * 777
    async with client(cert) as c:
        for _ in range(5):
            r = await c.get(url(proxy, "/whoami"))
            assert (r.http_version, r.text) == ("HTTP/2", "A")
        r = await c.get(url(proxy, "/api/whatever"))
        assert r.status_code == 404 and r.http_version == "HTTP/2"  # routed to API's app
        r = await c.post(url(proxy, "/upload"), content=body)  # with a content-length
        assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
    assert a.requests[-1][2]["Content-Length"] == str(len(body))
    assert [req[1] for req in api.requests] == ["/api/whatever"]
    (server,) = proxy.snapshot.groups["rs1"].servers
    # Six requests one after another, one backend connection kept in the pool.
    assert len(server.pool.idle) == 1 and server.active == 0


async def test_sticky_insert_cookie_over_http2(make_backend, make_proxy, cert):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(
        doc(cert, {"rs1": [a.address, b.address]}, group={"sticky_session": {"type": "insert"}})
    )
    async with client(cert) as c:
        first = await c.get(url(proxy, "/whoami"))
        cookie = first.headers["set-cookie"]
        assert cookie.startswith("SERVERID=")
        for _ in range(4):
            r = await c.get(url(proxy, "/whoami"), headers={"cookie": cookie.split(";")[0]})
            assert r.text == first.text


async def test_retry_on_a_dead_server_and_the_proxys_own_answers(make_backend, make_proxy, cert):
    a = await make_backend("A")
    dead = RawServer(lambda r, w: asyncio.sleep(0))
    await dead.start()
    await dead.stop()  # its port now refuses connections
    proxy = await make_proxy(
        doc(
            cert,
            {"rs1": [dead.address, a.address], "empty": []},
            group={"scheduler": "rr"},
            rules=[{"path": "/nowhere/", "server_group": "empty"}],
        )
    )
    async with client(cert) as c:
        rs = [await c.get(url(proxy, "/whoami")) for _ in range(4)]
        assert [r.text for r in rs] == ["A"] * 4
        assert proxy.registry.retries.get("rs1", 0) >= 1
        r = await c.get(url(proxy, "/nowhere/x"))
        assert (r.status_code, r.headers["retry-after"]) == (503, "1")
        assert r.text.startswith("503 Service Unavailable")
        await a.stop()
        r = await c.get(url(proxy, "/whoami"))
        assert r.status_code == 502 and r.headers["content-type"].startswith("text/plain")
        # The proxy's own answers end their stream, not the connection: one connection.
        r = await c.get(url(proxy, "/nowhere/y"))
        assert r.status_code == 503 and r.http_version == "HTTP/2"
    assert proxy.registry.listeners["secure"].connections_total == 1


async def test_request_timeout_is_504_on_its_stream(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(doc(cert, {"rs1": [a.address]}, request_timeout="300ms"))
    c = await raw(proxy, cert)
    slow = c.request("/sleep/5")
    fast = c.request("/whoami")
    head, body = await c.response(fast)
    assert (head[":status"], body) == ("200", b"A")
    head, body = await c.response(slow)
    assert head[":status"] == "504"
    sid = c.request("/whoami")  # the connection goes on
    head, _ = await c.response(sid)
    assert head[":status"] == "200"
    c.close()


async def test_an_idle_connection_gets_goaway_after_idle_timeout(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(doc(cert, {"rs1": [a.address]}, idle_timeout="400ms"))
    c = await raw(proxy, cert)
    sid = c.request("/whoami")
    await c.response(sid)
    goaway = await c.until(GoAwayFrame)
    assert (goaway.error_code, goaway.last_stream_id) == (0, sid)
    assert await c.frame() is None


async def cut_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers /cut with a head promising 1000 bytes, sends 10 and closes; anything else
    gets a normal response."""
    while True:
        line, _ = await read_request_head(reader)
        if line.split()[1] == "/cut":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
            await writer.drain()
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()


async def test_a_cut_response_resets_only_its_stream(make_proxy, cert):
    backend = RawServer(cut_backend)
    await backend.start()
    try:
        proxy = await make_proxy(doc(cert, {"rs1": [backend.address]}))
        c = await raw(proxy, cert)
        sid = c.request("/cut")
        while True:
            f = await c.frame()
            assert f is not None
            if isinstance(f, RstStreamFrame) and f.stream_id == sid:
                assert f.error_code == INTERNAL_ERROR
                break
        sid = c.request("/fine")
        head, body = await c.response(sid)
        assert (head[":status"], body) == ("200", b"ok")
        stats = proxy.registry.servers[f"rs1/{backend.address}"]
        assert stats.errors["reset"] == 1
        c.close()
    finally:
        await backend.stop()


async def test_a_stream_reset_by_the_client_releases_its_backend(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(doc(cert, {"rs1": [a.address]}))
    c = await raw(proxy, cert)
    sid = c.request("/sleep/5")
    await wait_for(lambda: len(a.requests) == 1, what="the backend to get the request")
    (server,) = proxy.snapshot.groups["rs1"].servers
    assert server.active == 1
    await asyncio.sleep(0.05)  # a reset in a later read than the request
    c.reset(sid)
    await wait_for(lambda: server.active == 0, what="the backend to be released")
    assert not server.pool.idle  # its connection was mid-request: closed, not pooled
    stats = proxy.registry.listeners["secure"]
    assert stats.requests[("rs1", a.address, "499")] == 1
    sid = c.request("/whoami")
    _, body = await c.response(sid)
    assert body == b"A"
    c.close()


async def test_request_body_without_length_goes_chunked_and_streams(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(doc(cert, {"rs1": [a.address]}))
    c = await raw(proxy, cert)
    sid = c.request("/upload", "POST", end=False)
    pieces = [bytes([i]) * 5000 for i in range(10)]
    for p in pieces:
        c.data(sid, p)
        await asyncio.sleep(0.01)
    c.data(sid, b"", end=True)
    head, body = await c.response(sid)
    answer = json.loads(body)
    assert head[":status"] == "200"
    assert answer["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert a.requests[-1][2]["Transfer-Encoding"] == "chunked"
    c.close()


async def test_a_connection_that_never_sends_a_request_is_closed_at_client_header_timeout(
    make_backend, make_proxy, cert
):
    a = await make_backend("A")
    proxy = await make_proxy(doc(cert, {"rs1": [a.address]}, client_header_timeout="300ms"))
    c = await raw(proxy, cert)  # preface and SETTINGS, then nothing
    goaway = await c.until(GoAwayFrame)
    assert (goaway.error_code, goaway.last_stream_id) == (0, 0)
    assert await c.frame() is None
    assert proxy.registry.listeners["secure"].connections_active == 0


async def test_100_continue_is_relayed_so_the_client_sends_its_body(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(doc(cert, {"rs1": [a.address]}))
    c = await raw(proxy, cert)
    body = b"x" * 3000
    sid = c.request(
        "/upload", "POST", end=False,
        extra=(("expect", "100-continue"), ("content-length", str(len(body)))),
    )  # fmt: skip
    while True:  # the client holds its body until the backend's 100 comes through
        f = await c.frame()
        assert f is not None
        if isinstance(f, HeadersFrame) and f.stream_id == sid:
            assert c.decode(f)[":status"] == "100"
            break
    c.data(sid, body, end=True)
    head, out = await c.response(sid)
    assert head[":status"] == "200" and json.loads(out)["bytes"] == len(body)
    c.close()


async def test_a_client_goaway_closes_the_connection_and_releases_its_backends(
    make_backend, make_proxy, cert
):
    a = await make_backend("A")
    proxy = await make_proxy(doc(cert, {"rs1": [a.address]}))
    c = await raw(proxy, cert)
    c.request("/sleep/5")
    await wait_for(lambda: len(a.requests) == 1, what="the backend to get the request")
    (server,) = proxy.snapshot.groups["rs1"].servers
    goaway = GoAwayFrame(0)
    goaway.last_stream_id = 0
    c.send(goaway)
    while await c.frame() is not None:
        pass
    await wait_for(lambda: server.active == 0, what="the backend to be released")
    assert proxy.registry.listeners["secure"].connections_active == 0


async def test_finished_streams_and_exchanges_are_freed_without_the_cycle_collector(
    make_backend, make_proxy, cert
):
    a = await make_backend("A")
    proxy = await make_proxy(doc(cert, {"rs1": [a.address]}))
    c = await raw(proxy, cert)
    sid = c.request("/whoami")
    await c.response(sid)  # imports and pools warmed up
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            sid = c.request("/whoami")
            _, body = await c.response(sid)
            assert body == b"A"
        sid = c.request("/sleep/5")
        await wait_for(lambda: len(a.requests) == 5, what="the backend to get the request")
        c.reset(sid)  # and one the client resets
        await wait_for(lambda: not h2_streams(proxy), what="the stream to end")
        await asyncio.sleep(0)
        assert not [o for o in gc.get_objects() if isinstance(o, Exchange | Stream)]
    finally:
        gc.enable()
    c.close()


def h2_streams(proxy: Proxy) -> list[Stream]:
    return [
        s for c in proxy.connections() if isinstance(c, Http2Connection) for s in c.streams.values()
    ]
