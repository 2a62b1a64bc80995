"""The WebSocket byte tunnel: two transports joined after a 101, with nothing in between.

Owns the data path of every upgraded connection. Bytes are written to the other side as
they arrive — never decoded or re-framed, so subprotocols, permessage-deflate, fragments,
ping/pong and close codes pass byte for byte. Backpressure is the transports' own: when one
side's write buffer passes its high-water mark, reading from the other side pauses until it
drains, so a fast sender cannot grow the proxy's memory.

No task per tunnel: two tiny Protocol objects and one timer. Per chunk the work is a write,
one clock read and an integer addition. The idle timer is lazy: it wakes at the earliest
possible expiry and re-arms itself from the last activity instead of being reset per chunk.

Timeouts come from the snapshot the tunnel started with and never change after (a reload
does not touch open tunnels).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .access_log import AccessLog
    from .metrics import ListenerStats
    from .snapshot import ServerState

log = logging.getLogger("lbproxy.tunnel")

# Bytes kept of each side's last chunk: enough to hold a whole close frame (at most 2 + 4 + 125).
_TAIL = 131


class _End(asyncio.Protocol):
    """One side of a tunnel: what arrives here is written to ``peer``."""

    __slots__ = ("is_client", "peer", "tail", "tunnel")

    def __init__(self, tunnel: Tunnel, peer: asyncio.Transport, is_client: bool) -> None:
        self.tunnel = tunnel
        self.peer = peer
        self.is_client = is_client
        self.tail = b""  # the end of the last chunk from this side (see Tunnel._initiator)

    def data_received(self, data: bytes) -> None:
        t = self.tunnel
        t.last = t.loop.time()
        n = len(data)
        if self.is_client:
            t.bytes_in += n
        else:
            t.bytes_out += n
        self.tail = data if n <= _TAIL else data[-_TAIL:]
        t.last_end = self
        self.peer.write(data)

    def eof_received(self) -> bool:
        # Half-close: pass the FIN on and keep the other direction flowing until it ends too.
        t = self.tunnel
        if t.first_closer is None:
            t.first_closer = "client" if self.is_client else "server"
        if self.peer.can_write_eof() and not self.peer.is_closing():
            self.peer.write_eof()
        t.eofs += 1
        if t.eofs >= 2:
            t.close(None)
            return False
        # A TLS side cannot stay half-open (the transport closes after a close_notify and
        # warns if asked to stay open): its connection_lost then closes the tunnel.
        own = t.client if self.is_client else t.upstream
        return own.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        t = self.tunnel
        if t.first_closer is None:
            t.first_closer = "client" if self.is_client else "server"
        if exc is not None and t.reason is None and not isinstance(exc, ConnectionResetError):
            t.reason = "error"
        t.close(None)

    # My own transport's buffer is full: stop reading from the peer until it drains.
    def pause_writing(self) -> None:
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.peer.resume_reading()


class Tunnel:
    """An established WebSocket (or any upgraded) connection between a client and a server."""

    __slots__ = (
        "access",
        "bytes_in",
        "bytes_out",
        "client",
        "client_addr",
        "closed",
        "ends",
        "eofs",
        "first_closer",
        "group",
        "idle",
        "last",
        "last_end",
        "listener",
        "loop",
        "method_path",
        "on_close",
        "reason",
        "server",
        "started",
        "timer",
        "upstream",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        *,
        listener: ListenerStats,
        group: str,
        server: ServerState,
        idle_timeout: float,
        client_addr: str,
        method_path: tuple[str, str],
        access: AccessLog,
        on_close: Any = None,
    ) -> None:
        self.loop = loop
        self.client = client
        self.upstream = upstream
        self.listener = listener
        self.group = group
        self.server = server
        self.idle = idle_timeout
        self.client_addr = client_addr
        self.method_path = method_path
        self.access = access
        self.on_close = on_close
        self.started = self.last = loop.time()
        self.bytes_in = 0
        self.bytes_out = 0
        self.eofs = 0
        self.first_closer: str | None = None
        self.reason: str | None = None
        self.closed = False
        self.timer: asyncio.TimerHandle | None = None
        self.ends: tuple[_End, _End] | None = None  # (client side, server side)
        self.last_end: _End | None = None  # the side that sent the last chunk

    def start(self, client_pending: bytes, upstream_pending: bytes) -> None:
        """Hand both transports to the tunnel and flush what arrived with the handshake."""
        client, upstream = self.client, self.upstream
        self.ends = (_End(self, upstream, True), _End(self, client, False))
        client.set_protocol(self.ends[0])
        upstream.set_protocol(self.ends[1])
        self.listener.live.add(self)
        self.server.stats.ws_opened(self.listener.name)
        if upstream_pending:
            self.bytes_out += len(upstream_pending)
            client.write(upstream_pending)
        if client_pending:
            self.bytes_in += len(client_pending)
            upstream.write(client_pending)
        client.resume_reading()
        upstream.resume_reading()
        self.timer = self.loop.call_at(self.last + self.idle, self._on_timer)

    def live_bytes(self) -> tuple[int, int]:
        return self.bytes_in, self.bytes_out

    def _on_timer(self) -> None:
        deadline = self.last + self.idle
        if self.loop.time() >= deadline:
            self.close("idle_timeout")
        else:
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def shutdown(self) -> None:
        self.close("shutdown")

    def _initiator(self) -> str | None:
        """Who started the WebSocket close handshake, if one passed through, else None.

        TCP FIN order cannot tell: after a handshake the server closes first whoever began
        (RFC 6455 section 7.1.1). Close frames are the last thing each side sends, so they
        sit at the end of each side's last chunk; the reply is the later of the two."""
        if self.ends is None:
            return None
        client, server = self.ends
        c, s = _ends_with_close(client.tail), _ends_with_close(server.tail)
        if c and s:
            return "server" if self.last_end is client else "client"
        if c or s:
            return "client" if c else "server"
        return None

    def close(self, reason: str | None) -> None:
        """Close both sides (pending writes are flushed first) and account for the tunnel."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.reason = reason or self.reason or self._initiator() or self.first_closer or "error"
        self.client.close()
        self.upstream.close()
        now = self.loop.time()
        ls = self.listener
        ls.live.discard(self)
        ls.bytes_in += self.bytes_in
        ls.bytes_out += self.bytes_out
        ls.connections_active -= 1
        ls.count_ws_close(self.group, self.reason, now - self.started)
        self.server.stats.ws_closed(ls.name)
        self.server.active -= 1
        if self.access.enabled:
            method, path = self.method_path
            self.access.tunnel(
                client=self.client_addr,
                listener=ls.name,
                method=method,
                path=path,
                server=self.server.label,
                duration=now - self.started,
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                reason=self.reason,
            )
        if self.on_close is not None:
            self.on_close(self)


def _ends_with_close(tail: bytes) -> bool:
    """True if ``tail`` ends with a whole WebSocket close frame (masked or not)."""
    n = len(tail)
    for plen in range(126):
        for size, second in ((2 + plen, plen), (6 + plen, 0x80 | plen)):
            if size <= n and tail[n - size] == 0x88 and tail[n - size + 1] == second:
                return True
    return False
