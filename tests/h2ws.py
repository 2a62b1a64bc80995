"""A WebSocket-over-HTTP/2 client for tests (RFC 8441), on the ``h2`` package's client state
machine: it opens an extended CONNECT (``:protocol: websocket``) on a TLS connection that
chose h2, then sends and reads the stream's DATA as raw bytes, so a test builds and checks
WebSocket frames itself (byte-exact) or hands them to ``wsproto``'s frame codec.

Flow control is the client's: ``send`` waits for windows; received DATA is acknowledged as it
is read by the test (``recv``), or never (``ack=False``) to stall the proxy on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes

from tests.h2client import h2_context


class WsStream:
    """One extended CONNECT stream: its response head, the bytes received, its end."""

    def __init__(self, sid: int) -> None:
        self.sid = sid
        self.head: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
        self.buf = bytearray()
        self.unacked = 0
        self.ended = False  # END_STREAM from the proxy
        self.reset: int | None = None  # RST_STREAM's code
        self.changed = asyncio.Event()


class H2WsClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.streams: dict[int, WsStream] = {}
        self.settings = asyncio.Event()
        self.window = asyncio.Event()
        self.closed = False
        self.ack = True
        self.task: asyncio.Task[None] | None = None
        self.goaways = 0

    @classmethod
    async def connect(cls, host: str, port: int, cafile: str, rcvbuf: int = 0) -> H2WsClient:
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        ctx: ssl.SSLContext = h2_context(cafile)
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=ctx, server_hostname="localhost", limit=rcvbuf or 65536
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        c = cls(reader, writer)
        c.h2.initiate_connection()
        c.flush()
        c.task = asyncio.create_task(c._read())
        await asyncio.wait_for(c.settings.wait(), 10)
        return c

    @property
    def connect_protocol(self) -> bool:
        """Whether the server advertised SETTINGS_ENABLE_CONNECT_PROTOCOL."""
        return bool(self.h2.remote_settings.get(SettingCodes.ENABLE_CONNECT_PROTOCOL, 0))

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def _read(self) -> None:
        buf = bytearray()
        while True:
            data = await self.reader.read(65536)
            if not data:
                break
            buf += data
            data = self._without_goaway(buf)
            for ev in self.h2.receive_data(data):
                self._event(ev)
            self.flush()
        self.closed = True
        for s in self.streams.values():
            s.changed.set()
            if not s.head.done():
                s.head.set_exception(ConnectionError("connection closed"))

    def _without_goaway(self, buf: bytearray) -> bytes:
        """The whole frames in ``buf`` but GOAWAY (counted in ``goaways``): h2's state machine
        would close on the first one, while a browser finishes its streams (RFC 9113 6.8)."""
        out = bytearray()
        while len(buf) >= 9:
            size = 9 + int.from_bytes(buf[:3], "big")
            if len(buf) < size:
                break
            if buf[3] == 0x7:
                self.goaways += 1
            else:
                out += buf[:size]
            del buf[:size]
        return bytes(out)

    def _event(self, ev: object) -> None:
        if isinstance(ev, RemoteSettingsChanged):
            self.settings.set()
            self.window.set()
        elif isinstance(ev, ResponseReceived):
            s = self.streams[ev.stream_id]
            if not s.head.done():
                s.head.set_result({k.decode(): v.decode() for k, v in ev.headers})
        elif isinstance(ev, DataReceived):
            s = self.streams[ev.stream_id]
            s.buf += ev.data
            s.unacked += ev.flow_controlled_length
            if self.ack:
                self._ack(s)
            s.changed.set()
        elif isinstance(ev, StreamEnded):
            s = self.streams[ev.stream_id]
            s.ended = True
            s.changed.set()
        elif isinstance(ev, StreamReset):
            s = self.streams[ev.stream_id]
            s.reset = int(ev.error_code)
            s.changed.set()
            if not s.head.done():
                s.head.set_exception(ConnectionError(f"stream reset: {ev.error_code!r}"))
        elif isinstance(ev, WindowUpdated):
            self.window.set()
        elif isinstance(ev, ConnectionTerminated):
            self.closed = True

    def _ack(self, s: WsStream) -> None:
        if s.unacked:
            with contextlib.suppress(StreamClosedError):
                self.h2.acknowledge_received_data(s.unacked, s.sid)
            s.unacked = 0

    def open(
        self,
        path: str = "/ws",
        extra: tuple[tuple[str, str], ...] = (),
        protocol: str = "websocket",
    ) -> WsStream:
        """Send an extended CONNECT for a WebSocket (``protocol``) at ``path``."""
        sid = self.h2.get_next_available_stream_id()
        s = self.streams[sid] = WsStream(sid)
        fields = [
            (":method", "CONNECT"),
            (":protocol", protocol),
            (":scheme", "https"),
            (":path", path),
            (":authority", "localhost"),
            ("sec-websocket-version", "13"),
            *extra,
        ]
        self.h2.send_headers(sid, [(k.encode(), v.encode()) for k, v in fields])
        self.flush()
        return s

    async def websocket(self, path: str = "/ws", extra: tuple = ()) -> WsStream:
        s = self.open(path, extra)
        head = await asyncio.wait_for(s.head, 10)
        assert head[":status"] == "200", head
        return s

    async def send(self, s: WsStream, data: bytes, end: bool = False) -> None:
        """Send ``data`` on ``s`` as the windows allow (waiting for WINDOW_UPDATEs)."""
        view = memoryview(data)
        while view:
            window = min(self.h2.local_flow_control_window(s.sid), self.h2.max_outbound_frame_size)
            if window <= 0:
                self.window.clear()
                await asyncio.wait_for(self.window.wait(), 10)
                continue
            n = min(window, len(view))
            self.h2.send_data(s.sid, bytes(view[:n]))
            view = view[n:]
            self.flush()
        if end:
            self.h2.end_stream(s.sid)
            self.flush()

    def end(self, s: WsStream) -> None:
        self.h2.end_stream(s.sid)
        self.flush()

    def reset(self, s: WsStream, code: int = 8) -> None:
        self.h2.reset_stream(s.sid, code)
        self.flush()

    async def recv(self, s: WsStream, n: int, timeout: float = 10.0) -> bytes:
        """Exactly ``n`` bytes of the stream (fewer only if it ended first)."""
        while len(s.buf) < n and not s.ended and s.reset is None and not self.closed:
            if self.ack:
                self._ack(s)  # what came while not acknowledging
                self.flush()
            s.changed.clear()
            await asyncio.wait_for(s.changed.wait(), timeout)
        out = bytes(s.buf[:n])
        del s.buf[:n]
        self._ack(s)
        self.flush()
        return out

    async def wait_end(self, s: WsStream, timeout: float = 10.0) -> None:
        """Until the proxy ends or resets ``s`` (or the connection closes)."""
        while not s.ended and s.reset is None and not self.closed:
            s.changed.clear()
            await asyncio.wait_for(s.changed.wait(), timeout)

    async def close(self) -> None:
        self.writer.close()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self.task
