"""The WebSocket tunnel: two transports joined after a 101, and what the proxy may add to it.

Owns the data path of every upgraded (WebSocket) connection. Bytes are written to the other side as
they arrive, never decoded or re-framed, so subprotocols, permessage-deflate, fragments,
ping/pong and close codes pass byte for byte. Backpressure is the transports' own: when one
side's write buffer passes its high-water mark, reading from the other side pauses until it
drains, so a fast sender cannot grow the proxy's memory.

Under ``max_message_size`` no extension is negotiated, as a compressed frame's length would not
be its message's size: ``headers`` drops the client's offer, ``exchange`` refuses a 101
accepting one, and ``TunnelBase.police`` a client frame using one (RSV bits set).

The tunnel also follows WebSocket frame *headers* in both directions (its two
``tunnel_end.End``s, one a side, on ``wsframes``):
payloads are skipped by length, never unmasked or copied, and what is forwarded is exactly
what was read. Knowing where frames begin lets it count messages and close codes and, to
drain or shut down, put a close frame between two frames (never inside one) toward each
side, then wait briefly for the close handshake. Only ``Upgrade: websocket`` is tunneled:
any other Upgrade header is removed on the way to the backend (as hop-by-hop), which also
keeps h2c smuggling out.

No task and no timer per tunnel: two small Protocol objects. Per chunk the work is a write,
one clock read, an integer comparison and an addition; a frame header is parsed only where a
frame starts. Idle tunnels are found by ``IdleSweeper``, one timer for all of a process's
tunnels (a timer handle each would cost about 200 bytes per tunnel): it looks at every
tunnel's last activity a few times per idle timeout, so a tunnel closes within a quarter of
its idle timeout (at most a second) after it expired.

Timeouts come from the snapshot the tunnel started with and never change after (a reload
does not touch open tunnels); the close-handshake bounds come from ``config``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final

from ..config.model import WS_CLOSE_FRAME_WAIT, WS_CLOSE_HANDSHAKE_TIMEOUT
from ..core.metrics import close_class
from ..wire.wsframes import MESSAGE_TOO_BIG, POLICY_VIOLATION, close_frame
from .tunnel_end import End, TunnelBase

if TYPE_CHECKING:
    from ..config.sections import WebSocketPolicy
    from ..core.metrics import ListenerStats
    from ..core.snapshot import ServerState
    from .access_log import AccessLog
    from .edge import Slot
    from .shaping import Bandwidth

log = logging.getLogger("lbproxy.proxy.tunnel")

# How often IdleSweeper looks: a quarter of the shortest idle timeout, within these bounds.
SWEEP_MIN: Final = 0.05
SWEEP_MAX: Final = 1.0
# Tunnel.closes: which sides' close frames have passed.
_CLIENT_CLOSED: Final = 1
_SERVER_CLOSED: Final = 2


class Tunnel(TunnelBase):
    """An established WebSocket connection between a client and a server: opened, closed
    (by a side, the proxy or the idle sweep, with the close handshake where the proxy asks
    for it) and accounted for; what its two ``End``s share is ``TunnelBase``'s."""

    __slots__ = (
        "access",
        "client_addr",
        "close_code",
        "close_side",
        "closes",
        "ending",
        "eofs",
        "first_closer",
        "group",
        "idle",
        "injected",
        "method_path",
        "on_close",
        "reason",
        "server",
        "slot",
        "started",
        "timer",
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
        method_path: tuple[str, str] | None,
        access: AccessLog,
        slot: Slot | None = None,
        on_close: Any = None,
        policy: WebSocketPolicy | None = None,
        shapers: Bandwidth | None = None,
        protocol: str = "HTTP/1.1",
    ) -> None:
        super().__init__(loop, client, upstream, listener, policy, shapers)
        self.protocol = protocol  # the client's, for the access log ("HTTP/2": RFC 8441)
        self.group = group
        self.server = server
        self.idle = idle_timeout
        self.client_addr = client_addr
        self.method_path = method_path
        self.access = access
        self.slot = slot  # the client's place in connections_per_client, given back at close
        self.on_close = on_close
        # From the monotonic clock, not the loop's (uvloop's moves in whole milliseconds):
        # a drain closes the oldest first, and tunnels opened within one millisecond would
        # tie and go in the order of a set.
        self.started = time.monotonic()
        self.eofs = 0
        self.first_closer: str | None = None
        self.reason: str | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.close_side: str | None = None  # who sent the first close frame
        self.close_code: int | None = None  # and its code (None: a close frame without one)
        self.ending: str | None = None  # why the proxy is closing it ("drain", "shutdown")
        self.injected = 0  # close frames the proxy has written so far (0..2)
        self.closes = 0  # close frames passed on: _CLIENT_CLOSED | _SERVER_CLOSED

    def start(self, client_pending: bytes, upstream_pending: bytes, client_full: bool) -> None:
        """Hand both transports to the tunnel and flush what arrived with the handshake.
        ``client_full``: the client's transport is paused for writing already (behind on an
        earlier response); only its resume will come, to the tunnel."""
        client, upstream = self.client, self.upstream
        ends = self.ends = (End(self, upstream, True), End(self, client, False))
        ends[1].blocked = client_full
        client.set_protocol(ends[0])
        upstream.set_protocol(ends[1])
        self.listener.live.add(self)
        self.server.stats.ws_opened(self.listener.name)
        client_end, server_end = ends
        # The first bytes go through the same path as every later read: frames that came
        # with the handshake are followed and counted like the rest.
        if upstream_pending:
            server_end.data_received(upstream_pending)
        if client_pending:
            client_end.data_received(client_pending)
        if not client_end.capped:
            client.resume_reading()
        if not server_end.capped and not server_end.blocked:
            upstream.resume_reading()

    def live_bytes(self) -> tuple[int, int]:
        return self.bytes_in, self.bytes_out

    def live_messages(self) -> tuple[str, int, int]:
        m_in, m_out = self.messages()
        return self.server.id, m_in, m_out

    def messages(self) -> tuple[int, int]:
        """Data messages passed on: (client to server, server to client)."""
        ends = self.ends
        if ends is None:
            return 0, 0
        return ends[0].messages, ends[1].messages

    # ------------------------------------------------------------------ frame events
    def count_close(self, side: str, code: int | None) -> None:
        """A close frame passed (or the proxy sent its own): count it, remember the first."""
        self.listener.count_ws_close_code(side, code)
        if side == "client":
            self.closes |= _CLIENT_CLOSED
        elif side == "server":
            self.closes |= _SERVER_CLOSED
        if self.close_side is None:
            self.close_side = side
            self.close_code = code

    def refuse(self, code: int) -> None:
        """The client broke the policy: ``code`` to it (at the next frame boundary of the
        stream to it), 1001 to the server (already sent, in place of the refused frame)."""
        if code == MESSAGE_TOO_BIG:
            self.listener.count_ws_policy("max_message_size")
        elif code == POLICY_VIOLATION:
            self.listener.count_ws_policy("messages_per_second")
        else:
            self.listener.count_ws_policy("extension")
        self.ending = "policy"
        self.count_close("proxy", code)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(WS_CLOSE_FRAME_WAIT, self.close, "policy")
        ends = self.ends
        assert ends is not None
        ends[1].inject(close_frame(code, masked=False))

    def midway(self) -> bool:
        """A message is passing (either way): a rebalance leaves the tunnel alone for now."""
        ends = self.ends
        return ends is not None and (ends[0].midway or ends[1].midway)

    # ------------------------------------------------------------------ the proxy closes it
    def go_away(self, code: int, reason: str, client_first: bool = False) -> None:
        """Close the WebSocket cleanly: a close frame with ``code`` to each side at its next
        frame boundary, then the close handshake for at most WS_CLOSE_HANDSHAKE_TIMEOUT.
        ``reason`` ("drain", "rebalance", "shutdown") is what the tunnel's end is counted as.

        ``client_first`` (a move: rebalance, shed): the close goes to the client only; the
        client's messages keep reaching the server until the client's close frame, which the
        server's masked 1001 replaces, so nothing the client sent before it is lost."""
        if self.closed or self.ending is not None:
            return
        self.ending = reason
        ends = self.ends
        if ends is None:
            self.close(reason)
            return
        if self.timer is not None:
            self.timer.cancel()
        if self.close_side is not None:
            # A close handshake is already under way: let it finish, briefly.
            self.timer = self.loop.call_later(WS_CLOSE_HANDSHAKE_TIMEOUT, self.close, reason)
            return
        self.count_close("proxy", code)
        self.timer = self.loop.call_later(WS_CLOSE_FRAME_WAIT, self.close, reason)
        client_end, server_end = ends
        server_end.inject(close_frame(code, masked=False))  # into the stream to the client
        if client_first:
            self.client_first = True
            return
        client_end.inject(close_frame(code, masked=True))  # into the stream to the server

    def close_injected(self) -> None:
        self.injected += 1
        if self.injected == 2 and not self.closed:
            # Both close frames are out: the handshake has its own, shorter bound.
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_later(WS_CLOSE_HANDSHAKE_TIMEOUT, self.close, self.ending)

    def close_replied(self) -> None:
        ends = self.ends
        assert ends is not None
        if ends[0].replied and ends[1].replied:
            self.close(self.ending)

    # ------------------------------------------------------------------ transport events
    def side_eof(self, from_client: bool) -> bool:
        """Half-close: pass the FIN on and keep the other direction flowing until it ends;
        after a close handshake, close both. (RFC 6455 7.1.1: once a close frame has gone each
        way the WebSocket is closed and the TCP connection is to be closed, the server first:
        at the server's FIN the proxy closes both, as the client's server, instead of passing
        the FIN on and waiting for the client's. Nothing more may come either way. Not for a
        WebSocket over an HTTP/2 stream: there the FIN is the stream's END_STREAM, and closing
        the stream outright would be a reset, RFC 8441's abnormal closure.)"""
        if self.first_closer is None:
            self.first_closer = "client" if from_client else "server"
        if self.closes == _CLIENT_CLOSED | _SERVER_CLOSED and self.protocol != "HTTP/2":
            self.close(None)
            return False
        peer = self.upstream if from_client else self.client
        if peer.can_write_eof() and not peer.is_closing():
            peer.write_eof()
        self.eofs += 1
        if self.eofs >= 2:
            self.close(None)
            return False
        # A TLS side cannot stay half-open (the transport closes after a close_notify and
        # warns if asked to stay open): its connection_lost then closes the tunnel.
        own = self.client if from_client else self.upstream
        return own.can_write_eof()

    def side_lost(self, from_client: bool, exc: Exception | None) -> None:
        if self.first_closer is None:
            self.first_closer = "client" if from_client else "server"
        if exc is not None and self.reason is None and not isinstance(exc, ConnectionResetError):
            self.reason = "error"
        self.close(None)

    def shutdown(self) -> None:
        self.close("shutdown")

    def close(self, reason: str | None) -> None:
        """Close both sides (pending writes are flushed first) and account for the tunnel."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.reason = (
            reason
            or self.ending
            or self.reason
            or (self.close_side if self.close_side != "proxy" else None)
            or self.first_closer
            or "error"
        )
        self.client.close()
        self.upstream.close()
        now = time.monotonic()  # the clock of ``started``
        ls = self.listener
        ls.live.discard(self)
        ls.bytes_in += self.bytes_in
        ls.bytes_out += self.bytes_out
        ls.connections_active -= 1
        ls.count_ws_close(self.group, self.reason, now - self.started)
        server = self.server
        # The server's message and close counts, once per tunnel (not per chunk).
        m_in, m_out = self.messages()
        server.stats.ws_closed(ls.name, m_in, m_out, close_class(self.close_side, self.close_code))
        server.active -= 1
        if self.access.enabled:
            # None: the access log was off when the tunnel opened (nothing kept for it).
            method, path = self.method_path or ("-", "-")
            if self.close_side is None:
                code = "-"
            else:
                code = "none" if self.close_code is None else str(self.close_code)
            self.access.tunnel(
                client=self.client_addr,
                listener=ls.name,
                method=method,
                path=path,
                server=server.label,
                duration=now - self.started,
                bytes_in=self.bytes_in,
                bytes_out=self.bytes_out,
                reason=self.reason,
                messages_in=m_in,
                messages_out=m_out,
                close_code=code,
                protocol=self.protocol,
            )
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        if self.on_close is not None:
            self.on_close(self)


class IdleSweeper:
    """Closes the tunnels of a process that were idle for their ``idle_timeout``, with one
    timer for all of them. Each sweep looks at every open tunnel's last activity and comes
    back after a quarter of the shortest idle timeout among them (between 50 ms and 1 s)."""

    def __init__(self, listeners: dict[str, ListenerStats]) -> None:
        self.listeners = listeners  # the registry's, by name: every open tunnel is in a ``live``
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(SWEEP_MAX, self._sweep)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        shortest = SWEEP_MAX * 4
        for ls in list(self.listeners.values()):
            for c in list(ls.live):
                if type(c) is not Tunnel or c.ending is not None or c.closed:
                    continue
                if now >= c.last + c.idle:
                    c.close("idle_timeout")
                elif c.idle < shortest:
                    shortest = c.idle
        period = min(max(shortest / 4, SWEEP_MIN), SWEEP_MAX)
        self.timer = loop.call_later(period, self._sweep)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def open_tunnels(listeners: dict[str, ListenerStats], server: ServerState) -> list[Tunnel]:
    """The open tunnels to ``server`` (for a drain: rare, so a scan rather than an index that
    would cost every tunnel a set entry)."""
    return [
        c
        for ls in listeners.values()
        for c in ls.live
        if type(c) is Tunnel and c.server is server and not c.closed
    ]
