"""The client side of a WebSocket over HTTP/2 (RFC 8441): an HTTP/2 stream as the transport a
tunnel's client ``tunnel_end.End`` reads and writes (``StreamTransport``).

After the backend's 101 (the stream answered 200), the tunnel relays between the backend's
TCP transport and this one, as it does for an HTTP/1.1 client's socket: the frame walk,
policies, idle, drains, shutdown's 1001 and the accounting are the tunnel's, unchanged. What
differs is only how bytes move on the client side:

- from the client: the stream's DATA payloads go to the protocol (the tunnel's client end)
  exactly as h2 gave them; they are acknowledged (WINDOW_UPDATE) at once, or, while the
  tunnel paused reading (the backend's write buffer is full), held unacknowledged until it
  resumes: a client that sends faster than the backend reads is stopped by its stream
  window (65535 bytes at most held in the proxy).
- to the client: ``write`` sends DATA as far as the client's windows allow; the rest waits on
  the stream and the protocol is told to pause writing (the tunnel stops reading the
  backend) until WINDOW_UPDATEs drain it, or while the TLS socket itself is full.
- END_STREAM is the stream's FIN both ways (``write_eof``, ``eof_received``); ``close`` ends
  the stream once what waits is sent; a reset stream or a lost connection is the client's
  ``connection_lost`` (the tunnel then closes the backend side).

Bytes are counted once: the tunnel counts the payloads, so the connection's own counters
keep only the HTTP/2 framing around them.

What the transport needs of its stream is ``CarriedStream`` (a base of
``http2_stream.Stream``; ``http2.WebSocketStream``, its subclass, is the one that carries), so
this module does not import either back.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CarriedStream:
    """An HTTP/2 stream as its ``StreamTransport`` sees it (``http2.WebSocketStream``)."""

    def gone(self) -> bool:
        """Reset, cut or ended: nothing more goes out on it."""
        raise NotImplementedError

    def carried_in(self, n: int, size: int, ack: bool) -> None:
        """``n`` payload bytes (``size`` of the window) went to the tunnel: acknowledged now
        (``ack``) or held until ``release_held``."""
        raise NotImplementedError

    def release_held(self) -> None:
        raise NotImplementedError

    def carried_out(self, data: bytes) -> None:
        """The tunnel's bytes to the client, in DATA frames as the windows allow."""
        raise NotImplementedError

    def waiting_out(self) -> int:
        """Bytes waiting for a window."""
        raise NotImplementedError

    def end_output(self) -> None:
        raise NotImplementedError

    def end(self) -> None:
        raise NotImplementedError

    def cut(self) -> None:
        raise NotImplementedError

    def extra_info(self, name: str, default: Any) -> Any:
        """The client connection's ``get_extra_info``."""
        raise NotImplementedError


class StreamTransport(asyncio.Transport):
    """An HTTP/2 stream carrying a WebSocket, as an ``asyncio.Transport`` (see the module
    docstring). Made by ``WebSocketStream.upgrade``; the stream reports to it (``received``,
    ``ended``, ``lost``, ``writable``)."""

    def __init__(self, stream: CarriedStream) -> None:
        super().__init__()
        self.stream = stream
        self.protocol: asyncio.Protocol | None = None
        self.closing = False
        self.reading = True

    # ------------------------------------------------------------------ the stream reports
    def received(self, data: bytes, size: int) -> None:
        """A DATA frame's payload (``size``: what it took of the window, padding too)."""
        self.stream.carried_in(len(data), size, self.reading)
        protocol = self.protocol
        if protocol is not None and data and not self.closing:
            protocol.data_received(data)

    def ended(self) -> None:
        """END_STREAM from the client: its half-close."""
        protocol = self.protocol
        if protocol is None or self.closing:
            return
        if not protocol.eof_received():
            self.close()

    def lost(self) -> None:
        """The stream was reset, or the connection is gone."""
        protocol = self.protocol
        self.protocol = None
        self.closing = True
        if protocol is not None:
            protocol.connection_lost(None)

    def writable(self, ok: bool) -> None:
        """The stream's bytes wait for a window or the socket (``ok`` False), or went out."""
        protocol = self.protocol
        if protocol is None:
            return
        if ok:
            protocol.resume_writing()
        else:
            protocol.pause_writing()

    # ------------------------------------------------------------------ asyncio.Transport
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.stream.extra_info(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closing or self.stream.gone():
            return
        self.stream.carried_out(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        """END_STREAM once what waits is sent; the client may still send."""
        if not self.closing:
            self.stream.end_output()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.protocol = None
        self.stream.end()

    def abort(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.protocol = None
        self.stream.cut()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if self.reading:
            return
        self.reading = True
        self.stream.release_held()

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return self.stream.waiting_out()
