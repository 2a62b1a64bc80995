"""Hostile clients and broken backends through a live proxy (issue 9).

Request smuggling: every request two HTTP implementations could frame differently gets 400 and
a closed connection, and a backend that records every byte it receives got none of it (a valid
request sent afterwards shows the recording works). A request line with an absolute URI is
turned into what the backend expects (RFC 9112 3.2.2). Slow clients: a head trickled byte by
byte gets 408 at client_header_timeout, a stalled body 408 at idle_timeout. Expect:
100-continue, pipelining, HTTP/1.0 with and without keep-alive and half-closed clients work.
Broken backends (garbage, cut mid-response, endless heads, never reading the body) each cost
only their own client a 502/504 or a cut connection, are counted in upstream_errors, and a
client of a healthy group is served throughout. Last, the admin token guards POST /-/reload.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml

from lbproxy.control.app import Proxy
from lbproxy.control.loading import load_config
from tests.hardening import RecordingBackend, closed_without_answer, exchange, raw_config
from tests.support import (
    RawResponse,
    RawServer,
    at_eof,
    open_proxy,
    read_request_head,
    read_response,
    wait_for,
)


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingBackend]:
    async with RecordingBackend() as r:
        yield r


def assert_refused(resp: RawResponse | None, status: int = 400) -> None:
    """The proxy's own error answer, and the connection closing after it."""
    assert resp is not None, "no response at all"
    assert resp.status == status, resp
    assert resp.header("Connection") == "close"
    assert resp.header("Content-Type") == "text/plain; charset=utf-8"


async def send(proxy: Proxy, data: bytes, listener: str = "web") -> RawResponse | None:
    a = proxy.listeners.address(listener)
    resp, _ = await exchange(a.host, a.port, data)
    return resp


async def assert_recording_works(proxy: Proxy, recorder: RecordingBackend) -> None:
    """A valid request after the refused one reaches the backend, alone: so the refused one
    really never got there."""
    resp = await send(proxy, b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert resp is not None and (resp.status, resp.body) == (200, b"ok")
    assert recorder.connections == 1
    assert bytes(recorder.received).startswith(b"GET /after HTTP/1.1\r\n")
    assert [r.target for r in recorder.requests] == [b"/after"]
    assert recorder.errors == []


H = b"Host: a\r\n"

SMUGGLING = {
    "cl_and_te": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    "te_and_cl": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
    b"Content-Length: 30\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    "differing_duplicate_cl": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
    b"Content-Length: 30\r\n\r\nabcGET /smuggled HTTP/1.1\r\n\r\n",
    "differing_cl_list": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 30\r\n\r\nabc",
    "cl_with_sign": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc",
    "cl_negative": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -3\r\n\r\nabc",
    "cl_hex": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc",
    "te_gzip_chunked": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
    b"0\r\n\r\n",
    "te_chunked_identity": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity"
    b"\r\n\r\n0\r\n\r\n",
    "te_identity": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\nabc",
    "te_xchunked": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te_twice": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_in_http10": b"POST / HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_space_before_colon": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked\r\n"
    b"\r\n0\r\n\r\n",
    "cl_space_before_colon": b"POST / HTTP/1.1\r\n" + H + b"Content-Length : 3\r\n\r\nabc",
    "cl_tab_before_colon": b"POST / HTTP/1.1\r\n" + H + b"Content-Length\t: 3\r\n\r\nabc",
    "te_obs_fold": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n  folded\r\n\r\n",
    "obs_fold_tab": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n\tfolded\r\n\r\n",
    "bare_cr_in_value": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r2\r\n\r\n",
    "bare_lf_in_value": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\n2\r\n\r\n",
    "bare_lf_line_ends": b"GET / HTTP/1.1\nHost: a\nContent-Length: 3\n\nabc",
    "bare_lf_smuggles_cl": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\nContent-Length: 40\r\n\r\n",
    "nul_in_value": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n",
    "space_in_name": b"GET / HTTP/1.1\r\n" + H + b"X A: 1\r\n\r\n",
    "two_hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "no_host": b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n",
    "userinfo_in_absolute_uri": b"GET http://user@evil.example/ HTTP/1.1\r\n" + H + b"\r\n",
    "chunk_size_not_hex": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nhello\r\n0\r\n\r\n",
    "chunk_size_negative": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"-5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_0x_prefix": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"0x5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_leading_space": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
    b"\r\n 5\r\nhello\r\n0\r\n\r\n",
    "chunk_size_overflow": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"1" + b"0" * 20 + b"\r\nhello\r\n0\r\n\r\n",
    "chunk_data_too_long": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"3\r\nhello\r\n0\r\n\r\n",
    "chunk_bare_lf": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"5\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("raw", SMUGGLING.values(), ids=SMUGGLING.keys())
async def test_smuggling_attempt_is_400_and_reaches_no_backend(make_proxy, recorder, raw):
    proxy = await make_proxy(raw_config([recorder.address]))
    assert_refused(await send(proxy, raw))
    assert recorder.received == b""
    assert recorder.connections == 0
    await assert_recording_works(proxy, recorder)


async def test_bad_chunk_after_forwarding_began_cuts_the_backend_off(make_proxy, recorder):
    """The head and a valid chunk already went to the backend when a bad size line comes:
    the client gets 400, the bad bytes never reach the backend and its connection is closed
    (so nothing sent later could be read there as a request)."""
    proxy = await make_proxy(raw_config([recorder.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    await wait_for(lambda: recorder.received.endswith(b"5\r\nhello\r\n"), what="the first chunk")
    writer.write(b"zz\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
    assert_refused(await read_response(reader))
    assert await at_eof(reader)
    writer.close()
    await wait_for(lambda: not recorder.open, what="the backend connection to be closed")
    assert b"zz" not in recorder.received and b"smuggled" not in recorder.received
    assert [r.target for r in recorder.requests] == [b"/up"]


async def test_absolute_form_target_goes_out_in_origin_form_with_its_host(make_proxy, recorder):
    proxy = await make_proxy(raw_config([recorder.address]))
    resp = await send(
        proxy,
        b"GET http://App.Example:8080/p/a?q=1 HTTP/1.1\r\nHost: other.example\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert resp is not None and (resp.status, resp.body) == (200, b"ok")
    (req,) = recorder.requests
    assert req.target == b"/p/a?q=1"
    fields = dict(req.headers)
    assert fields[b"Host"] == b"App.Example:8080"  # the received Host is replaced
    assert fields[b"X-Forwarded-Host"] == b"App.Example:8080"
    assert b"other.example" not in recorder.received

    # HTTP/1.0 without Host, and a target with no path: "/" and a Host from the authority.
    resp = await send(proxy, b"GET https://b.example HTTP/1.0\r\n\r\n")
    assert resp is not None and resp.status == 200
    req = recorder.requests[1]
    assert (req.target, dict(req.headers)[b"Host"]) == (b"/", b"b.example")


async def test_absolute_form_is_routed_by_its_authority_and_path(make_proxy, recorder):
    async with RecordingBackend() as api:
        doc = raw_config(
            [recorder.address],
            listener={"rules": [{"host": "api.example", "path": "/v1/", "server_group": "api"}]},
        )
        doc["server_groups"]["api"] = {"servers": [api.address], "health_check": {"enabled": False}}
        proxy = await make_proxy(doc)
        resp = await send(
            proxy,
            b"GET http://api.example/v1/x HTTP/1.1\r\nHost: www.example\r\nConnection: close"
            b"\r\n\r\n",
        )
        assert resp is not None and resp.status == 200
        assert [r.target for r in api.requests] == [b"/v1/x"]
        assert recorder.requests == []


async def test_error_answer_is_not_lost_to_a_reset(make_proxy, recorder):
    """A client that sends far more than the proxy reads (a 4 MiB head) gets its 431 whole
    and then a clean FIN: the proxy half-closes and drains instead of closing with unread
    bytes, which would make the kernel send a reset."""
    proxy = await make_proxy(raw_config([recorder.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"v" * (4 << 20) + b"\r\n\r\n")
    resp = await read_response(reader)
    assert resp.status == 431
    assert await at_eof(reader)  # a FIN, not ConnectionResetError
    await writer.drain()  # all 4 MiB went out: the proxy kept reading
    writer.close()
    assert recorder.received == b""


async def test_after_an_error_a_silent_client_is_closed_after_the_linger_time(make_proxy, recorder):
    proxy = await make_proxy(raw_config([recorder.address]))
    stats = proxy.registry.listeners["web"]
    reader, writer = await open_proxy(proxy)
    started = time.monotonic()
    writer.write(b"NOT HTTP\r\n\r\n")
    assert (await read_response(reader)).status == 400
    assert await at_eof(reader)  # the answer, then the proxy's FIN at once
    assert stats.connections_active == 1  # still reading what the client might send
    writer.write(b"more bytes, dropped")
    await wait_for(lambda: stats.connections_active == 0, 15, "the lingering connection to close")
    # LINGER_TIMEOUT is 2 s: not before; the upper bound is a hang guard.
    assert 1.9 <= time.monotonic() - started < 2 + 10
    writer.close()
    assert recorder.received == b""


# ------------------------------------------------------------------------------ slow clients

# The upper bound of a 300 ms timeout: a hang guard only (on a loaded machine the close is seen
# late), well short of the 60 s idle timeout it must not be mistaken for.
HEADER_WAIT = 0.3 + 8


async def test_trickled_head_gets_408_at_client_header_timeout(make_proxy, recorder):
    proxy = await make_proxy(
        raw_config(
            [recorder.address], listener={"client_header_timeout": "300ms", "idle_timeout": "60s"}
        )
    )
    reader, writer = await open_proxy(proxy)
    started = time.monotonic()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n")

    async def trickle() -> None:
        while not writer.is_closing():
            writer.write(b"x")  # one byte of a never-ending header line, every 50 ms
            await asyncio.sleep(0.05)

    task = asyncio.create_task(trickle())
    try:
        resp = await read_response(reader)
        elapsed = time.monotonic() - started
        assert resp.status == 408
        assert resp.body.startswith(b"408 Request Timeout")
        assert resp.header("Connection") == "close"
        assert await closed_without_answer(reader)
        assert 0.28 <= elapsed < HEADER_WAIT, elapsed
    finally:
        task.cancel()
        writer.close()
    assert recorder.received == b""


async def test_silent_new_connection_is_closed_at_client_header_timeout(make_proxy, recorder):
    """Counted from the accept; a connection that never sent a byte gets no 408 (it may be a
    browser's preconnect, which would read the 408 as the answer to its first request)."""
    proxy = await make_proxy(
        raw_config(
            [recorder.address], listener={"client_header_timeout": "300ms", "idle_timeout": "60s"}
        )
    )
    started = time.monotonic()  # before the connect: the proxy's clock starts at its accept
    reader, writer = await open_proxy(proxy)
    assert await closed_without_answer(reader, HEADER_WAIT)
    assert 0.28 <= time.monotonic() - started < HEADER_WAIT
    writer.close()


async def test_client_header_timeout_counts_from_each_heads_first_byte(make_proxy, recorder):
    proxy = await make_proxy(
        raw_config(
            [recorder.address], listener={"client_header_timeout": "300ms", "idle_timeout": "60s"}
        )
    )
    reader, writer = await open_proxy(proxy)
    get = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    writer.write(get)
    assert (await read_response(reader)).status == 200
    await asyncio.sleep(0.5)  # idle between requests: longer than the header timeout
    writer.write(get)
    assert (await read_response(reader)).status == 200
    started = time.monotonic()
    writer.write(b"GET /x HTTP/1.1\r\n")  # the start of a head that never completes
    resp = await read_response(reader)
    assert resp.status == 408
    assert 0.28 <= time.monotonic() - started < HEADER_WAIT
    assert await at_eof(reader)
    writer.close()


async def test_stalled_request_body_gets_408_at_idle_timeout(make_proxy, recorder):
    recorder.silent = True
    proxy = await make_proxy(raw_config([recorder.address], listener={"idle_timeout": "300ms"}))
    reader, writer = await open_proxy(proxy)
    started = time.monotonic()
    writer.write(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
    resp = await read_response(reader)
    assert resp.status == 408
    assert 0.28 <= time.monotonic() - started < HEADER_WAIT
    assert await at_eof(reader)
    writer.close()
    await wait_for(lambda: not recorder.open, what="the backend connection to be closed")
    assert bytes(recorder.received).endswith(b"\r\n\r\n0123456789")


async def test_expect_100_continue_is_relayed_from_the_backend(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(raw_config([a.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"  # before a byte of the body was sent
    writer.write(b"hello")
    resp = await read_response(reader)
    assert resp.status == 200
    assert b'"bytes": 5' in resp.body
    writer.close()


async def test_pipelined_requests_are_answered_in_order(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(raw_config([a.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(
        b"GET /status/201 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /sleep/0.2 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /whoami HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    statuses = []
    bodies = []
    for _ in range(4):
        resp = await read_response(reader)
        statuses.append(resp.status)
        bodies.append(resp.body)
    assert statuses == [201, 200, 200, 200]
    assert b'"bytes": 3' in bodies[1]
    assert bodies[2:] == [b"A slept", b"A"]
    assert await at_eof(reader)
    writer.close()


async def test_http10_without_and_with_keep_alive(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(raw_config([a.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(b"GET /whoami HTTP/1.0\r\n\r\n")
    resp = await read_response(reader)
    assert (resp.status, resp.body, resp.header("Connection")) == (200, b"A", "close")
    assert await at_eof(reader)
    writer.close()

    reader, writer = await open_proxy(proxy)
    for _ in range(2):
        writer.write(b"GET /whoami HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = await read_response(reader)
        assert (resp.status, resp.body) == (200, b"A")
        assert resp.header("Connection") == "keep-alive"
    # A chunked answer to an HTTP/1.0 client: the payload, ended by closing the connection.
    writer.write(b"GET /download/300000?chunked=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    resp = await read_response(reader)
    assert resp.status == 200 and resp.header("Transfer-Encoding") is None
    assert resp.body == (bytes(range(256)) * 1200)[:300000]
    writer.close()


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /download/200000 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 70000\r\n\r\n" + b"u" * 70000,
    ],
    ids=["get", "post_with_body"],
)
async def test_half_closed_client_still_gets_its_response(make_backend, make_proxy, request_bytes):
    """The client sends its request and shuts down its sending side (FIN) at once."""
    a = await make_backend("A")
    proxy = await make_proxy(raw_config([a.address]))
    reader, writer = await open_proxy(proxy)
    writer.write(request_bytes)
    writer.write_eof()
    resp = await read_response(reader)
    assert resp.status == 200
    if request_bytes.startswith(b"GET"):
        assert len(resp.body) == 200000
    else:
        assert b'"bytes": 70000' in resp.body
    assert resp.header("Connection") == "close"
    assert await at_eof(reader)
    writer.close()


# ------------------------------------------------------------------------------ broken backends


def two_groups(broken: str, good: str, **listener: Any) -> dict[str, Any]:
    """Listener ``web`` -> the broken backend (group ``bad``), ``good`` -> a healthy one."""
    return {
        "listeners": [
            {"name": "web", "bind": "127.0.0.1:0", "server_group": "bad", **listener},
            {"name": "good", "bind": "127.0.0.1:0", "server_group": "ok"},
        ],
        "server_groups": {
            "bad": {"servers": [broken], "health_check": {"enabled": False}},
            "ok": {"servers": [good], "health_check": {"enabled": False}},
        },
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }


class Bystander:
    """A well-behaved client of the healthy listener, requesting in a loop meanwhile."""

    def __init__(self, proxy: Proxy) -> None:
        a = proxy.listeners.address("good")
        self.url = f"http://{a}/whoami"
        self.answers: list[int] = []
        self.failures: list[str] = []
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async with aiohttp.ClientSession() as s:
            while True:
                try:
                    # A hang guard: on a loaded machine an answer may take a while.
                    async with s.get(self.url, timeout=aiohttp.ClientTimeout(total=10)) as r:
                        await r.read()
                        self.answers.append(r.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.failures.append(repr(exc))
                await asyncio.sleep(0.01)

    async def __aenter__(self) -> Bystander:
        self.task = asyncio.create_task(self._run())
        await wait_for(lambda: len(self.answers) >= 1, what="the bystander's first answer")
        return self

    async def __aexit__(self, *exc: object) -> None:
        n = len(self.answers)
        await wait_for(lambda: len(self.answers) >= n + 2, what="the bystander after the case")
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        assert self.failures == []
        assert set(self.answers) == {200}


def errors_of(proxy: Proxy, address: str) -> dict[str, int]:
    return dict(proxy.registry.servers[f"bad/{address}"].errors)


def only(kind: str, n: int = 1) -> dict[str, int]:
    out = {"connect": 0, "timeout": 0, "reset": 0, "protocol": 0}
    out[kind] = n
    return out


async def test_garbage_from_a_backend_is_502(make_backend, make_proxy):
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\nthis is not HTTP\r\n\r\n")
        await writer.drain()
        await reader.read()

    good = await make_backend("G")
    async with RawServer(garbage) as bad:
        proxy = await make_proxy(two_groups(bad.address, good.address))
        async with Bystander(proxy):
            resp = await send(proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert_refused(resp, 502)
        assert errors_of(proxy, bad.address) == only("protocol")


async def test_backend_closing_mid_response_cuts_the_client_connection(make_backend, make_proxy):
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        writer.close()

    good = await make_backend("G")
    async with RawServer(cut) as bad:
        proxy = await make_proxy(two_groups(bad.address, good.address))
        async with Bystander(proxy):
            reader, writer = await open_proxy(proxy)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 1000" in head
            with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
                await asyncio.wait_for(reader.readexactly(1000), 5)
            writer.close()
        await wait_for(lambda: errors_of(proxy, bad.address) == only("reset"), what="the count")


async def test_endless_response_head_is_502(make_backend, make_proxy):
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        while True:  # 1 KiB header lines, until the proxy hangs up
            writer.write(b"X-Filler: " + b"f" * 1012 + b"\r\n")
            await writer.drain()

    good = await make_backend("G")
    async with RawServer(endless) as bad:
        proxy = await make_proxy(two_groups(bad.address, good.address))
        async with Bystander(proxy):
            started = time.monotonic()
            assert_refused(await send(proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 502)
            # At 64 KiB, not at a timeout (which would be a 504 counted as "timeout"); the
            # bound is a hang guard.
            assert time.monotonic() - started < 10
        assert errors_of(proxy, bad.address) == only("protocol")


async def test_trickled_response_head_is_504_at_request_timeout(make_backend, make_proxy):
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n")
        while True:
            writer.write(b"X")  # a byte of a header line every 20 ms, for ever
            await writer.drain()
            await asyncio.sleep(0.02)

    good = await make_backend("G")
    async with RawServer(trickle) as bad:
        proxy = await make_proxy(two_groups(bad.address, good.address, request_timeout="500ms"))
        async with Bystander(proxy):
            started = time.monotonic()
            assert_refused(await send(proxy, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), 504)
            assert 0.48 <= time.monotonic() - started < 0.5 + 8  # not before; a hang guard
        assert errors_of(proxy, bad.address) == only("timeout")


async def test_backend_that_never_reads_the_body_is_a_504_not_the_clients_fault(
    make_backend, make_proxy
):
    """50 MiB uploaded to a backend that reads nothing: once the backend's and the proxy's
    buffers are full the client is paused, and at idle_timeout it gets 504, not a 408 blaming
    it. The proxy then half-closes and drops what the client still sends for a moment (a
    plain close would reset the connection, and the reset could destroy the 504 unread)."""

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    good = await make_backend("G")
    async with RawServer(deaf) as bad:
        proxy = await make_proxy(two_groups(bad.address, good.address, idle_timeout="500ms"))
        async with Bystander(proxy):
            reader, writer = await open_proxy(proxy)
            total = 50 * 1024 * 1024
            writer.write(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % total)
            block = b"b" * 65536
            sent = 0

            async def upload() -> None:
                nonlocal sent
                while sent < total:
                    writer.write(block)
                    sent += len(block)
                    await writer.drain()

            up = asyncio.create_task(upload())
            started = time.monotonic()
            resp = await asyncio.wait_for(read_response(reader), 15)
            elapsed = time.monotonic() - started
            assert await at_eof(reader)  # the proxy's FIN, while the client is still sending
            up.cancel()
            await asyncio.gather(up, return_exceptions=True)
            writer.close()
            assert sent < total  # the client was held back, not buffered
            assert_refused(resp, 504)
            assert (
                resp.body == b"504 Gateway Timeout: the server stopped reading the request body\n"
            )
            # The loop clock moves in whole ms: a timer may fire 1 ms early. The upper bound is
            # a hang guard.
            assert 0.48 <= elapsed < 0.5 + 8
        assert errors_of(proxy, bad.address) == only("timeout")


# ------------------------------------------------------------------------------ admin


async def test_admin_token_guards_reload(make_backend, make_proxy, make_admin, tmp_path):
    a = await make_backend("A")
    path = tmp_path / "lb.yaml"
    doc = raw_config([a.address], admin={"bind": "127.0.0.1:0", "token": "s3cret-t0ken"})
    path.write_text(yaml.safe_dump(doc))
    proxy = await make_proxy(load_config(str(path)), str(path))
    admin = await make_admin(proxy)
    assert admin.address is not None and admin.address.host == "127.0.0.1"
    url = f"http://{admin.address}/-/reload"
    async with aiohttp.ClientSession() as s:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Bearer s3cret-t0ke"},
            {"Authorization": "Basic s3cret-t0ken"},
            {"Authorization": "s3cret-t0ken"},
        ):
            async with s.post(url, json={}, headers=headers) as r:
                assert r.status == 401, headers
                assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert proxy.registry.reloads.success == 0  # nothing was attempted
        async with s.post(url, json={}, headers={"Authorization": "Bearer s3cret-t0ken"}) as r:
            assert r.status == 200
            assert (await r.json())["result"] == "ok"
        async with s.post(url, json={}, headers={"authorization": "bearer  s3cret-t0ken "}) as r:
            assert r.status == 200
        async with s.get(f"http://{admin.address}/metrics") as r:
            assert r.status == 200  # reading needs no token
    assert proxy.registry.reloads.success == 2
