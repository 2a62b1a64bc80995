"""HTTP/2 toward clients (issue 15) through a live proxy over real TLS, with certificates
made for each test module; backends are spoken to in HTTP/1.1.

- ALPN offers h2 and http/1.1 (``http2: true``, the default): curl and httpx speak HTTP/2,
  an HTTP/1.1-only client still gets HTTP/1.1; ``http2: false`` offers HTTP/1.1 only;
- concurrent streams on one connection reach both backends, with X-Forwarded-*, Host from
  :authority and cookie crumbs joined; metrics and the access log name the protocol;
- flow control: a large upload to a slow backend and a large download to a client that does
  not open its window keep the proxy's buffers bounded, and both complete intact;
- shutdown: GOAWAY 2^31-1 and a PING, then GOAWAY with the last stream id; streams in flight
  finish, a later one is refused; curl's request in flight completes;
- rapid reset (CVE-2023-44487): GOAWAY ENHANCE_YOUR_CALM, disconnected, counted, and the
  streams reset in the same batch never reach a backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
import ssl
from pathlib import Path

import httpx
import pytest
import yaml
from aiohttp import web
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame
from prometheus_client import CollectorRegistry, generate_latest

from lbproxy.control.app import Proxy
from lbproxy.control.loading import load_config
from lbproxy.control.metric_families import Collector
from lbproxy.proxy.http2 import MAX_CONCURRENT_STREAMS, Http2Connection
from tests.h2client import GoAwayFrame, PingFrame, RawH2, RstStreamFrame
from tests.hardening import make_cert, openssl_available
from tests.support import Backend, backend_app, wait_for


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    openssl_available()
    return make_cert(str(tmp_path_factory.mktemp("h2certs")), "h2")


ENHANCE_YOUR_CALM = 11
REFUSED_STREAM = 7
PROTOCOL_ERROR = 1


def h2_doc(backends: list[str], cert: tuple[str, str], **listener: object) -> dict:
    return {
        "listeners": [
            {
                "name": "secure",
                "bind": "127.0.0.1:0",
                "protocol": "https",
                "server_group": "rs1",
                "tls": {"cert": cert[0], "key": cert[1]},
                **listener,
            }
        ],
        "server_groups": {
            "rs1": {
                "servers": backends,
                "scheduler": "rr",
                "health_check": {"enabled": False},
            }
        },
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }


def verify(cert: tuple[str, str]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cert[0])


def url(proxy: Proxy, path: str) -> str:
    return f"https://{proxy.listeners.address('secure')}{path}"


def h2_connections(proxy: Proxy) -> list[Http2Connection]:
    return [c for c in proxy.connections() if isinstance(c, Http2Connection)]


async def curl(*args: str) -> tuple[int, str, str]:
    if shutil.which("curl") is None:
        pytest.fail("curl is missing (scripts/_bootstrap.sh installs it)")
    p = await asyncio.create_subprocess_exec(
        "curl", "-sS", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await p.communicate()
    return p.returncode or 0, out.decode(), err.decode()


async def test_curl_speaks_http2_and_the_access_log_and_metrics_say_so(
    make_backend, make_proxy, cert, tmp_path: Path
):
    a = await make_backend("A")
    log_path = tmp_path / "access.log"
    doc = h2_doc([a.address], cert)
    doc["access_log"] = {"enabled": True, "format": "json", "path": str(log_path)}
    proxy = await make_proxy(doc)
    rc, out, err = await curl(
        "--http2", "--cacert", cert[0], "-w", "\n%{http_version}", url(proxy, "/whoami")
    )
    assert rc == 0, err
    assert out.split("\n") == ["A", "2"]
    # An HTTP/1.1-only client on the same listener: ALPN settles on http/1.1.
    rc, out, err = await curl(
        "--http1.1", "--cacert", cert[0], "-w", "\n%{http_version}", url(proxy, "/whoami")
    )
    assert out.split("\n") == ["A", "1.1"], err
    stats = proxy.registry.listeners["secure"]
    assert stats.protocols == {"HTTP/2": 1, "HTTP/1.1": 1}
    proxy.access.close()
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [(x["protocol"], x["path"], x["status"]) for x in lines] == [
        ("HTTP/2", "/whoami", 200),
        ("HTTP/1.1", "/whoami", 200),
    ]


async def test_http2_false_offers_http11_only(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert, http2=False))
    rc, out, err = await curl(
        "--http2", "--cacert", cert[0], "-w", "\n%{http_version}", url(proxy, "/whoami")
    )
    assert rc == 0, err
    assert out.split("\n") == ["A", "1.1"]
    addr = proxy.listeners.address("secure")
    ctx = ssl.create_default_context(cafile=cert[0])
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    _, w = await asyncio.open_connection(addr.host, addr.port, ssl=ctx)
    assert w.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    w.close()


async def test_httpx_concurrent_streams_reach_both_backends_with_forwarded_headers(
    make_backend, make_proxy, cert
):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(h2_doc([a.address, b.address], cert))
    async with httpx.AsyncClient(
        http2=True, verify=ssl.create_default_context(cafile=cert[0])
    ) as client:
        rs = await asyncio.gather(*(client.get(url(proxy, "/whoami")) for _ in range(20)))
        assert {r.http_version for r in rs} == {"HTTP/2"}
        assert sorted(r.text for r in rs) == ["A"] * 10 + ["B"] * 10
        assert len(h2_connections(proxy)) == 1  # all twenty on one connection
        r = await client.get(
            url(proxy, "/headers"), headers=[("cookie", "a=1"), ("cookie", "b=2"), ("x-t", "v")]
        )
    assert r.http_version == "HTTP/2" and r.status_code == 200
    seen = {k.lower(): v for k, v in r.json()["headers"]}
    addr = proxy.listeners.address("secure")
    assert seen["host"] == f"{addr.host}:{addr.port}"  # from :authority
    assert seen["cookie"] == "a=1; b=2"
    assert seen["x-t"] == "v"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert proxy.registry.listeners["secure"].protocols == {"HTTP/2": 21}


RELEASE = web.AppKey("release", asyncio.Event)


def slow_app(name: str) -> web.Application:
    """backend_app, plus /slow-upload: reads nothing until ``app[RELEASE]`` is set, then
    16 KiB at a time with a pause between reads."""
    app = backend_app(name)
    app[RELEASE] = asyncio.Event()

    async def slow_upload(request: web.Request) -> web.Response:
        await app[RELEASE].wait()
        h = hashlib.sha256()
        n = 0
        while True:
            chunk = await request.content.read(16384)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
            await asyncio.sleep(0.001)
        return web.json_response({"bytes": n, "sha256": h.hexdigest()})

    app.router.add_post("/slow-upload", slow_upload)
    return app


def h2_buffered(proxy: Proxy) -> int:
    """Bytes the proxy holds for its HTTP/2 connections: client transports' write buffers,
    response bytes waiting for a window, received DATA not yet acknowledged, and the
    backend connections' write buffers (the request bodies on their way)."""
    total = 0
    for conn in h2_connections(proxy):
        total += conn.transport.get_write_buffer_size()
        for s in conn.streams.values():
            total += sum(map(len, s.out)) + s.unacked
            ex = s.exchange
            up = ex.dispatch.up if ex is not None else None
            if up is not None and not up.transport.is_closing():
                total += up.transport.get_write_buffer_size()
    return total


async def sample(proxy: Proxy, stop: asyncio.Event) -> int:
    peak = 0
    while not stop.is_set():
        peak = max(peak, h2_buffered(proxy))
        await asyncio.sleep(0.002)
    return peak


async def test_large_upload_to_a_slow_backend_is_flow_controlled(make_backend, make_proxy, cert):
    a: Backend = await make_backend("A", app=slow_app)
    proxy = await make_proxy(h2_doc([a.address], cert))
    block = bytes(range(256)) * 256  # 64 KiB
    total = 8 * 1024 * 1024

    async def body():  # type: ignore[no-untyped-def]
        for _ in range(total // len(block)):
            yield block

    sent = 0

    async def counted():  # type: ignore[no-untyped-def]
        nonlocal sent
        async for piece in body():
            sent += len(piece)
            yield piece

    async with httpx.AsyncClient(
        http2=True, verify=ssl.create_default_context(cafile=cert[0]), timeout=60
    ) as client:
        upload = asyncio.get_running_loop().create_task(
            client.post(url(proxy, "/slow-upload"), content=counted())
        )
        # The backend reads nothing yet: the client must come to a stop, held by the windows
        # the proxy no longer opens.
        await wait_for(lambda: unacked(proxy) > 0, what="the proxy to hold back acknowledgements")
        before = -1
        while sent != before:
            before = sent
            await asyncio.sleep(0.3)
        # What the client sent went into the kernel's socket buffers (toward the backend,
        # several MiB on loopback) and at most about a stream window and the backend
        # transport's high-water mark into the proxy; 7 MiB without flow control.
        held = h2_buffered(proxy)
        assert held < 512 * 1024, held
        a.app[RELEASE].set()
        r = await upload
    assert r.http_version == "HTTP/2" and r.status_code == 200
    expected = hashlib.sha256(block * (total // len(block))).hexdigest()
    assert r.json() == {"bytes": total, "sha256": expected}


def unacked(proxy: Proxy) -> int:
    return sum(s.unacked for c in h2_connections(proxy) for s in c.streams.values())


async def test_a_small_response_ends_in_its_data_frame(make_backend, make_proxy, cert):
    """The body's last bytes carry END_STREAM when the response ends in the same turn of the
    loop: HEADERS and one DATA frame, no empty DATA frame to end the stream (issue 24: a
    frame's h2 work is a measurable part of a request); the proxy's own answers too."""
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert, limits={"requests_per_second": 1}))
    addr = proxy.listeners.address("secure")
    c = await RawH2.connect(addr.host, addr.port, cert[0])
    for status in ("200", "429"):  # the backend's answer, then the proxy's own
        sid = c.request("/whoami")
        frames = []
        while not frames or "END_STREAM" not in frames[-1].flags:
            f = await c.frame()
            assert f is not None
            if f.stream_id == sid:
                frames.append(f)
        assert [type(f) for f in frames] == [HeadersFrame, DataFrame], frames
        assert c.decode(frames[0])[":status"] == status
        assert frames[1].data and "END_STREAM" in frames[1].flags
    c.close()


async def test_response_heads_use_no_dynamic_table(make_backend, make_proxy, cert):
    """Response heads are coded without HPACK's dynamic table (``wire.hpack_static``): the
    first block sets the client's table to 0, every field is a static-table index or a
    literal, so the client's table stays empty and the same head codes to the same bytes
    every time (h2's own encoder indexed the fields: the table would hold them); a client that
    lowers SETTINGS_HEADER_TABLE_SIZE to 0 and allows no table at all decodes them too."""
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    addr = proxy.listeners.address("secure")

    async def heads(c: RawH2) -> list[tuple[bytes, dict[str, str]]]:
        out = []
        for _ in range(3):
            sid = c.request("/whoami")
            while True:
                f = await c.frame()
                assert f is not None
                if f.stream_id == sid and isinstance(f, HeadersFrame):
                    out.append((f.data, c.decode(f)))
                    break
        return out

    c = await RawH2.connect(addr.host, addr.port, cert[0])
    got = await heads(c)
    assert all(h[":status"] == "200" and "content-type" in h for _, h in got), got
    assert len(c.dec.header_table.dynamic_entries) == 0
    assert got[0][0][0] == 0x20  # a dynamic table size update to 0, then the fields
    (b1, h1), (b2, h2) = got[1:]
    assert h1 != h2 or b1 == b2  # the same head (the date may have moved on), the same bytes
    c.close()

    strict = await RawH2.connect(addr.host, addr.port, cert[0], settings={1: 0})
    strict.dec.max_allowed_table_size = 0  # an indexed field would be a decoding error
    assert all(h[":status"] == "200" for _, h in await heads(strict))
    strict.close()


async def test_large_download_to_a_client_that_stops_reading_is_flow_controlled(
    make_backend, make_proxy, cert
):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    total = 16 * 1024 * 1024
    addr = proxy.listeners.address("secure")
    c = await RawH2.connect(addr.host, addr.port, cert[0])
    sid = c.request(f"/download/{total}?chunked=1")
    got = bytearray()
    # The client opens no window: the proxy sends 65535 bytes (the initial window), then
    # must pause the backend.
    while len(got) < 65535:
        f = await c.frame()
        assert f is not None
        if f.stream_id == sid and hasattr(f, "flow_controlled_length") and f.type == 0:
            got += f.data
    assert len(got) == 65535
    stop = asyncio.Event()
    sampler = asyncio.get_running_loop().create_task(sample(proxy, stop))
    # The backend writing 16 MiB fills whatever it can until the proxy pauses it (the event);
    # then a little longer, sampling, for anything that still piles up.
    await wait_for(
        lambda: any(s.write_paused for s in h2_connections(proxy)[0].streams.values()),
        15,
        "the backend to be paused",
    )
    await asyncio.sleep(0.2)
    stop.set()
    peak = await sampler
    assert peak < 2 * 1024 * 1024, peak
    (stream,) = h2_connections(proxy)[0].streams.values()
    assert stream.write_paused  # the backend is paused for it
    c.window_update(0, len(got))
    c.window_update(sid, len(got))
    _, rest = await c.response(sid, timeout=60)
    got += rest
    assert len(got) == total
    assert bytes(got) == (bytes(range(256)) * 256 * (total // 65536 + 1))[:total]
    c.close()


async def test_settings_limit_streams_and_never_offer_extended_connect(
    make_backend, make_proxy, cert
):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    addr = proxy.listeners.address("secure")
    c = await RawH2.connect(addr.host, addr.port, cert[0])
    f = await c.until(SettingsFrame)
    assert f.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == MAX_CONCURRENT_STREAMS
    assert SettingsFrame.MAX_HEADER_LIST_SIZE in f.settings
    # RFC 8441 not offered (h2 sends it as 0): WebSockets go over HTTP/1.1.
    assert f.settings.get(SettingsFrame.ENABLE_CONNECT_PROTOCOL, 0) == 0
    c.close()


async def test_header_limits_answer_431_on_the_stream_or_close_an_oversized_block(
    make_backend, make_proxy, cert
):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert, max_header_size=8192))
    addr = proxy.listeners.address("secure")
    c = await RawH2.connect(addr.host, addr.port, cert[0])
    sid = c.request("/whoami", extra=(("x-big", "v" * 10000),))
    head, body = await c.response(sid)
    assert head[":status"] == "431"
    sid = c.request("/whoami")  # the connection goes on
    head, body = await c.response(sid)
    assert (head[":status"], body) == ("200", b"A")
    # Beyond SETTINGS_MAX_HEADER_LIST_SIZE: the header block is not decoded at all.
    c.request("/whoami", extra=(("x-big", "v" * 12000),))
    goaway = await c.until(GoAwayFrame)
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert await c.frame() is None
    assert [r[1] for r in a.requests] == ["/whoami"]


async def test_shutdown_sends_two_goaways_and_streams_in_flight_finish(
    make_backend, make_proxy, cert
):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    addr = proxy.listeners.address("secure")
    c = await RawH2.connect(addr.host, addr.port, cert[0])
    first = c.request("/sleep/0.5")
    await wait_for(lambda: len(a.requests) == 1, what="the backend to get the request")
    closing = asyncio.get_running_loop().create_task(proxy.close(timeout=10))
    goaway = await c.until(GoAwayFrame)
    assert (goaway.last_stream_id, goaway.error_code) == (2**31 - 1, 0)
    ping = await c.until(PingFrame)
    assert "ACK" not in ping.flags
    # Sent before the client acknowledged the PING: the proxy still takes it.
    second = c.request("/whoami")
    c.ping_ack(ping.opaque_data)
    goaway = await c.until(GoAwayFrame)
    assert (goaway.last_stream_id, goaway.error_code) == (second, 0)
    third = c.request("/whoami")  # after the final GOAWAY: refused
    done: dict[int, tuple[str, bytes]] = {}
    refused: list[int] = []
    bodies: dict[int, bytearray] = {first: bytearray(), second: bytearray()}
    status: dict[int, str] = {}
    while (f := await c.frame()) is not None:
        if isinstance(f, RstStreamFrame):
            refused.append(f.stream_id) if f.error_code == REFUSED_STREAM else None
        elif isinstance(f, HeadersFrame):
            status[f.stream_id] = c.decode(f)[":status"]
        elif isinstance(f, DataFrame):
            bodies[f.stream_id] += f.data
        if "END_STREAM" in f.flags and isinstance(f, HeadersFrame | DataFrame):
            done[f.stream_id] = (status[f.stream_id], bytes(bodies[f.stream_id]))
    # The connection closed once both streams were answered.
    assert done == {first: ("200", b"A slept"), second: ("200", b"A")}
    assert refused == [third]
    await asyncio.wait_for(closing, 10)
    assert [r[1] for r in a.requests] == ["/sleep/0.5", "/whoami"]


async def test_curl_request_in_flight_completes_across_shutdown(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    run = asyncio.get_running_loop().create_task(
        curl("--http2", "--cacert", cert[0], "-w", "\n%{http_version}", url(proxy, "/sleep/0.5"))
    )
    await wait_for(lambda: len(a.requests) == 1, what="the backend to get the request")
    await proxy.close(timeout=10)
    rc, out, err = await run
    assert rc == 0, err
    assert out.split("\n") == ["A slept", "2"]


async def test_rapid_reset_is_refused_with_goaway_and_counted(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    addr = proxy.listeners.address("secure")
    c = await RawH2.connect(addr.host, addr.port, cert[0])
    # A few resets are what browsers do (navigating away): nothing happens.
    for _ in range(10):
        c.reset(c.request("/sleep/5"))
    sid = c.request("/whoami")
    head, body = await c.response(sid)
    assert (head[":status"], body) == ("200", b"A")
    # An attacker's stream of open-and-reset pairs.
    frames = []
    for _ in range(500):
        h = c.headers_frame("/whoami")
        r = RstStreamFrame(h.stream_id)
        r.error_code = 8
        frames += [h, r]
    c.send(*frames)
    goaway = await c.until(GoAwayFrame)
    assert goaway.error_code == ENHANCE_YOUR_CALM
    while await c.frame() is not None:  # then the connection closes
        pass
    assert proxy.registry.listeners["secure"].h2_rapid_resets == 1
    # A stream opened and reset in the same read never becomes an exchange (it would be
    # counted as a 499): at most a pair split across two TLS records does. Without the two
    # passes every reset stream up to the disconnection would (over 100).
    stats = proxy.registry.listeners["secure"]
    gone = sum(n for (_, _, code), n in stats.requests.items() if code == "499")
    assert gone < 20, gone
    reg = CollectorRegistry()
    reg.register(Collector(proxy.registry))
    text = generate_latest(reg).decode()
    assert 'lbproxy_http2_rapid_reset_closes_total{listener="secure"} 1.0' in text
    assert 'lbproxy_requests_by_protocol_total{listener="secure",protocol="HTTP/2"}' in text


async def test_a_reload_turning_http2_off_applies_to_new_connections(
    make_backend, make_proxy, cert, tmp_path: Path
):
    a = await make_backend("A")
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(h2_doc([a.address], cert)))
    proxy = await make_proxy(load_config(str(path)), str(path))
    addr = proxy.listeners.address("secure")
    open_one = await RawH2.connect(addr.host, addr.port, cert[0])  # asserts h2 was chosen
    doc = h2_doc([a.address], cert, http2=False)
    path.write_text(yaml.safe_dump(doc))
    result = await proxy.reload("test")
    assert result.ok and result.changed, result.message
    _, out, err = await curl(
        "--http2", "--cacert", cert[0], "-w", "\n%{http_version}", url(proxy, "/whoami")
    )
    assert out.split("\n") == ["A", "1.1"], err
    sid = open_one.request("/whoami")  # the connection made before goes on in HTTP/2
    head, body = await open_one.response(sid)
    assert (head[":status"], body) == ("200", b"A")
    open_one.close()


async def test_shutdown_sends_the_final_goaway_even_if_the_ping_never_returns(
    make_backend, make_proxy, cert
):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    addr = proxy.listeners.address("secure")
    c = await RawH2.connect(addr.host, addr.port, cert[0])
    first = c.request("/sleep/2")
    await wait_for(lambda: len(a.requests) == 1, what="the backend to get the request")
    closing = asyncio.get_running_loop().create_task(proxy.close(timeout=10))
    goaway = await c.until(GoAwayFrame)
    assert goaway.last_stream_id == 2**31 - 1
    await c.until(PingFrame)  # never acknowledged
    goaway = await c.until(GoAwayFrame)  # after GOAWAY_GRACE
    assert (goaway.last_stream_id, goaway.error_code) == (first, 0)
    head, body = await c.response(first)
    assert (head[":status"], body) == ("200", b"A slept")
    assert await c.frame() is None
    await asyncio.wait_for(closing, 10)


async def test_more_concurrent_streams_than_advertised_is_a_connection_error(
    make_backend, make_proxy, cert
):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    addr = proxy.listeners.address("secure")
    c = await RawH2.connect(addr.host, addr.port, cert[0])
    # As many streams as SETTINGS_MAX_CONCURRENT_STREAMS allows, all still open (slow
    # answers), then one more.
    c.send(*(c.headers_frame("/sleep/5") for _ in range(MAX_CONCURRENT_STREAMS)))
    await wait_for(lambda: len(a.requests) == MAX_CONCURRENT_STREAMS, timeout=20, what="requests")
    c.request("/whoami")
    goaway = await c.until(GoAwayFrame)
    assert goaway.error_code == PROTOCOL_ERROR
    while await c.frame() is not None:
        pass
    assert len(a.requests) == MAX_CONCURRENT_STREAMS  # the one too many never reached it


async def test_data_held_unacknowledged_goes_back_to_the_connection_window(
    make_backend, make_proxy, cert
):
    a: Backend = await make_backend("A", app=slow_app)  # reads nothing: never released
    proxy = await make_proxy(h2_doc([a.address], cert))
    addr = proxy.listeners.address("secure")
    c = await RawH2.connect(addr.host, addr.port, cert[0])
    sid = c.request("/slow-upload", "POST", end=False)
    block = b"x" * 16384
    # Push until the proxy holds DATA back (the backend's socket buffers are full); the
    # proxy's WINDOW_UPDATEs are not read: the client counts on the connection window only.
    for _ in range(8 * 1024 * 1024 // len(block)):
        if unacked(proxy):
            break
        c.data(sid, block)
        await c.writer.drain()
        await asyncio.sleep(0)
    await wait_for(lambda: unacked(proxy) > 0, what="the proxy to hold back acknowledgements")
    (conn,) = h2_connections(proxy)
    c.reset(sid)
    await wait_for(lambda: not conn.streams, what="the stream to end")
    window = conn.h2._inbound_flow_control_window_manager
    # Every byte received is either still open in the window or processed (to be announced).
    assert window.current_window_size + window._bytes_processed == window.max_window_size
    c.close()


async def test_a_ping_flood_from_a_client_that_does_not_read_is_not_buffered(
    make_backend, make_proxy, cert
):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    addr = proxy.listeners.address("secure")
    c = await RawH2.connect(addr.host, addr.port, cert[0], rcvbuf=4096)
    await wait_for(lambda: bool(h2_connections(proxy)), what="the connection")
    (conn,) = h2_connections(proxy)
    # Small kernel buffers both ways (the kernel would otherwise take megabytes on loopback,
    # hiding what the proxy does): a client that does not read soon blocks the proxy's writes.
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    ping = PingFrame(0)
    ping.opaque_data = b"flooding"
    frame = ping.serialize()
    c.writer.write(frame * 200_000)  # 3.4 MB of PINGs, 3.4 MB of answers; never read
    peak = 0

    def paused() -> bool:
        nonlocal peak
        peak = max(peak, conn.transport.get_write_buffer_size())
        return bool(conn.paused)

    # Sampled until the proxy stops reading (the event; a hang guard), then a little longer.
    await wait_for(paused, 15, "the proxy to stop reading the client")
    for _ in range(20):
        await asyncio.sleep(0.02)
        peak = max(peak, conn.transport.get_write_buffer_size())
    # Once its answers pass the transport's high-water mark (512 KiB), the client is not read
    # any more: the proxy holds about that mark and one read's answers, not 3.4 MB.
    assert conn.paused, "the proxy should have stopped reading the client"
    assert peak < 1024 * 1024, peak
    c.writer.transport.abort()
