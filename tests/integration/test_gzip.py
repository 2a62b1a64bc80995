"""gzip through a live proxy (issue 16), with real backends and real clients:

- on: a text response to a client accepting gzip arrives compressed, chunked, without
  Content-Length, with ``Vary: Accept-Encoding`` and a weak ETag, and decompresses to the
  backend's bytes, whatever the backend's framing (Content-Length, chunked, until close);
  keep-alive goes on after it; an aiohttp client reads it transparently.
- off (the default): the same response passes byte for byte.
- every skip rule: no Accept-Encoding (Vary only), HTTP/1.0, a small body, another type,
  ``Cache-Control: no-transform``, a body the backend compressed, HEAD, 204, 304, a range
  (206 / Content-Range), and WebSockets (permessage-deflate and all) pass untouched.
- streamed: the first part reaches the client, decompressed, before the backend sends the
  rest; 64 MiB of text go through with the process's memory flat.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import zlib

import aiohttp
from aiohttp import web

from tests.support import (
    RawServer,
    RssSampler,
    backend_app,
    config_doc,
    open_proxy,
    proxy_url,
    read_request_head,
    read_response,
)

MiB = 1 << 20
PAGE = b"<p>chat message number %d, with some words in it</p>\n"
HTML = b"".join(PAGE.replace(b"%d", str(i).encode()) for i in range(200))  # ~10 KiB
GATE = web.AppKey("gate", asyncio.Event)


def words(n: int, seed: int = 1) -> bytes:
    """n bytes of text that compresses about 3x (not a repeated pattern)."""
    rng = random.Random(seed)
    vocab = [
        bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(3000)
    ]
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choices(vocab, k=1000)) + b"\n"
    return bytes(out[:n])


BLOCK = words(MiB)


def gzip_backend(name: str) -> web.Application:
    app = backend_app(name)
    app[GATE] = asyncio.Event()

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            body=HTML,
            content_type="text/html",
            charset="utf-8",
            headers={"ETag": '"v1"', "Accept-Ranges": "bytes"},
        )

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=HTML[:1000], content_type="text/html")

    async def typed(request: web.Request) -> web.Response:
        return web.Response(body=HTML, content_type=request.query["type"])

    async def no_transform(request: web.Request) -> web.Response:
        return web.Response(body=HTML, content_type="text/html",
                            headers={"Cache-Control": "public, no-transform"})  # fmt: skip

    async def precompressed(request: web.Request) -> web.Response:
        body = zlib.compress(HTML, 9, 31)
        return web.Response(body=body, content_type="text/html",
                            headers={"Content-Encoding": "gzip"})  # fmt: skip

    async def no_content(request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"Content-Type": "text/html"})

    async def not_modified(request: web.Request) -> web.Response:
        return web.Response(status=304, headers={"Content-Type": "text/html", "ETag": '"v1"'})

    async def ranged(request: web.Request) -> web.Response:
        return web.Response(status=206, body=HTML[:2000], content_type="text/html",
                            headers={"Content-Range": f"bytes 0-1999/{len(HTML)}"})  # fmt: skip

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, len(HTML), 700):
            await resp.write(HTML[i : i + 700])
        await resp.write_eof()
        return resp

    async def gated(request: web.Request) -> web.StreamResponse:
        """The first part, then the rest only once the test opens the gate."""
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"first part " * 300)
        await app[GATE].wait()
        await resp.write(b"second part " * 300)
        await resp.write_eof()
        return resp

    async def big(request: web.Request) -> web.StreamResponse:
        total = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(total // len(BLOCK)):
            await resp.write(BLOCK)
        await resp.write_eof()
        return resp

    app.router.add_route("*", "/page", page)
    app.router.add_get("/small", small)
    app.router.add_get("/typed", typed)
    app.router.add_get("/no-transform", no_transform)
    app.router.add_get("/precompressed", precompressed)
    app.router.add_get("/204", no_content)
    app.router.add_get("/304", not_modified)
    app.router.add_get("/range", ranged)
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/gated", gated)
    app.router.add_get("/big/{n}", big)
    return app


def doc(address: str) -> dict:
    d = config_doc([address], listener={"gzip": True})
    d["listeners"].append({"name": "off", "bind": "127.0.0.1:0", "server_group": "rs1"})
    return d


async def fetch(proxy, path: str, listener: str = "web", *, accept: str | None = "gzip, br",
                method: str = "GET", version: str = "1.1", extra: str = ""):  # fmt: skip
    reader, writer = await open_proxy(proxy, listener)
    ae = f"Accept-Encoding: {accept}\r\n" if accept is not None else ""
    writer.write(f"{method} {path} HTTP/{version}\r\nHost: h\r\n{ae}{extra}\r\n".encode())
    resp = await read_response(reader, method)
    writer.close()
    return resp


def gunzip(data: bytes) -> bytes:
    return zlib.decompress(data, 31)


async def test_on_compresses_text_and_off_passes_it(make_backend, make_proxy):
    a = await make_backend("A", app=gzip_backend)
    proxy = await make_proxy(doc(a.address))

    r = await fetch(proxy, "/page")
    assert r.status == 200
    assert r.header("Content-Encoding") == "gzip"
    assert r.header("Transfer-Encoding") == "chunked"
    assert r.header("Content-Length") is None
    assert r.header("Accept-Ranges") is None
    assert r.header("ETag") == 'W/"v1"'
    assert r.all("Vary") == ["Accept-Encoding"]
    assert r.header("Content-Type") == "text/html; charset=utf-8"
    assert gunzip(r.body) == HTML
    assert len(r.body) < len(HTML) / 4

    off = await fetch(proxy, "/page", "off")
    assert off.header("Content-Encoding") is None and off.header("Vary") is None
    assert off.header("Content-Length") == str(len(HTML)) and off.body == HTML
    assert off.header("ETag") == '"v1"'


async def test_every_backend_framing_and_keep_alive_after(make_backend, make_proxy):
    a = await make_backend("A", app=gzip_backend)
    proxy = await make_proxy(doc(a.address))
    reader, writer = await open_proxy(proxy)
    for path in ("/chunked", "/page", "/chunked"):  # one keep-alive connection throughout
        writer.write(f"GET {path} HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n\r\n".encode())
        r = await read_response(reader)
        assert r.header("Content-Encoding") == "gzip" and gunzip(r.body) == HTML
        assert r.header("Connection") is None
    writer.close()

    # a body framed by the backend's close
    async def close_framed(reader, writer):
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/css\r\nConnection: close\r\n\r\n")
        for i in range(0, len(HTML), 999):
            writer.write(HTML[i : i + 999])
            await writer.drain()
        writer.close()

    async with RawServer(close_framed) as raw:
        d = config_doc([raw.address], listener={"gzip": True},
                       group={"health_check": {"enabled": False}})  # fmt: skip
        p2 = await make_proxy(d)
        r = await fetch(p2, "/x")
        assert r.header("Content-Encoding") == "gzip" and r.header("Connection") == "close"
        assert gunzip(r.body) == HTML

    # a real client library decompresses it transparently
    url = f"http://{proxy.listeners.address('web')}/chunked"
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert await resp.read() == HTML


async def test_skip_rules(make_backend, make_proxy):
    a = await make_backend("A", app=gzip_backend)
    proxy = await make_proxy(doc(a.address))

    def untouched(r, body: bytes = HTML) -> None:
        assert r.header("Content-Encoding") is None, r
        assert r.body == body

    # the client does not take gzip, or speaks HTTP/1.0: as it is, but Vary says it varies
    for kwargs in ({"accept": None}, {"accept": "br, deflate"}, {"accept": "gzip;q=0"},
                   {"version": "1.0"}):  # fmt: skip
        r = await fetch(proxy, "/page", **kwargs)
        untouched(r)
        assert r.header("Vary") == "Accept-Encoding"
        assert r.header("Content-Length") == str(len(HTML))
    untouched(await fetch(proxy, "/small"), HTML[:1000])  # under gzip_min_length
    for ctype in ("image/png", "application/octet-stream", "text/event-stream"):
        untouched(await fetch(proxy, f"/typed?type={ctype}"))
    r = await fetch(proxy, "/typed?type=image/svg%2Bxml")
    assert r.header("Content-Encoding") == "gzip" and gunzip(r.body) == HTML
    untouched(await fetch(proxy, "/no-transform"))
    pre = await fetch(proxy, "/precompressed")
    assert pre.header("Content-Encoding") == "gzip" and gunzip(pre.body) == HTML  # once
    assert pre.header("Content-Length") == str(len(pre.body))
    head = await fetch(proxy, "/page", method="HEAD")
    assert head.header("Content-Length") == str(len(HTML)) and head.header("Vary") is None
    assert head.header("Content-Encoding") is None
    for path, status in (("/204", 204), ("/304", 304)):
        r = await fetch(proxy, path)
        assert r.status == status and r.header("Content-Encoding") is None
        assert r.header("Transfer-Encoding") is None and r.header("Vary") is None
    r = await fetch(proxy, "/range", extra="Range: bytes=0-1999\r\n")
    assert r.status == 206 and r.header("Content-Encoding") is None
    assert r.header("Content-Range") == f"bytes 0-1999/{len(HTML)}" and r.body == HTML[:2000]


async def test_websockets_untouched(make_backend, make_proxy):
    a = await make_backend("A", app=gzip_backend)
    proxy = await make_proxy(doc(a.address))
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"http://{proxy.listeners.address('web')}/ws", compress=15,
                                headers={"Accept-Encoding": "gzip"})  # fmt: skip
        assert ws.compress == 15  # permessage-deflate negotiated through the proxy
        assert "Content-Encoding" not in ws._response.headers
        assert "Vary" not in ws._response.headers
        text = HTML.decode()
        await ws.send_str(text)
        assert (await ws.receive()).data == text
        await ws.close()


async def test_streamed_as_it_comes(make_backend, make_proxy):
    a = await make_backend("A", app=gzip_backend)
    proxy = await make_proxy(doc(a.address))
    reader, writer = await open_proxy(proxy)
    writer.write(b"GET /gated HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head
    d = zlib.decompressobj(31)
    got = b""
    async with asyncio.timeout(15):  # a hang guard: the rest is gated
        while len(got) < len(b"first part " * 300):  # before the backend sends the rest
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            got += d.decompress((await reader.readexactly(size + 2))[:-2])
    assert got == b"first part " * 300
    a.app[GATE].set()
    rest = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            break
        rest += d.decompress((await reader.readexactly(size + 2))[:-2])
    assert rest == b"second part " * 300 and d.eof
    writer.close()


async def test_large_response_streams_with_flat_memory(make_backend, make_proxy):
    a = await make_backend("A", app=gzip_backend)
    proxy = await make_proxy(doc(a.address))
    total = 64 * MiB
    expected = hashlib.sha256()  # the body is BLOCK repeated
    for _ in range(total // len(BLOCK)):
        expected.update(BLOCK)
    reader, writer = await open_proxy(proxy)
    writer.write(f"GET /big/{total} HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"Content-Encoding: gzip" in head and b"Transfer-Encoding: chunked" in head
    d = zlib.decompressobj(31)
    h = hashlib.sha256()
    n = wire = 0
    async with RssSampler(proxy) as mem:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                break
            wire += size
            piece = d.decompress((await reader.readexactly(size + 2))[:-2])
            h.update(piece)
            n += len(piece)
    writer.close()
    assert n == total and h.hexdigest() == expected.hexdigest() and d.eof
    print(f"64 MiB -> {wire / MiB:.1f} MiB; RSS growth {mem.growth / MiB:.1f} MiB, "
          f"proxy buffers peak {mem.buffered_peak / 1024:.0f} KiB")  # fmt: skip
    assert wire < total / 2
    # Buffered whole, even compressed, it would be over 20 MiB.
    assert mem.growth < 16 * MiB
    assert mem.buffered_peak < 2 * MiB


async def test_chat_page_in_a_browser_through_gzip(tmp_path, make_backend, make_proxy):
    """The demo's chat page (HTML, CSS, JavaScript) loaded by headless chromium through a
    gzip listener: every asset arrives compressed (fewer bytes on the wire than decoded),
    and the page works: its script runs and its WebSocket connects through the proxy."""
    from backends.chat.app import make_app
    from backends.chat.bus import MemoryBus
    from tests.cdp import Chromium

    chat = await make_backend("ECS01", app=lambda name: make_app(name, MemoryBus()))
    proxy = await make_proxy(config_doc([chat.address], listener={"gzip": True}))
    async with Chromium.launch(tmp_path / "profile") as browser:
        page = await browser.page()
        await page.navigate(proxy_url(proxy, path="/"))
        async with asyncio.timeout(30):  # a hang guard: a loaded machine starts Chromium slowly
            while await page.evaluate("document.getElementById('status').dataset.state") != (
                "connected"
            ):
                await asyncio.sleep(0.05)
        sizes = await page.evaluate(
            """[...performance.getEntriesByType('navigation'),
                ...performance.getEntriesByType('resource')]
               .filter(e => e.decodedBodySize > 0)
               .map(e => [new URL(e.name).pathname, e.encodedBodySize, e.decodedBodySize])"""
        )
    paths = {p for p, _, _ in sizes}
    assert {"/", "/static/chat.js", "/static/chat.css"} <= paths, sizes
    for path, encoded, decoded in sizes:
        assert encoded < 0.6 * decoded, (path, encoded, decoded)
