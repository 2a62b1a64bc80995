"""Reading the PROXY protocol header off a freshly accepted socket (``listeners[].proxy_protocol``),
before anything else reads it.

Owns ``HeaderReader``: one per connection whose header is awaited, a reader callback on the
bare socket (no task) and one timer (the section's ``timeout``). It peeks at what arrived and
takes off the socket only bytes that are the header's (``wire.proxy_protocol.header_length``
says how many), so what follows, a TLS ClientHello or an HTTP request, stays for the front end
the socket is then handed to (``acceptor.Acceptor``). A header that is malformed, of a version
not accepted, cut by the client's close or late is a failure: the socket is closed, and the
acceptor counts it.
"""

from __future__ import annotations

import _socket
import asyncio
import socket
from collections.abc import Callable
from typing import Final

from ..wire import proxy_protocol
from ..wire.proxy_protocol import MORE, ProxyHeader, ProxyProtocolError

PEEK: Final = 4096  # bytes looked at per readiness: a v1 line, or a v2 header with its usual TLVs

# (the header, or None and why it failed)
Done = Callable[[_socket.socket, ProxyHeader | None, str], None]


class HeaderReader:
    """Waits for one accepted socket's PROXY header; calls ``done`` once, either way."""

    __slots__ = ("buf", "conn", "done", "fd", "loop", "timer", "v1", "v2")

    def __init__(
        self, conn: _socket.socket, versions: tuple[str, ...], timeout: float, done: Done
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.conn = conn
        self.fd = conn.fileno()
        self.v1 = "v1" in versions
        self.v2 = "v2" in versions
        self.done = done
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(timeout, self._late)
        self.loop.add_reader(self.fd, self._readable)

    def _readable(self) -> None:
        conn = self.conn
        try:
            data = conn.recv(PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(None, f"read failed: {exc.strerror or exc}")
            return
        if not data:
            self._finish(None, "closed before the whole PROXY header" if self.buf else "closed")
            return
        seen = self.buf + data
        try:
            n = proxy_protocol.header_length(seen, self.v1, self.v2)
        except ProxyProtocolError as exc:
            self._finish(None, str(exc))
            return
        have = len(self.buf)
        # Every byte peeked is the header's when it goes on past them: take them all and
        # wait for more (the socket has nothing else to say readable about).
        take = len(data) if n == MORE or n > len(seen) else n - have
        try:
            got = conn.recv(take)
        except OSError as exc:  # peeked bytes are there: only a reset gets here
            self._finish(None, f"read failed: {exc.strerror or exc}")
            return
        self.buf += got
        if n == MORE or len(self.buf) < n:
            return
        try:
            header = proxy_protocol.parse(self.buf)
        except ProxyProtocolError as exc:
            self._finish(None, str(exc))
            return
        self._finish(header, "")

    def cancel(self) -> None:
        """The listener closed before the header came: drop the socket, ``done`` not called."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.loop.remove_reader(self.fd)
        self.conn.close()

    def _late(self) -> None:
        self.timer = None
        self._finish(None, "no whole PROXY header in time")

    def _finish(self, header: ProxyHeader | None, why: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.loop.remove_reader(self.fd)
        self.done(self.conn, header, why)
