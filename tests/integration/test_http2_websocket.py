"""WebSocket over HTTP/2 (RFC 8441, issue 24) through a live proxy over real TLS: an ``h2``
client opens extended CONNECT streams (tests/h2ws.py); backends see an ordinary HTTP/1.1
Upgrade.

- ``http2_websocket: true`` advertises SETTINGS_ENABLE_CONNECT_PROTOCOL; without it the
  setting is absent and an extended CONNECT is refused (501);
- the backend gets GET + Upgrade with a Sec-WebSocket-Key and the client's Sec-WebSocket-*
  fields; its 101 becomes the stream's 200 with the chosen subprotocol;
- bytes both ways exactly as sent: small, fragmented, large (1 MiB, many DATA frames and
  window updates) and control frames; messages and close codes counted; the access log's
  line says HTTP/2;
- a stream reset and a lost connection close the backend side; the connection's other
  streams go on;
- refusals answer the CONNECT: 503 with no server, 429 past the request rate; a message
  policy closes with 1009; shutdown sends 1001; the idle timeout closes the tunnel;
- backpressure: a backend that stops reading stops the client by its stream window.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
from typing import Any

import aiohttp
import pytest
from h2.settings import SettingCodes
from wsproto.frame_protocol import FrameProtocol, Opcode

from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from lbproxy.proxy.tunnel import Tunnel
from tests.h2ws import H2WsClient, WsStream
from tests.hardening import make_cert, openssl_available
from tests.integration.test_websocket import accept_for, frame
from tests.support import RawServer, read_request_head, wait_for

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    openssl_available()
    return make_cert(str(tmp_path_factory.mktemp("h2wscerts")), "h2ws")


def doc_for(
    backends: list[str], cert: tuple[str, str], on: bool = True, **listener: object
) -> dict[str, Any]:
    return {
        "listeners": [
            {
                "name": "secure",
                "bind": "127.0.0.1:0",
                "protocol": "https",
                "server_group": "rs1",
                "tls": {"cert": cert[0], "key": cert[1]},
                "http2_websocket": on,
                **listener,
            }
        ],
        "server_groups": {
            "rs1": {"servers": backends, "scheduler": "rr", "health_check": {"enabled": False}}
        },
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }


async def client(proxy: Proxy, cert: tuple[str, str], rcvbuf: int = 0) -> H2WsClient:
    addr = proxy.listeners.address("secure")
    return await H2WsClient.connect(addr.host, addr.port, cert[0], rcvbuf)


def tunnels(proxy: Proxy) -> list[Tunnel]:
    return [c for c in proxy.connections() if isinstance(c, Tunnel)]


class RawWsBackend:
    """A raw backend: accepts the upgrade (``protocol`` echoed), records its request head and
    every byte it reads, writes what a test queues; EOF seen is an event."""

    def __init__(self, protocol: str | None = "chat", read: bool = True) -> None:
        self.head: dict[str, str] = {}
        self.start = ""
        self.got = bytearray()
        self.changed = asyncio.Event()
        self.eof = asyncio.Event()
        self.writer: asyncio.StreamWriter | None = None
        self.ready = asyncio.Event()
        self.protocol = protocol
        self.read = read
        self.release = asyncio.Event()
        self.server = RawServer(self.handle)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.start, fields = await read_request_head(reader)
        self.head = {k.lower(): v for k, v in fields}
        extra = f"Sec-WebSocket-Protocol: {self.protocol}\r\n" if self.protocol else ""
        writer.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: "
                f"{accept_for(self.head['sec-websocket-key'])}\r\n{extra}\r\n"
            ).encode()
        )
        self.writer = writer
        self.ready.set()
        if not self.read:
            await self.release.wait()
        while True:
            data = await reader.read(65536)
            if not data:
                break
            self.got += data
            self.changed.set()
        self.eof.set()

    async def until(self, n: int) -> bytes:
        while len(self.got) < n:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)
        return bytes(self.got[:n])


# ------------------------------------------------------------------ the setting, the handshake


async def test_setting_advertised_only_with_the_option(make_backend, make_proxy, cert):
    a = await make_backend("A")
    off = await make_proxy(doc_for([a.address], cert, on=False))
    c = await client(off, cert)
    assert not c.connect_protocol
    s = c.open("/ws")
    head = await asyncio.wait_for(s.head, 10)
    assert head[":status"] == "501"  # an extended CONNECT the listener did not offer
    await c.close()
    on = await make_proxy(doc_for([a.address], cert))
    c = await client(on, cert)
    assert c.connect_protocol
    # Any other :protocol is refused on the stream, the connection goes on.
    other = c.open("/x", protocol="webtransport")
    assert (await asyncio.wait_for(other.head, 10))[":status"] == "501"
    ws = await c.websocket("/ws")  # and a WebSocket on the same connection works
    await c.send(ws, frame(0x1, b"hi"))
    assert await c.recv(ws, 4) == b"\x81\x02hi"
    await c.close()


async def test_a_reload_turning_it_off_keeps_it_on_the_connections_that_offered_it(
    make_backend, make_proxy, cert
):
    """The setting is the connection's (advertised once, RFC 8441 3): after a reload turns
    ``http2_websocket`` off, a connection that offered it still takes WebSockets; a new one
    is not offered it."""
    a = await make_backend("A")
    proxy = await make_proxy(doc_for([a.address], cert))
    old = await client(proxy, cert)
    assert old.connect_protocol
    result = await proxy.apply_config(parse_config(doc_for([a.address], cert, on=False)), "test")
    assert result.ok and result.changed
    ws = await old.websocket("/ws")  # not 501
    codec = FrameProtocol(client=True, extensions=[])
    await old.send(ws, codec.send_data("whoami", fin=True))
    assert (await messages(old, ws, codec, 1))[0][1] == "A"
    new = await client(proxy, cert)
    assert not new.connect_protocol
    assert (await asyncio.wait_for(new.open("/ws").head, 10))[":status"] == "501"
    await old.close()
    await new.close()


async def test_backend_sees_an_http1_upgrade_and_bytes_pass_exactly(make_proxy, cert, tmp_path):
    backend = RawWsBackend()
    await backend.server.start()
    log_path = tmp_path / "access.log"
    doc = doc_for([backend.server.address], cert)
    doc["access_log"] = {"enabled": True, "format": "json", "path": str(log_path)}
    proxy = await make_proxy(doc)
    c = await client(proxy, cert)
    ws = c.open("/chat?room=1", (("sec-websocket-protocol", "chat, superchat"),))
    head = await asyncio.wait_for(ws.head, 10)
    assert head[":status"] == "200"
    assert head["sec-websocket-protocol"] == "chat"
    assert "sec-websocket-accept" not in head and "upgrade" not in head
    await backend.ready.wait()
    assert backend.start == "GET /chat?room=1 HTTP/1.1"
    h = backend.head
    assert h["upgrade"] == "websocket" and h["connection"].lower() == "upgrade"
    assert len(h["sec-websocket-key"]) == 24 and h["sec-websocket-version"] == "13"
    assert h["sec-websocket-protocol"] == "chat, superchat" and h["host"] == "localhost"
    assert h["x-forwarded-proto"] == "https"

    # Client to server: a text, a fragmented message, a ping, 1 MiB, a close (masked).
    big = os.urandom(MiB)
    out = (
        frame(0x1, b"hello")
        + frame(0x1, b"frag-", fin=False)
        + frame(0x0, b"ment", fin=False)
        + frame(0x0, b"ed", fin=True)
        + frame(0x9, b"ping!")
        + frame(0x2, big, mask=b"\xaa\xbb\xcc\xdd")
    )
    await c.send(ws, out[:7])  # a frame cut across DATA frames too
    await c.send(ws, out[7:])
    assert await backend.until(len(out)) == out
    # Server to client: the same shapes unmasked, plus a 64 KiB one.
    back = (
        frame(0x1, b"world", mask=None)
        + frame(0x2, b"a" * 70000, fin=False, mask=None)
        + frame(0x0, b"b", mask=None)
        + frame(0xA, b"pong", mask=None)
        + frame(0x2, big, mask=None)
    )
    assert backend.writer is not None
    backend.writer.write(back)
    assert await c.recv(ws, len(back)) == back
    # The close handshake: the client's close, the server's answer and its FIN.
    close = frame(0x8, b"\x03\xe8bye")
    await c.send(ws, close)
    assert await backend.until(len(out) + len(close)) == out + close
    backend.writer.write(frame(0x8, b"\x03\xe8", mask=None))
    backend.writer.close()
    assert await c.recv(ws, 4) == b"\x88\x02\x03\xe8"
    await c.wait_end(ws)
    assert ws.ended
    c.end(ws)
    stats = proxy.registry.listeners["secure"]
    await wait_for(lambda: not tunnels(proxy), what="the tunnel to close")
    assert stats.ws_messages_in == 3 and stats.ws_messages_out == 3
    assert stats.ws_close_codes.get(("client", "1000")) == 1
    assert stats.protocols.get("HTTP/2", 0) >= 1
    proxy.access.close()
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    ws_lines = [x for x in lines if x["type"] == "websocket"]
    assert len(ws_lines) == 1, lines
    line = ws_lines[0]
    assert (line["protocol"], line["status"], line["path"]) == ("HTTP/2", 200, "/chat?room=1")
    assert line["bytes_in"] == len(out) + len(close)
    assert line["bytes_out"] == len(back) + 4
    assert (line["messages_in"], line["messages_out"], line["close_code"]) == (3, 3, "1000")
    await c.close()
    await backend.server.stop()


async def test_aiohttp_backend_echo_through_wsproto_frames(make_backend, make_proxy, cert):
    """A real WebSocket server (aiohttp) and a real frame codec (wsproto) on the client:
    several sockets on one HTTP/2 connection, spread over both backends."""
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(doc_for([a.address, b.address], cert))
    c = await client(proxy, cert)
    names = set()
    for _ in range(2):
        ws = await c.websocket("/ws", (("sec-websocket-protocol", "chat"),))
        codec = FrameProtocol(client=True, extensions=[])
        await c.send(ws, codec.send_data("whoami", fin=True))
        await c.send(ws, codec.send_data(b"\x00" * 200_000, fin=True))
        got = await messages(c, ws, codec, 2)
        names.add(got[0][1])
        assert got[0][0] == Opcode.TEXT
        assert got[1] == (Opcode.BINARY, b"\x00" * 200_000)
    assert names == {"A", "B"}
    assert len(tunnels(proxy)) == 2
    assert len([x for x in proxy.connections() if not isinstance(x, Tunnel)]) == 1
    await c.close()
    await wait_for(lambda: not tunnels(proxy), what="the tunnels to close with the connection")


async def messages(
    c: H2WsClient, ws: WsStream, codec: FrameProtocol, n: int
) -> list[tuple[Opcode, Any]]:
    """The next ``n`` whole messages on ``ws``, decoded by wsproto."""
    out: list[tuple[Opcode, Any]] = []
    opcode: Opcode | None = None
    parts: list[Any] = []
    while len(out) < n:
        while not ws.buf:
            ws.changed.clear()
            await asyncio.wait_for(ws.changed.wait(), 10)
        codec.receive_bytes(await c.recv(ws, len(ws.buf)))
        for f in codec.received_frames():
            if f.opcode != Opcode.CONTINUATION:
                opcode = f.opcode
            parts.append(f.payload)
            if f.message_finished:
                assert opcode is not None
                out.append((opcode, parts[0][:0].join(parts)))
                parts = []
    return out


async def test_sticky_cookie_pins_the_websocket_stream(make_backend, make_proxy, cert):
    """The session's cookie on the CONNECT picks the server, as on an HTTP/1.1 upgrade."""
    a = await make_backend("A")
    b = await make_backend("B")
    doc = doc_for([a.address, b.address], cert)
    doc["server_groups"]["rs1"]["sticky_session"] = {"type": "insert"}
    proxy = await make_proxy(doc)
    tokens = {x: proxy.state.servers[f"rs1/{y.address}"].token for x, y in (("A", a), ("B", b))}
    c = await client(proxy, cert)
    seen = []
    order = ("B", "B", "A", "A", "B")  # not what round robin alone would give
    for name in order:
        ws = await c.websocket("/ws", (("cookie", f"SERVERID={tokens[name]}"),))
        codec = FrameProtocol(client=True, extensions=[])
        await c.send(ws, codec.send_data("whoami", fin=True))
        seen.append((name, (await messages(c, ws, codec, 1))[0][1]))
    assert seen == [(x, x) for x in order]
    await c.close()


async def test_a_new_websocket_gets_the_insert_cookie_on_its_200(make_backend, make_proxy, cert):
    """A WebSocket placed anew is pinned by the 200 as by an HTTP/1.1 101: the proxy's
    Set-Cookie names the server it went to (a reconnect with it lands there again)."""
    a = await make_backend("A")
    b = await make_backend("B")
    doc = doc_for([a.address, b.address], cert)
    doc["server_groups"]["rs1"]["sticky_session"] = {"type": "insert"}
    proxy = await make_proxy(doc)
    names = {proxy.state.servers[f"rs1/{y.address}"].token: x for x, y in (("A", a), ("B", b))}
    c = await client(proxy, cert)
    for _ in range(2):  # round robin: one on each server, each pinned to its own
        ws = c.open("/ws")
        head = await asyncio.wait_for(ws.head, 10)
        assert head[":status"] == "200", head
        cookie = head.get("set-cookie", "")
        assert cookie.startswith("SERVERID="), head
        token = cookie.split(";")[0].partition("=")[2]
        codec = FrameProtocol(client=True, extensions=[])
        await c.send(ws, codec.send_data("whoami", fin=True))
        assert (await messages(c, ws, codec, 1))[0][1] == names[token]
    await c.close()


# ------------------------------------------------------------------ endings


async def test_stream_reset_closes_the_backend_and_the_connection_goes_on(make_proxy, cert):
    backend = RawWsBackend(protocol=None)
    await backend.server.start()
    proxy = await make_proxy(doc_for([backend.server.address], cert))
    stats = proxy.registry.listeners["secure"]
    c = await client(proxy, cert)
    ws = await c.websocket()
    await c.send(ws, frame(0x1, b"x"))
    await backend.until(len(frame(0x1, b"x")))
    assert stats.connections_active == 2  # the HTTP/2 connection and its WebSocket
    c.reset(ws)
    await asyncio.wait_for(backend.eof.wait(), 10)
    await wait_for(lambda: not tunnels(proxy), what="the tunnel to close")
    assert stats.connections_active == 1
    assert stats.ws_closes["client"] == 1
    backend2 = RawWsBackend(protocol=None)  # the same connection opens another one
    backend.server.handler = backend2.handle
    ws2 = await c.websocket()
    await c.send(ws2, frame(0x2, b"again"))
    assert await backend2.until(len(frame(0x2, b"again"))) == frame(0x2, b"again")
    await c.close()  # the connection lost: its tunnel's backend side closes too
    await asyncio.wait_for(backend2.eof.wait(), 10)
    await wait_for(lambda: stats.connections_active == 0, what="everything to close")
    await backend.server.stop()


async def test_backend_close_ends_the_stream(make_proxy, cert):
    backend = RawWsBackend(protocol=None)
    await backend.server.start()
    proxy = await make_proxy(doc_for([backend.server.address], cert))
    c = await client(proxy, cert)
    ws = await c.websocket()
    await backend.ready.wait()
    assert backend.writer is not None
    backend.writer.write(frame(0x8, b"\x03\xe9", mask=None))
    backend.writer.write_eof()  # the server's FIN: END_STREAM, the client may still send
    assert await c.recv(ws, 4) == b"\x88\x02\x03\xe9"
    await c.wait_end(ws)
    assert ws.ended and ws.reset is None
    await c.send(ws, frame(0x8, b"\x03\xe9"), end=True)
    assert await backend.until(8) == frame(0x8, b"\x03\xe9")
    await wait_for(lambda: not tunnels(proxy), what="the tunnel to close")
    assert proxy.registry.listeners["secure"].ws_close_codes.get(("server", "1001")) == 1
    await c.close()
    await backend.server.stop()


# ------------------------------------------------------------------ refusals and policies


async def test_refusals_answer_the_connect(make_proxy, cert):
    dead = RawServer(lambda r, w: asyncio.sleep(0))
    await dead.start()
    address = dead.address
    await dead.stop()  # nothing listens there now
    doc = doc_for([address], cert, limits={"requests_per_second": 1, "burst": 1})
    proxy = await make_proxy(doc)
    c = await client(proxy, cert)
    s = c.open()
    assert (await asyncio.wait_for(s.head, 10))[":status"] == "502"  # connect refused
    s = c.open()
    head = await asyncio.wait_for(s.head, 10)
    assert head[":status"] == "429" and "retry-after" in head
    await c.close()
    assert not tunnels(proxy)


async def test_the_connection_keeps_its_client_slot(make_backend, make_proxy, cert):
    """connections_per_client counts the HTTP/2 connection once: a WebSocket stream neither
    takes another place nor gives the connection's back when it closes."""
    a = await make_backend("A")
    proxy = await make_proxy(doc_for([a.address], cert, limits={"connections_per_client": 1}))
    stats = proxy.registry.listeners["secure"]
    c = await client(proxy, cert)
    for _ in range(2):
        ws = await c.websocket()
        await c.send(ws, frame(0x1, b"whoami"))
        assert await c.recv(ws, 3) == b"\x81\x01A"
        c.reset(ws)
        await wait_for(lambda: not tunnels(proxy), what="the tunnel to close")
    with pytest.raises((ConnectionError, AssertionError, ssl.SSLError, asyncio.TimeoutError)):
        await client(proxy, cert)  # a second connection: refused, the slot is still taken
    assert stats.connections_refused["connections_per_client"] == 1
    await c.close()


async def test_no_server_is_503(make_proxy, cert):
    doc = doc_for([], cert)
    proxy = await make_proxy(doc)
    c = await client(proxy, cert)
    s = c.open()
    assert (await asyncio.wait_for(s.head, 10))[":status"] == "503"
    await c.close()


async def test_message_policy_closes_with_1009(make_proxy, cert):
    backend = RawWsBackend(protocol=None)
    await backend.server.start()
    doc = doc_for([backend.server.address], cert, websocket={"max_message_size": 100})
    proxy = await make_proxy(doc)
    c = await client(proxy, cert)
    ws = await c.websocket()
    ok = frame(0x1, b"a" * 100)
    await c.send(ws, ok + frame(0x1, b"b" * 101))
    got = await c.recv(ws, 2)
    assert got == b"\x88\x02"
    assert int.from_bytes(await c.recv(ws, 2), "big") == 1009
    # The server got the allowed frame, then a masked 1001 in place of the refused one.
    n = len(ok)
    data = await backend.until(n + 8)
    assert data[:n] == ok and data[n : n + 2] == b"\x88\x82"
    assert proxy.registry.listeners["secure"].ws_policy["max_message_size"] == 1
    await c.close()
    await backend.server.stop()


async def test_shutdown_sends_1001_on_the_stream(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(doc_for([a.address], cert))
    c = await client(proxy, cert)
    ws = await c.websocket()
    codec = FrameProtocol(client=True, extensions=[])
    await c.send(ws, codec.send_data("x", fin=True))
    assert await c.recv(ws, 3) == b"\x81\x01x"
    closing = asyncio.create_task(proxy.close(timeout=0.2))
    assert await c.recv(ws, 4) == b"\x88\x02\x03\xe9"  # 1001 Going Away
    await c.send(ws, frame(0x8, b"\x03\xe9"))  # the client answers: the tunnel closes
    await asyncio.wait_for(closing, 10)
    assert c.goaways >= 1  # the connection's own shutdown (RFC 9113 6.8)
    assert proxy.registry.listeners["secure"].ws_closes["shutdown"] == 1
    await c.close()


async def test_a_drained_server_closes_its_streams_with_the_drain_code(make_proxy, cert):
    """A removed server under a drain window: its WebSocket streams get the group's close code
    (1012), the client's WebSocket to the other server goes on."""
    first = RawWsBackend(protocol=None)
    second = RawWsBackend(protocol=None)
    await first.server.start()
    await second.server.start()
    doc = doc_for([first.server.address, second.server.address], cert)
    doc["server_groups"]["rs1"].update(drain_timeout="200ms", drain_close_code=1012)
    proxy = await make_proxy(doc)
    c = await client(proxy, cert)
    ws1 = await c.websocket()
    await wait_for(lambda: first.ready.is_set() or second.ready.is_set(), what="an upgrade")
    if second.ready.is_set():  # (whichever server the scheduler began with)
        first, second = second, first
    ws2 = await c.websocket()
    await second.ready.wait()
    doc["server_groups"]["rs1"]["servers"] = [second.server.address]
    assert (await proxy.apply_config(parse_config(doc), "test")).ok
    assert await c.recv(ws1, 4) == b"\x88\x02\x03\xf4"  # 1012 Service Restart
    close = await first.until(8)  # and a masked one to the server
    assert close[:2] == b"\x88\x82"
    await c.send(ws1, frame(0x8, b"\x03\xf4"))
    await wait_for(lambda: len(tunnels(proxy)) == 1, what="the drained tunnel to close")
    assert proxy.registry.listeners["secure"].ws_closes["drain"] == 1
    await c.send(ws2, frame(0x1, b"still"))
    assert await second.until(len(frame(0x1, b"still"))) == frame(0x1, b"still")
    await c.close()
    await first.server.stop()
    await second.server.stop()


async def test_idle_timeout_closes_the_tunnel(make_proxy, cert):
    backend = RawWsBackend(protocol=None)
    await backend.server.start()
    proxy = await make_proxy(doc_for([backend.server.address], cert, idle_timeout="300ms"))
    c = await client(proxy, cert)
    ws = await c.websocket()
    await asyncio.wait_for(backend.eof.wait(), 10)
    await c.wait_end(ws)
    assert proxy.registry.listeners["secure"].ws_closes["idle_timeout"] == 1
    await c.close()
    await backend.server.stop()


# ------------------------------------------------------------------ flow control


async def test_a_backend_that_stops_reading_stops_the_client(make_proxy, cert):
    """The backend reads nothing: the proxy holds at most its socket buffers and one stream
    window, the client's window closes, and everything arrives once the backend reads."""
    backend = RawWsBackend(protocol=None, read=False)
    await backend.server.start()
    proxy = await make_proxy(doc_for([backend.server.address], cert))
    c = await client(proxy, cert)
    ws = await c.websocket()
    payload = os.urandom(16 * MiB)  # more than loopback's socket buffers take
    data = frame(0x2, payload)
    sending = asyncio.create_task(c.send(ws, data))
    t = tunnels(proxy)[0]
    (stream,) = proxy_streams(proxy)
    carrier = stream.carrier
    # The tunnel paused reading the stream: its DATA is held unacknowledged, so the client's
    # window closes (what the kernel's socket buffers took aside).
    await wait_for(
        lambda: not carrier.reading and stream.unacked > 0,
        what="the stream to hold its WINDOW_UPDATEs",
    )
    await wait_for(
        lambda: c.h2.local_flow_control_window(ws.sid) == 0 and not sending.done(),
        what="the client's stream window to close",
    )
    assert stream.unacked <= 65535
    assert t.upstream.get_write_buffer_size() <= 4 * 65536  # paused at the high-water mark
    backend.release.set()
    await asyncio.wait_for(sending, 30)
    assert await backend.until(len(data)) == data
    await c.close()
    await backend.server.stop()


async def test_a_client_that_stops_reading_pauses_the_backend(make_proxy, cert):
    backend = RawWsBackend(protocol=None)
    await backend.server.start()
    proxy = await make_proxy(doc_for([backend.server.address], cert))
    c = await client(proxy, cert, rcvbuf=65536)
    c.ack = False  # the client's windows stay closed
    ws = await c.websocket()
    await backend.ready.wait()
    writer = backend.writer
    assert writer is not None
    data = frame(0x2, os.urandom(4 * MiB), mask=None)
    writer.write(data)
    await wait_for(lambda: len(ws.buf) >= 65535, what="one stream window delivered")
    t = tunnels(proxy)[0]
    await wait_for(lambda: not t.upstream.is_reading(), what="the backend to be paused")
    stream_out = sum(len(x) for s in proxy_streams(proxy) for x in s.out)
    assert stream_out <= 4 * 65536  # the backend is paused, not read into the proxy
    c.ack = True
    got = await c.recv(ws, len(data), timeout=30)
    assert got == data
    await c.close()
    await backend.server.stop()


async def test_a_client_paused_during_the_connect_pauses_the_tunnel(make_proxy, cert):
    """A client that stopped reading while its WebSocket's backend connect was under way (the
    backend's TLS handshake held here) had its stream marked paused with no backend to pause;
    once connected the backend must be paused all the same (its 101 waits for the client), not
    read into the proxy, and everything flows once the client reads again."""
    from lbproxy.proxy.http2 import Http2Connection, WebSocketStream

    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(*cert)
    release = asyncio.Event()
    accepted: list[asyncio.Transport] = []
    data = frame(0x2, os.urandom(16 * MiB), mask=None)
    loop = asyncio.get_running_loop()

    async def handle(sock: socket.socket, first: bool) -> None:
        if first:  # the WebSocket's connect: its TLS handshake waits (the hello in the kernel)
            await release.wait()
        reader = asyncio.StreamReader()
        proto = asyncio.StreamReaderProtocol(reader)
        transport, _ = await loop.connect_accepted_socket(lambda: proto, sock, ssl=sctx)
        accepted.append(transport)
        writer = asyncio.StreamWriter(transport, proto, reader, loop)
        _, fields = await read_request_head(reader)
        if first:
            key = {k.lower(): v for k, v in fields}["sec-websocket-key"]
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %b\r\n\r\n"
                % accept_for(key).encode()
            )
            writer.write(data)
        else:  # the download that fills the client's connection
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * MiB))
            chunk = bytes(MiB)
            for _ in range(64):
                writer.write(chunk)
                await writer.drain()

    listening = socket.create_server(("127.0.0.1", 0))
    listening.setblocking(False)
    tasks: list[asyncio.Task[None]] = []

    async def accept() -> None:
        while True:
            sock, _ = await loop.sock_accept(listening)
            tasks.append(asyncio.create_task(handle(sock, not tasks)))

    acceptor = asyncio.create_task(accept())
    address = f"127.0.0.1:{listening.getsockname()[1]}"
    doc = doc_for([address], cert, connect_timeout="60s")
    doc["server_groups"]["rs1"]["tls"] = {"verify": False}
    proxy = await make_proxy(doc)
    c = await client(proxy, cert, rcvbuf=65536)
    c.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
    c.h2.increment_flow_control_window(2**31 - 1 - 65535)  # only the socket holds it back
    ws = c.open("/ws")
    await wait_for(lambda: len(tasks) == 1, what="the WebSocket's connect")
    transport: Any = c.writer.transport  # uvloop's TLS transport: no asyncio.ReadTransport
    transport.pause_reading()  # the client stops reading
    sid = c.h2.get_next_available_stream_id()
    c.streams[sid] = WsStream(sid)
    c.h2.send_headers(
        sid,
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/big"),
         (b":authority", b"localhost")],
        end_stream=True,
    )  # fmt: skip
    c.flush()
    conn = next(x for x in proxy.connections() if isinstance(x, Http2Connection))
    await wait_for(lambda: conn.write_paused, timeout=30, what="the client's socket full")
    stream = conn.streams[ws.sid]
    assert stream.write_paused and not tunnels(proxy)  # paused, with no backend yet

    def buffered() -> int:
        return conn.transport.get_write_buffer_size() + sum(
            s.waiting_out() for s in conn.streams.values() if isinstance(s, WebSocketStream)
        )

    def backend_paused() -> bool:
        t = tunnels(proxy)
        if t:  # the 101 was read: the tunnel pauses the backend
            return not t[0].upstream.is_reading()
        # Connected while the client is behind: the backend starts paused, its 101 waits
        # (``Dispatch._attach``) until the client reads again.
        ex = stream.exchange
        up = ex.dispatch.up if ex is not None else None
        return up is not None and not up.transport.is_reading()

    before = buffered()
    release.set()

    await wait_for(
        lambda: backend_paused() or buffered() - before > 8 * MiB,
        timeout=30,
        what="the WebSocket's backend paused (or read into the proxy)",
    )
    assert backend_paused()
    # What the download left buffered aside, at most a read or two of the 16 MiB frame.
    assert buffered() - before <= MiB
    # The client reads again: the WebSocket opens and its frame comes whole.
    transport.resume_reading()
    assert (await asyncio.wait_for(ws.head, 60))[":status"] == "200"
    assert await c.recv(ws, len(data), timeout=60) == data
    await c.close()
    acceptor.cancel()
    for task in tasks:
        task.cancel()
    for t in accepted:
        t.abort()
    listening.close()


def proxy_streams(proxy: Proxy) -> list[Any]:
    from lbproxy.proxy.http2 import Http2Connection

    return [
        s
        for conn in proxy.connections()
        if isinstance(conn, Http2Connection)
        for s in conn.streams.values()
    ]


async def test_aiohttp_client_unaffected_http1_websocket_still_works(
    make_backend, make_proxy, cert
):
    """With the option on, an HTTP/1.1 WebSocket client on the same listener still works."""
    a = await make_backend("A")
    proxy = await make_proxy(doc_for([a.address], cert))
    ctx = ssl.create_default_context(cafile=cert[0])
    async with aiohttp.ClientSession() as s:
        url = f"wss://localhost:{proxy.listeners.address('secure').port}/ws"
        ws = await s.ws_connect(url, ssl=ctx)
        await ws.send_str("whoami")
        assert (await ws.receive()).data == "A"
        await ws.close()
