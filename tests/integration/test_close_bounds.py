"""The bounds on a WebSocket close the proxy starts (drain, shutdown), against peers that
misbehave on purpose (raw sockets, frames written by hand):

- a peer that never answers the proxy's close frame is cut 2 s (``WS_CLOSE_HANDSHAKE_TIMEOUT``)
  after it got it: a silent client on drain and on shutdown, a silent server on drain;
- a frame that never ends holds the close frame toward its receiver back (nothing is put
  inside a frame): on drain the tunnel is cut 10 s (``WS_CLOSE_FRAME_WAIT``) after the
  drain reached it, on shutdown with everything else after the 2 s handshake bound.

Each is measured by the misbehaving peer itself: from the moment it read the proxy's close
frame to the moment its connection ended. Early is a bug (the bound is a minimum: lower
bounds are tight); late is what load does (upper bounds are a hang guard).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time

import aiohttp
import pytest

from lbproxy.config import WS_CLOSE_FRAME_WAIT, WS_CLOSE_HANDSHAKE_TIMEOUT, parse_config
from lbproxy.control.app import Proxy
from lbproxy.control.checker import ws_accept
from lbproxy.wire.wsframes import GOING_AWAY, close_frame
from tests.support import RawServer, config_doc, read_request_head, wait_for

NO_CHECKS = {"health_check": {"enabled": False}}
HANDSHAKE = 2.0  # README: "up to 2 s for the close handshake"
FRAME_WAIT = 10.0  # README: a frame in flight may take this long to end before the close
EARLY = 0.1  # the clocks and timer granularity: a cut this much early is still on time
LATE = 8.0  # a hang guard, not a bound: load only delays


def test_the_bounds_are_the_documented_ones() -> None:
    assert (WS_CLOSE_HANDSHAKE_TIMEOUT, WS_CLOSE_FRAME_WAIT) == (HANDSHAKE, FRAME_WAIT)


def masked(opcode: int, payload: bytes, length: int | None = None) -> bytes:
    """A client frame (FIN set); ``length`` announces more payload than is written."""
    n = len(payload) if length is None else length
    assert n < 126
    key = os.urandom(4)
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | n]) + key + body


class RawClient:
    """A WebSocket client written by hand: it answers nothing unless told."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, proxy: Proxy) -> RawClient:
        port = proxy.listeners.address("web").port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16))
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: " + key + b"\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 101 "), head
        assert b"\r\nsec-websocket-accept: " + ws_accept(key).lower() in head.lower()
        c = cls(reader, writer)
        c.writer.write(masked(0x1, b"hi"))
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"\x81\x02hi"  # the echo
        return c

    async def close_frame_then_cut(self, proxy: Proxy) -> float:
        """Read the proxy's close frame (1001), then, without answering, wait for the tunnel
        to be cut: the seconds in between."""
        frame = await asyncio.wait_for(self.reader.readexactly(4), 30)
        assert frame == close_frame(GOING_AWAY, masked=False)
        return await cut_after(proxy, self.reader, time.monotonic())


async def cut_after(proxy: Proxy, reader: asyncio.StreamReader | None, since: float) -> float:
    """Seconds from ``since`` until the proxy has closed the tunnel (its sockets closed, no
    tunnel left on the listener) and ``reader``, its silent peer, has seen the end. (The
    other peer's FIN after its close reply is passed on at once, so the end alone, seen by
    the silent peer, would not say when the proxy cut.)"""
    live = proxy.registry.listener("web").live
    if reader is not None:
        try:
            rest = await asyncio.wait_for(reader.read(), LATE + FRAME_WAIT)
            assert rest == b"", rest
        except ConnectionResetError:
            pass  # cut: as good as a FIN here
    await wait_for(lambda: not live, LATE + FRAME_WAIT, "the tunnel to be closed")
    return time.monotonic() - since


async def removed_by_reload(proxy: Proxy, doc: dict, to: str) -> None:
    """Drain the tunnels' server: a reload that replaces it with ``to``."""
    doc["server_groups"]["rs1"]["servers"] = [{"address": to}]
    assert (await proxy.apply_config(parse_config(doc), "test")).ok


def drain_doc(server: str) -> dict:
    return config_doc([server], group={**NO_CHECKS, "drain_timeout": "100ms"})


@pytest.mark.parametrize("how", ["drain", "shutdown"])
async def test_a_client_that_never_answers_the_close_is_cut_after_2s(make_backend, make_proxy, how):
    a, b = await make_backend("A"), await make_backend("B")
    doc = drain_doc(a.address)
    proxy = await make_proxy(doc)
    c = await RawClient.connect(proxy)
    if how == "drain":
        await removed_by_reload(proxy, doc, b.address)
    else:
        closing = asyncio.create_task(proxy.close(timeout=0.1))
    elapsed = await c.close_frame_then_cut(proxy)
    assert HANDSHAKE - EARLY <= elapsed < HANDSHAKE + LATE
    if how == "shutdown":
        await asyncio.wait_for(closing, 10)
    assert proxy.registry.listener("web").ws_closes[how] == 1
    c.writer.close()


async def test_a_server_that_never_answers_the_close_is_cut_after_2s(make_backend, make_proxy):
    """The client (aiohttp) answers; the server never does, nor ends the connection."""
    got: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def silent_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, fields = await read_request_head(reader)
        key = {k.lower(): v for k, v in fields}["sec-websocket-key"].encode()
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + ws_accept(key) + b"\r\n\r\n"
        )
        frame = await reader.readexactly(8)  # the proxy's masked close: 2 + 4 (key) + 2
        assert frame[:2] == b"\x88\x82", frame
        code = bytes(x ^ frame[2 + i % 4] for i, x in enumerate(frame[6:]))
        assert code == GOING_AWAY.to_bytes(2, "big")
        got.set_result(time.monotonic())
        await reader.read()  # never answers: reads (the client's FIN comes through) ...
        await release.wait()  # ... and never ends the connection itself

    b = await make_backend("B")
    async with RawServer(silent_server) as srv:
        doc = drain_doc(srv.address)
        proxy = await make_proxy(doc)
        try:
            async with aiohttp.ClientSession() as s:
                ws = await s.ws_connect(f"http://{proxy.listeners.address('web')}/ws")
                await removed_by_reload(proxy, doc, b.address)
                msg = await asyncio.wait_for(ws.receive(), 10)
                assert (msg.type, msg.data) == (aiohttp.WSMsgType.CLOSE, GOING_AWAY)
                since = await asyncio.wait_for(got, 30)
                # The client's FIN (after its close reply) reaches the silent server at once:
                # the cut is seen on the proxy's side.
                elapsed = await cut_after(proxy, None, since)
        finally:
            release.set()
        assert srv.errors == []
    assert HANDSHAKE - EARLY <= elapsed < HANDSHAKE + LATE
    assert proxy.registry.listener("web").ws_closes["drain"] == 1


@pytest.mark.parametrize(("how", "bound"), [("drain", FRAME_WAIT), ("shutdown", HANDSHAKE)])
async def test_a_frame_that_never_ends_is_cut_after_its_bound(make_backend, make_proxy, how, bound):
    """The client starts a 100-byte frame and sends 10 bytes of it: the server cannot be
    sent a close frame until it ends. The client (at a frame boundary toward it) gets its
    close frame at once, then the tunnel is cut after the bound."""
    a, b = await make_backend("A"), await make_backend("B")
    doc = drain_doc(a.address)
    proxy = await make_proxy(doc)
    c = await RawClient.connect(proxy)
    c.writer.write(masked(0x1, b"0123456789", length=100))
    await c.writer.drain()
    if how == "drain":
        await removed_by_reload(proxy, doc, b.address)
    else:
        closing = asyncio.create_task(proxy.close(timeout=0.1))
    elapsed = await c.close_frame_then_cut(proxy)
    assert bound - EARLY <= elapsed < bound + LATE
    if how == "shutdown":
        await asyncio.wait_for(closing, 10)
    assert proxy.registry.listener("web").ws_closes[how] == 1
    c.writer.close()
