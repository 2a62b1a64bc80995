"""The listener bandwidth cap through a live proxy (issue 16), measured with real clients and
a real backend: concurrent downloads, then concurrent uploads, each direction held to the
rate within 15%, shared fairly (equal transfers started together end together), while another
listener of the same proxy is not capped.

The rate is measured over the transfer's steady part (from its first MiB to its last MiB,
a second or more): at either end one socket read per connection (up to 256 KiB) may run
ahead of the cap, which over a few seconds is a few percent.
"""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from tests.support import backend_app, config_doc, open_proxy, read_response

MiB = 1 << 20
RATE = 6 * MiB  # bytes per second, each direction
CLIENTS = 3
DOWNLOAD = 4 * MiB  # each: 12 MiB in all, about 2 s at the rate
UPLOAD = 3 * MiB  # each: 9 MiB in all, about 1.5 s
EDGE = MiB  # left out of the measurement at either end

PROGRESS = web.AppKey("progress", list)


def counting_backend(name: str) -> web.Application:
    """The test backend, plus ``POST /count``: reads the body, noting (time, bytes) as they come."""
    app = backend_app(name)
    app[PROGRESS] = []

    async def count(request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
            app[PROGRESS].append((time.perf_counter(), len(chunk)))
        return web.Response(text=str(n))

    app.router.add_post("/count", count)
    return app


def steady_rate(progress: list[tuple[float, int]], total: int) -> float:
    """Bytes per second between the moments EDGE and total - EDGE bytes had arrived."""
    moved, t1, t2 = 0, None, None
    for t, n in sorted(progress):
        moved += n
        if t1 is None and moved >= EDGE:
            t1, at1 = t, moved
        if moved >= total - EDGE:
            t2, at2 = t, moved
            break
    assert t1 is not None and t2 is not None and moved == at2
    return (at2 - at1) / (t2 - t1)


def check(progress: list[tuple[float, int]], total: int, ends: list[float], start: float,
          what: str) -> None:  # fmt: skip
    rate = steady_rate(progress, total)
    elapsed = max(ends) - start
    print(f"{what}: {total / MiB:.0f} MiB in {elapsed:.2f}s, steady {rate / MiB:.2f} MiB/s")
    assert 0.85 * RATE <= rate <= 1.15 * RATE, f"{what}: {rate / MiB:.2f} MiB/s"
    # Fair: first-come would end one transfer at a third of the time.
    first = min(ends) - start
    assert first >= 0.8 * elapsed, f"{what}: one ended at {first:.2f}s of {elapsed:.2f}s"


async def download(proxy, listener: str, n: int, progress: list) -> float:
    """Download n bytes noting (time, bytes) as they arrive; the time of the last."""
    reader, writer = await open_proxy(proxy, listener)
    writer.write(f"GET /download/{n} HTTP/1.1\r\nHost: h\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {n}".encode() in head
    got = 0
    while got < n:
        chunk = await reader.read(n - got)
        assert chunk
        got += len(chunk)
        progress.append((time.perf_counter(), len(chunk)))
    writer.close()
    return time.perf_counter()


async def upload(proxy, n: int) -> float:
    reader, writer = await open_proxy(proxy, "web")
    writer.write(f"POST /count HTTP/1.1\r\nHost: h\r\nContent-Length: {n}\r\n\r\n".encode())
    block = b"u" * 65536
    for _ in range(n // len(block)):
        writer.write(block)
        await writer.drain()
    resp = await read_response(reader)
    assert resp.status == 200 and resp.body == str(n).encode()
    writer.close()
    return time.perf_counter()


async def test_downloads_and_uploads_held_to_the_rate_fairly(make_backend, make_proxy):
    a = await make_backend("A", app=counting_backend)
    doc = config_doc([a.address], listener={"bandwidth": f"{RATE // MiB}MiB/s"})
    doc["listeners"].append({"name": "free", "bind": "127.0.0.1:0", "server_group": "rs1"})
    proxy = await make_proxy(doc)

    progress: list[tuple[float, int]] = []
    start = time.perf_counter()
    ends = await asyncio.gather(
        *(download(proxy, "web", DOWNLOAD, progress) for _ in range(CLIENTS))
    )
    check(progress, CLIENTS * DOWNLOAD, ends, start, "download")

    start = time.perf_counter()
    ends = await asyncio.gather(*(upload(proxy, UPLOAD) for _ in range(CLIENTS)))
    check(a.app[PROGRESS], CLIENTS * UPLOAD, ends, start, "upload")

    # Another listener of the same proxy is not capped: the same downloads go much faster.
    start = time.perf_counter()
    ends = await asyncio.gather(*(download(proxy, "free", DOWNLOAD, []) for _ in range(CLIENTS)))
    assert CLIENTS * DOWNLOAD / (max(ends) - start) > 1.5 * RATE


async def test_websocket_tunnels_are_held_to_the_rate_too(make_backend, make_proxy):
    """Tunnels share their listener's cap: three clients streaming binary messages to an
    echo backend receive their echoes at the rate (within 15%), fairly."""
    import aiohttp

    a = await make_backend("A")
    doc = config_doc([a.address], listener={"bandwidth": f"{RATE // MiB}MiB/s"})
    proxy = await make_proxy(doc)
    addr = proxy.listeners.address("web")
    each = 4 * MiB
    block = b"w" * 65536
    progress: list[tuple[float, int]] = []

    async def stream(s: aiohttp.ClientSession) -> float:
        ws = await s.ws_connect(f"http://{addr}/ws", max_msg_size=0)

        async def send() -> None:
            for _ in range(each // len(block)):
                await ws.send_bytes(block)

        sender = asyncio.ensure_future(send())
        got = 0
        while got < each:
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.BINARY
            got += len(msg.data)
            progress.append((time.perf_counter(), len(msg.data)))
        await sender
        await ws.close()
        return time.perf_counter()

    async with aiohttp.ClientSession() as s:
        start = time.perf_counter()
        ends = await asyncio.gather(*(stream(s) for _ in range(CLIENTS)))
    check(progress, CLIENTS * each, ends, start, "websocket echo")
