"""A raw HTTP/2 client for tests: frames written and read one by one (hyperframe, hpack),
so a test sees exactly what the proxy sends (GOAWAY, PING, RST_STREAM, WINDOW_UPDATE) and
can misbehave (reset streams at once, never open its window). An ``h2``-library client
would hide or refuse some of it: it moves to CLOSED on the first GOAWAY."""

from __future__ import annotations

import asyncio
import socket
import ssl

from hpack import Decoder, Encoder
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def h2_context(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["h2"])
    return ctx


class RawH2:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.enc = Encoder()
        self.dec = Decoder()
        self.next_id = 1

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        cafile: str,
        settings: dict[int, int] | None = None,
        rcvbuf: int = 0,
    ) -> RawH2:
        """``rcvbuf``: a small socket receive buffer, so that a client that stops reading
        soon stops the proxy's writes too (instead of the kernel taking megabytes)."""
        sock = socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=h2_context(cafile), server_hostname="localhost", limit=rcvbuf or 65536
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "h2"
        c = cls(reader, writer)
        f = SettingsFrame(0)
        for k, v in (settings or {}).items():
            f.settings[k] = v
        writer.write(PREFACE + f.serialize())
        return c

    def send(self, *frames: Frame) -> None:
        self.writer.write(b"".join(f.serialize() for f in frames))

    def headers_frame(
        self, path: str, method: str = "GET", end: bool = True, extra: tuple = ()
    ) -> HeadersFrame:
        sid = self.next_id
        self.next_id += 2
        f = HeadersFrame(sid)
        f.data = self.enc.encode(
            [(":method", method), (":scheme", "https"), (":authority", "localhost"),
             (":path", path), *extra]
        )  # fmt: skip
        f.flags.add("END_HEADERS")
        if end:
            f.flags.add("END_STREAM")
        return f

    def request(self, path: str, method: str = "GET", end: bool = True, extra: tuple = ()) -> int:
        f = self.headers_frame(path, method, end, extra)
        self.send(f)
        return f.stream_id

    def data(self, sid: int, data: bytes, end: bool = False) -> None:
        f = DataFrame(sid)
        f.data = data
        if end:
            f.flags.add("END_STREAM")
        self.send(f)

    def reset(self, sid: int, code: int = 8) -> None:  # 8: CANCEL
        f = RstStreamFrame(sid)
        f.error_code = code
        self.send(f)

    def window_update(self, sid: int, n: int) -> None:
        f = WindowUpdateFrame(sid)
        f.window_increment = n
        self.send(f)

    def ping_ack(self, opaque: bytes) -> None:
        f = PingFrame(0)
        f.opaque_data = opaque
        f.flags.add("ACK")
        self.send(f)

    async def frame(self, timeout: float = 10.0) -> Frame | None:
        """The next frame; None at EOF. SETTINGS from the server are acknowledged."""
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
        except asyncio.IncompleteReadError:
            return None
        f, length = Frame.parse_frame_header(memoryview(head))
        body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        f.parse_body(memoryview(body))
        if isinstance(f, SettingsFrame) and "ACK" not in f.flags:
            ack = SettingsFrame(0)
            ack.flags.add("ACK")
            self.send(ack)
        return f

    def decode(self, f: HeadersFrame) -> dict[str, str]:
        return {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes)
                else v for k, v in self.dec.decode(f.data)}  # fmt: skip

    async def response(self, sid: int, timeout: float = 10.0) -> tuple[dict[str, str], bytes]:
        """Read frames until stream ``sid`` ends (acking its DATA); its head and body."""
        head: dict[str, str] = {}
        body = bytearray()
        while True:
            f = await self.frame(timeout)
            assert f is not None, "connection closed before the response ended"
            if f.stream_id != sid:
                continue
            if isinstance(f, HeadersFrame):
                head = self.decode(f)
            elif isinstance(f, DataFrame):
                body += f.data
                if f.flow_controlled_length:
                    self.window_update(0, f.flow_controlled_length)
                    self.window_update(sid, f.flow_controlled_length)
            elif isinstance(f, RstStreamFrame):
                raise AssertionError(f"stream {sid} reset: {f.error_code}")
            if "END_STREAM" in f.flags:
                return head, bytes(body)

    async def until(self, kind: type[Frame], timeout: float = 10.0) -> Frame:
        while True:
            f = await self.frame(timeout)
            assert f is not None, f"connection closed before a {kind.__name__}"
            if isinstance(f, kind):
                return f

    def close(self) -> None:
        self.writer.close()


__all__ = ["GoAwayFrame", "PingFrame", "RawH2", "RstStreamFrame", "h2_context"]
