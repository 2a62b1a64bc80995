"""WebSocket through a live proxy: the 101 hand-over and the byte tunnel after it.

Real aiohttp clients and backends check what a user sees (echo of every frame-length
boundary, subprotocols, permessage-deflate, close codes, ping/pong); hand-written clients
and backends check the bytes themselves, since the proxy promises to pass them through
without decoding or re-framing. The last test fills a backend that stopped reading and
checks the proxy holds only a bounded amount meanwhile and loses nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct

import aiohttp
import pytest
from aiohttp import WSMsgType

from lbproxy.proxy.tunnel import Tunnel
from tests.support import (
    RawServer,
    RssSampler,
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
NO_CHECKS = {"health_check": {"enabled": False}}
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


# ------------------------------------------------------------------ raw WebSocket tools


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def frame_head(opcode: int, n: int, *, fin: bool = True, mask: bytes | None = None) -> bytes:
    """The header of a frame with an ``n``-byte payload (RFC 6455 5.2), mask key included."""
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if mask is not None else 0
    if n <= 125:
        head = struct.pack("!BB", b0, mbit | n)
    elif n <= 0xFFFF:
        head = struct.pack("!BBH", b0, mbit | 126, n)
    else:
        head = struct.pack("!BBQ", b0, mbit | 127, n)
    return head + (mask or b"")


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bytes | None = b"\x01\x02\x03\x04"
) -> bytes:
    """One whole frame; clients mask, servers pass ``mask=None``."""
    head = frame_head(opcode, len(payload), fin=fin, mask=mask)
    return head + (payload if mask is None else xor_mask(payload, mask))


def xor_mask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    key = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


def frame_overhead(n: int, masked: bool) -> int:
    return (2 if n <= 125 else 4 if n <= 0xFFFF else 10) + (4 if masked else 0)


async def read_frame(reader: asyncio.StreamReader) -> tuple[bool, int, bytes]:
    """(fin, opcode, unmasked payload) of the next frame."""
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack("!Q", await reader.readexactly(8))
    mask = await reader.readexactly(4) if b1 & 0x80 else None
    payload = await reader.readexactly(n)
    if mask is not None:
        payload = xor_mask(payload, mask)
    return bool(b0 & 0x80), b0 & 0x0F, payload


def upgrade_request(path: str = "/ws", extra: str = "") -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: proxy.test\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
        f"{extra}\r\n"
    ).encode()


async def client_handshake(reader, writer, extra: str = "", first: bytes = b""):
    """Send an upgrade (plus ``first`` bytes in the same write), return the 101 head."""
    writer.write(upgrade_request(extra=extra) + first)
    head = await reader.readuntil(b"\r\n\r\n")
    start, fields = parse_head(head)
    assert start.startswith("HTTP/1.1 101 "), head
    assert ("Sec-WebSocket-Accept", accept_for(KEY)) in fields
    return fields


async def backend_accept(reader, writer, first: bytes = b"") -> list[tuple[str, str]]:
    """A raw backend's side of the handshake; ``first`` goes out in the same write."""
    _, fields = await read_request_head(reader)
    key = dict((k.lower(), v) for k, v in fields)["sec-websocket-key"]
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_for(key).encode() + b"\r\n\r\n" + first
    )
    await writer.drain()
    return fields


def tunnels(proxy) -> list[Tunnel]:
    return [c for c in proxy.connections() if isinstance(c, Tunnel)]


# ------------------------------------------------------------------ aiohttp end to end


SIZES = [0, 125, 126, 65535, 65536, MiB]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", ["text", "binary"])
async def test_echo_exact_at_every_length_boundary(make_backend, make_proxy, size, kind):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    if kind == "text":
        # Multi-byte UTF-8 too; the length boundary is on the encoded payload.
        text = ("héllo wörld ✓ " * (size // 10 + 1)).encode()[:size].decode("utf-8", "ignore")
        text += "x" * (size - len(text.encode()))
        payload = text.encode()
    else:
        payload = os.urandom(size)
    assert len(payload) == size
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(proxy_url(proxy, path="/ws"), compress=0, max_msg_size=0) as ws,
    ):
        [t] = tunnels(proxy)
        if kind == "text":
            await ws.send_str(text)
        else:
            await ws.send_bytes(payload)
        msg = await ws.receive(timeout=5)
        assert msg.type == (WSMsgType.TEXT if kind == "text" else WSMsgType.BINARY)
        got = msg.data.encode() if kind == "text" else msg.data
        assert got == payload
        # One frame each way, byte for byte: nothing re-framed or added by the proxy.
        assert t.bytes_in == frame_overhead(size, masked=True) + size
        assert t.bytes_out == frame_overhead(size, masked=False) + size


async def test_many_messages_both_kinds_in_order(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    msgs = [os.urandom(i * 37 % 3000) if i % 2 else f"m{i}" * (i % 50) for i in range(200)]
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(proxy_url(proxy, path="/ws"), compress=0) as ws,
    ):
        for m in msgs:  # all sent before any is read: many frames per read on the way
            await (ws.send_bytes(m) if isinstance(m, bytes) else ws.send_str(m))
        got = [(await ws.receive(timeout=5)).data for _ in msgs]
    assert got == msgs


async def test_subprotocol_negotiated_end_to_end(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(proxy_url(proxy, path="/ws"), protocols=("chat",)) as ws,
    ):
        assert ws.protocol == "chat"
        await ws.send_str("whoami")
        assert (await ws.receive(timeout=5)).data == "A"
    [(_, _, seen)] = [r for r in a.requests if r[1] == "/ws"]
    assert seen["Sec-WebSocket-Protocol"] == "chat"
    assert seen["Upgrade"] == "websocket"
    assert seen["Connection"] == "Upgrade"


async def test_permessage_deflate_negotiated_end_to_end(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    # The 101 as the client sees it carries the backend's extension answer.
    reader, writer = await open_proxy(proxy)
    fields = await client_handshake(
        reader, writer, extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"
    )
    writer.close()
    ext = dict(fields)["Sec-WebSocket-Extensions"]
    assert ext.startswith("permessage-deflate")
    # And compressed messages round-trip, compressed on the wire through the tunnel.
    text = "the same words again and again " * 32768  # ~1 MiB, very compressible
    before = set(tunnels(proxy))  # the raw one above may still be closing
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(proxy_url(proxy, path="/ws"), compress=15, max_msg_size=0) as ws,
    ):
        assert ws.compress == 15
        [t] = [t for t in tunnels(proxy) if t not in before]
        await ws.send_str(text)
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, text)
        assert 0 < t.bytes_in < len(text) // 20
        assert 0 < t.bytes_out < len(text) // 20


async def test_backend_close_code_reaches_client(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(proxy_url(proxy, path="/ws")) as ws,
    ):
        await ws.send_str("close:4001")
        msg = await ws.receive(timeout=5)
        assert msg.type == WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (4001, "bye")
    assert ws.close_code == 4001
    stats = proxy.registry.listener("web")
    await wait_for(lambda: not tunnels(proxy), what="the tunnel to close")
    assert stats.connections_active == 0


async def test_ping_pong_passes(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(proxy_url(proxy, path="/ws"), autoping=False) as ws,
    ):
        await ws.ping(b"are you there")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"are you there")


async def test_backend_ping_reaches_client_and_pong_comes_back(make_proxy):
    pong: asyncio.Future[tuple[bool, int, bytes]] = asyncio.get_running_loop().create_future()

    async def backend(reader, writer):
        await backend_accept(reader, writer)
        writer.write(frame(0x9, b"srv-ping", mask=None))
        pong.set_result(await read_frame(reader))
        _, opcode, payload = await read_frame(reader)  # the client's close: answer it
        assert opcode == 0x8
        writer.write(frame(0x8, payload[:2], mask=None))
        await reader.read()

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        async with (
            aiohttp.ClientSession() as s,
            s.ws_connect(proxy_url(proxy, path="/ws"), autoping=False) as ws,
        ):
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (WSMsgType.PING, b"srv-ping")
            await ws.pong(msg.data)
            assert await asyncio.wait_for(pong, 5) == (True, 0xA, b"srv-ping")


# ------------------------------------------------------------------ raw bytes


async def test_fragmented_message_with_interleaved_ping_echoed(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    reader, writer = await open_proxy(proxy)
    await client_handshake(reader, writer)
    for f in (
        frame(0x1, b"Hel", fin=False),
        frame(0x9, b"p"),  # a control frame between fragments is legal
        frame(0x0, b"lo ", fin=False),
        frame(0x0, "wörld".encode()),
    ):
        writer.write(f)
        await writer.drain()
    got = {await read_frame(reader), await read_frame(reader)}
    assert got == {(True, 0xA, b"p"), (True, 0x1, "Hello wörld".encode())}
    writer.write(frame(0x8, struct.pack("!H", 1000)))
    fin, opcode, payload = await read_frame(reader)
    assert (fin, opcode, payload[:2]) == (True, 0x8, struct.pack("!H", 1000))
    writer.close()


async def test_fragments_pass_byte_for_byte_both_ways(make_proxy):
    to_backend = b"".join(
        [
            frame(0x2, b"\x00" * 10, fin=False),
            frame(0x0, os.urandom(70000), fin=False),
            frame(0x0, b"", fin=False),
            frame(0x0, b"end"),
        ]
    )
    to_client = b"".join(
        [
            frame(0x1, b"fr", fin=False, mask=None),
            frame(0x0, b"ag", fin=False, mask=None),
            frame(0x0, b"ments", mask=None),
        ]
    )
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def backend(reader, writer):
        await backend_accept(reader, writer)
        for i in range(0, len(to_client), 3):  # in tiny pieces: nothing may be coalesced
            writer.write(to_client[i : i + 3])
            await writer.drain()
        received.set_result(await reader.readexactly(len(to_backend)))
        await reader.read()

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        reader, writer = await open_proxy(proxy)
        await client_handshake(reader, writer)
        for i in range(0, len(to_backend), 4099):
            writer.write(to_backend[i : i + 4099])
            await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(len(to_client)), 5) == to_client
        assert await asyncio.wait_for(received, 5) == to_backend
        writer.close()


async def test_the_servers_fin_after_a_close_handshake_closes_the_tunnel(make_proxy):
    """RFC 6455 7.1.1: once a close frame has gone each way the WebSocket is closed, and the
    server closes the TCP connection first. At the server's FIN the proxy then closes both
    connections, as the client's server, rather than passing the FIN on and keeping the
    tunnel open until the client's own (a client that never closes kept it until the idle
    timeout). A FIN before the handshake is passed on as before (the test below)."""
    backend_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def backend(reader, writer):
        await backend_accept(reader, writer)
        _, op, payload = await read_frame(reader)  # the client's close frame
        assert op == 0x8
        writer.write(frame(0x8, payload, mask=None))  # the echo that ends the handshake
        await writer.drain()
        writer.close()  # the server closes first
        backend_done.set_result(None)

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        reader, writer = await open_proxy(proxy)
        await client_handshake(reader, writer)
        writer.write(frame(0x8, struct.pack("!H", 1000)))
        _, op, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert (op, payload) == (0x8, struct.pack("!H", 1000))
        await asyncio.wait_for(backend_done, 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the proxy's FIN
        # This client never closes its side: the tunnel is gone all the same.
        await wait_for(lambda: not tunnels(proxy), timeout=5, what="the tunnel to close")
        writer.close()
        assert srv.errors == []


async def test_tunnel_is_byte_exact_for_arbitrary_bytes(make_proxy):
    """After the 101 the proxy is a pipe: not even valid frames are needed."""
    up = os.urandom(MiB + 7)
    down = os.urandom(MiB + 13)
    early_up, early_down = b"\x00client-early\xff", b"\x00backend-early\xff"
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def backend(reader, writer):
        await backend_accept(reader, writer, first=early_down)  # same write as the 101
        sender = asyncio.ensure_future(_send_pieces(writer, down, seed=1))
        received.set_result(await reader.read(-1))  # until the client's half-close
        await sender
        writer.write_eof()

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        reader, writer = await open_proxy(proxy)
        # Bytes sent right behind the upgrade request, before the 101 came back.
        await client_handshake(reader, writer, first=early_up)
        await _send_pieces(writer, up, seed=2)
        writer.write_eof()  # half-close passes through; the other direction keeps flowing
        got = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        assert await asyncio.wait_for(received, 5) == early_up + up
        assert got == early_down + down
        assert srv.errors == []


async def _send_pieces(writer, data: bytes, seed: int) -> None:
    """Write ``data`` in irregular pieces (1 byte to 100 KB)."""
    sizes = [1, 2, 100, 4096, 65535, 65537, 100_000]
    i = k = seed
    while i - seed < len(data):
        n = sizes[k % len(sizes)]
        writer.write(data[i - seed : i - seed + n])
        await writer.drain()
        i += n
        k += 1


async def test_non_101_answer_to_upgrade_passes_back_unchanged(make_proxy):
    async def backend(reader, writer):
        while True:
            await read_request_head(reader)
            writer.write(
                b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nX-Why: denied\r\n"
                b"Content-Length: 6\r\n\r\nno way"
            )
            await writer.drain()

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        reader, writer = await open_proxy(proxy)
        writer.write(upgrade_request())
        resp = await read_response(reader)
        writer.close()
        assert resp.status == 403
        assert resp.head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert (resp.header("X-Why"), resp.body) == ("denied", b"no way")
        assert resp.header("Content-Type") == "text/plain"
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(proxy_url(proxy, path="/ws"))
            assert info.value.status == 403
    assert tunnels(proxy) == []


# ------------------------------------------------------------------ backpressure


@pytest.mark.timeout(60)
async def test_backpressure_bounds_buffering_and_loses_nothing(make_proxy):
    messages = 64  # of 1 MiB each: far more than the proxy may hold
    # A valid masked binary frame; mask key 0 leaves the payload as it is.
    head = frame_head(0x2, MiB, mask=b"\0\0\0\0")
    total = messages * (len(head) + MiB)
    resume = asyncio.Event()
    result: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    async def backend(reader, writer):
        await backend_accept(reader, writer)
        await resume.wait()  # accepted the upgrade, then reads nothing for a while
        h = hashlib.sha256()
        n = 0
        while n < total:
            data = await reader.read(MiB)
            if not data:
                break
            h.update(data)
            n += len(data)
        result.set_result((n, h.hexdigest()))

    async with RawServer(backend) as srv:
        proxy = await make_proxy(config_doc([srv.address], group=NO_CHECKS))
        reader, writer = await open_proxy(proxy)
        await client_handshake(reader, writer)
        block = bytearray(os.urandom(MiB))
        sent_sha = hashlib.sha256()
        sent = 0

        async def send_fast() -> None:
            nonlocal sent
            for i in range(messages):
                block[:8] = i.to_bytes(8, "big")  # every message differs
                data = head + bytes(block)
                sent_sha.update(data)
                for j in range(0, len(data), 256 * 1024):
                    part = data[j : j + 256 * 1024]
                    writer.write(part)
                    await writer.drain()
                    sent += len(part)

        async with RssSampler(proxy) as mem:
            sender = asyncio.ensure_future(send_fast())
            history: list[int] = []

            def stalled() -> bool:
                history.append(sent)
                return sender.done() or (len(history) > 30 and history[-30] == sent)

            await wait_for(stalled, timeout=20, what="the client to be held back")
            assert not sender.done(), f"all {total} bytes were absorbed without backpressure"
            [t] = tunnels(proxy)
            assert t.upstream.get_write_buffer_size() < 4 * MiB
            assert proxy_buffered(proxy) < 4 * MiB
            assert not t.client.is_reading()  # the proxy stopped reading the fast side
        assert mem.buffered_peak < 4 * MiB, f"proxy buffered {mem.buffered_peak} bytes"
        assert mem.growth < 40 * MiB, f"RSS grew {mem.growth / MiB:.1f} MiB"
        held_back = total - sent

        resume.set()  # the backend reads again: everything arrives, in order, intact
        await asyncio.wait_for(sender, 30)
        n, digest = await asyncio.wait_for(result, 30)
        writer.close()
    assert held_back > 0
    assert (n, digest) == (total, sent_sha.hexdigest())
