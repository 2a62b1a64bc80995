"""The WebSocket tunnel: two transports joined after a 101, and what the proxy may add to it.

Owns the data path of every upgraded (WebSocket) connection. Bytes are written to the other side as
they arrive, never decoded or re-framed, so subprotocols, permessage-deflate, fragments,
ping/pong and close codes pass byte for byte. Backpressure is the transports' own: when one
side's write buffer passes its high-water mark, reading from the other side pauses until it
drains, so a fast sender cannot grow the proxy's memory.

Under ``max_message_size`` no extension is negotiated, as a compressed frame's length would not
be its message's size: ``headers`` drops the client's offer, ``exchange`` refuses a 101
accepting one, and ``Tunnel.police`` a client frame using one (RSV bits set).

The tunnel also follows WebSocket frame *headers* in both directions (``wsframes``):
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
from typing import TYPE_CHECKING, Any

from ..config.model import WS_CLOSE_FRAME_WAIT, WS_CLOSE_HANDSHAKE_TIMEOUT
from ..wire.wsframes import (
    GOING_AWAY,
    MAX_HEADER,
    MESSAGE_TOO_BIG,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    POLICY_VIOLATION,
    PROTOCOL_ERROR,
    RSV_BITS,
    close_code,
    close_frame,
    parse_header,
)

if TYPE_CHECKING:
    from ..config.sections import WebSocketPolicy
    from ..core.metrics import ListenerStats
    from ..core.snapshot import ServerState
    from .access_log import AccessLog
    from .edge import Slot
    from .shaping import Bandwidth, Shaper

log = logging.getLogger("lbproxy.proxy.tunnel")

# How often IdleSweeper looks: a quarter of the shortest idle timeout, within these bounds.
SWEEP_MIN = 0.05
SWEEP_MAX = 1.0

# What a frame-aware side does with what it reads.
_FORWARD = 0  # pass it on
_INJECT = 1  # pass it on up to the next frame boundary, then send ``pending`` instead
_DROP = 2  # the proxy has sent its own close frame: read (for the reply), pass nothing on


class _End(asyncio.Protocol):
    """One side of a tunnel: what arrives here is written to ``peer``, frame headers followed."""

    __slots__ = (
        "blocked",
        "capped",
        "capture",
        "cmask",
        "is_client",
        "messages",
        "mode",
        "partial",
        "peer",
        "pending",
        "quick",
        "remaining",
        "replied",
        "shaper",
        "tunnel",
    )

    def __init__(self, tunnel: Tunnel, peer: asyncio.Transport, is_client: bool) -> None:
        self.tunnel = tunnel
        self.peer = peer
        self.is_client = is_client
        self.remaining = 0  # payload bytes of the current frame still to come
        self.partial = b""  # the start of a frame header split across reads
        self.capture: bytes | None = None  # the first bytes of a close frame's payload
        self.cmask = b""
        self.mode = _FORWARD
        self.pending = b""  # the close frame waiting for a frame boundary (_INJECT)
        self.messages = 0  # data messages passed on (a fragmented one counts once)
        self.replied = False  # sent its close frame after the proxy's own (_DROP)
        # Nothing in the way of the inline walk in data_received: forwarding, no close code
        # being read, no header held, no message policy to apply (kept by _frames).
        self.quick = not (is_client and tunnel.policy is not None)
        # The listener's bandwidth cap for what this side sends, if any; reading from this
        # side pauses while the cap (``capped``) or the peer's full buffer (``blocked``) says.
        shapers = tunnel.shapers
        self.shaper: Shaper | None = None
        if shapers is not None:
            self.shaper = shapers.inbound if is_client else shapers.outbound
        self.capped = False
        self.blocked = False

    def data_received(self, data: bytes) -> None:
        t = self.tunnel
        t.last = t.loop.time()
        n = len(data)
        if self.is_client:
            t.bytes_in += n
        else:
            t.bytes_out += n
        if self.shaper is not None and self.shaper.spend(n, self._uncap):
            self.capped = True
            self._own().pause_reading()
        if not self.quick:
            self._frames(data)
            return
        rem = self.remaining
        if rem >= n:
            # Inside a payload (the common case for large messages): nothing to look at.
            self.remaining = rem - n
            self.peer.write(data)
            return
        # The common case for small messages: whole frames. Walk their lengths inline (no
        # objects, no slices); anything unusual (a close frame, a header cut short, a 64-bit
        # length) goes to _frames from the start, as nothing has been changed yet. A masking
        # key cut off by the end of the read is skipped like payload.
        pos = rem
        msgs = 0
        while pos < n:
            if pos + 2 > n:
                self._frames(data)
                return
            b1 = data[pos + 1]
            length = b1 & 0x7F
            size = 2
            if length >= 126:
                if length == 127 or pos + 4 > n:
                    self._frames(data)
                    return
                length = (data[pos + 2] << 8) | data[pos + 3]
                size = 4
            if b1 & 0x80:
                size += 4
            op = data[pos] & 0x0F
            if op > OP_BINARY:
                if op == OP_CLOSE:
                    self._frames(data)
                    return
            elif op != OP_CONTINUATION:
                msgs += 1
            pos += size + length
        self.remaining = pos - n
        if msgs:
            self.messages += msgs
            if self.is_client:
                t.listener.ws_messages_in += msgs
            else:
                t.listener.ws_messages_out += msgs
        self.peer.write(data)

    def _frames(self, data: bytes) -> None:
        """Walk the frame headers in ``data``; forward, inject or drop as the mode says."""
        n = len(data)
        pos = 0
        start = 0  # the first byte not yet forwarded (or dropped)
        t = self.tunnel
        # A client under a message policy: a header split across reads is held back until
        # it is whole, so a refused frame never begins to reach the server.
        police = self.is_client and t.policy is not None
        while pos < n:
            rem = self.remaining
            if rem:
                take = n - pos if n - pos < rem else rem
                if self.capture is not None:
                    self._capture(data[pos : pos + take])
                self.remaining = rem - take
                pos += take
                continue
            if self.mode == _INJECT and not self.partial:
                # A frame boundary: the rest of this side's stream is replaced by the close.
                if pos > start:
                    self.peer.write(data[start:pos])
                self._inject_now()
                start = pos
            hstart = pos
            partial = self.partial
            head = data[pos : pos + MAX_HEADER]
            buf = partial + head if partial else head
            hdr = parse_header(buf)
            if hdr is None:
                self.partial = bytes(buf)
                if police and self.mode != _DROP:
                    if hstart > start:
                        self.peer.write(data[start:hstart])
                    start = n
                pos = n
                break
            pos += hdr.size - len(partial)
            self.partial = b""
            self.remaining = hdr.length
            op = hdr.opcode
            if police and self.mode != _DROP:
                code = t.police(buf[0], hdr.length)
                if code:
                    # Refused: what came before the frame goes on, then the close; the
                    # frame and everything after it never reach the server.
                    if hstart > start:
                        self.peer.write(data[start:hstart])
                    start = n
                    self.pending = close_frame(GOING_AWAY, masked=True)
                    self._inject_now()
                    t.refuse(code)
                    continue
                if partial:
                    self.peer.write(partial)  # the held-back start of this header
            if op <= OP_BINARY:
                if op != OP_CONTINUATION and self.mode != _DROP:
                    self.messages += 1
                    t.count_messages(self.is_client)
            elif op == OP_CLOSE:
                if hdr.length >= 2:
                    self.capture = b""
                    self.cmask = hdr.mask
                else:
                    self._close_frame(None)
        if self.mode != _DROP and start < n:
            self.peer.write(data if start == 0 else data[start:])
        self.quick = (
            self.mode == _FORWARD
            and self.capture is None
            and not self.partial
            and not (self.is_client and t.policy is not None)
        )

    def _capture(self, piece: bytes) -> None:
        got = self.capture
        assert got is not None
        got += piece[: 2 - len(got)]
        if len(got) < 2:
            self.capture = got
            return
        self.capture = None
        self._close_frame(close_code(got, self.cmask))

    def _close_frame(self, code: int | None) -> None:
        if self.mode == _DROP:
            self.replied = True  # the answer to the proxy's own close frame
            self.tunnel.close_replied()
        else:
            self.tunnel.count_close("client" if self.is_client else "server", code)

    def inject(self, frame: bytes) -> None:
        """Send ``frame`` to the peer at the next frame boundary of this side's stream."""
        self.quick = False
        self.pending = frame
        if self.remaining == 0 and not self.partial:
            self._inject_now()
        else:
            self.mode = _INJECT

    def _inject_now(self) -> None:
        self.peer.write(self.pending)
        self.pending = b""
        self.mode = _DROP
        self.tunnel.close_injected()

    def eof_received(self) -> bool:
        return self.tunnel.side_eof(self.is_client)

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.side_lost(self.is_client, exc)

    def _own(self) -> asyncio.Transport:
        t = self.tunnel
        return t.client if self.is_client else t.upstream

    def _uncap(self) -> None:
        self.capped = False
        if not self.blocked and not self.tunnel.closed:
            self._own().resume_reading()

    # My own transport's buffer is full: stop reading from the peer until it drains.
    def pause_writing(self) -> None:
        other = self.tunnel.other(self)
        other.blocked = True
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        other = self.tunnel.other(self)
        other.blocked = False
        if not other.capped:
            self.peer.resume_reading()


class Tunnel:
    """An established WebSocket connection between a client and a server."""

    __slots__ = (
        "access",
        "bytes_in",
        "bytes_out",
        "client",
        "client_addr",
        "close_code",
        "close_side",
        "closed",
        "ending",
        "ends",
        "eofs",
        "first_closer",
        "group",
        "idle",
        "injected",
        "last",
        "listener",
        "loop",
        "method_path",
        "msg_size",
        "on_close",
        "policy",
        "reason",
        "server",
        "shapers",
        "slot",
        "stamp",
        "started",
        "timer",
        "tokens",
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
        method_path: tuple[str, str] | None,
        access: AccessLog,
        slot: Slot | None = None,
        on_close: Any = None,
        policy: WebSocketPolicy | None = None,
        shapers: Bandwidth | None = None,
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
        self.slot = slot  # the client's place in connections_per_client, given back at close
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
        self.close_side: str | None = None  # who sent the first close frame
        self.close_code: int | None = None  # and its code (None: a close frame without one)
        self.ending: str | None = None  # why the proxy is closing it ("drain", "shutdown")
        self.injected = 0  # close frames the proxy has written so far (0..2)
        self.policy = policy  # limits on the client's messages (listeners[].websocket)
        self.shapers = shapers  # the listener's bandwidth cap (listeners[].bandwidth)
        self.msg_size = 0  # bytes of the client's current message so far (its frames' lengths)
        self.tokens = float(policy.burst) if policy is not None else 0.0  # the rate's bucket
        self.stamp = self.started  # when the bucket was last filled

    def start(self, client_pending: bytes, upstream_pending: bytes) -> None:
        """Hand both transports to the tunnel and flush what arrived with the handshake."""
        client, upstream = self.client, self.upstream
        ends = self.ends = (_End(self, upstream, True), _End(self, client, False))
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
        if not server_end.capped:
            upstream.resume_reading()

    def live_bytes(self) -> tuple[int, int]:
        return self.bytes_in, self.bytes_out

    def other(self, end: _End) -> _End:
        ends = self.ends
        assert ends is not None
        return ends[1] if end is ends[0] else ends[0]

    def messages(self) -> tuple[int, int]:
        """Data messages passed on: (client to server, server to client)."""
        ends = self.ends
        if ends is None:
            return 0, 0
        return ends[0].messages, ends[1].messages

    # ------------------------------------------------------------------ frame events
    def count_messages(self, from_client: bool, n: int = 1) -> None:
        if from_client:
            self.listener.ws_messages_in += n
        else:
            self.listener.ws_messages_out += n

    def count_close(self, side: str, code: int | None) -> None:
        """A close frame passed (or the proxy sent its own): count it, remember the first."""
        self.listener.count_ws_close_code(side, code)
        if self.close_side is None:
            self.close_side = side
            self.close_code = code

    def police(self, first: int, length: int) -> int:
        """A client frame's header (its first byte and payload length) against the listener's
        policy: 0 to let it pass, or the close code that refuses it (1009 too big, 1008 over
        the message rate, 1002 an extension's frame where none was negotiated)."""
        p = self.policy
        assert p is not None
        if first & RSV_BITS and p.max_message_size:
            # Under max_message_size no extension is negotiated (the offer never reaches the
            # server, a 101 accepting one is refused): RSV bits are a protocol error, and a
            # compressed frame's length says nothing of its message's size.
            return PROTOCOL_ERROR
        opcode = first & 0x0F
        if opcode > OP_BINARY:
            return 0  # control frames: neither messages nor counted in a message's size
        if opcode != OP_CONTINUATION:
            self.msg_size = length
            rate = p.messages_per_second
            if rate:
                # ``last`` is this read's time: the bucket refills from the previous message.
                now = self.last
                tokens = self.tokens + (now - self.stamp) * rate
                self.stamp = now
                if tokens > p.burst:
                    tokens = float(p.burst)
                if tokens < 1:
                    self.tokens = tokens
                    return POLICY_VIOLATION
                self.tokens = tokens - 1
        else:
            self.msg_size += length
        if p.max_message_size and self.msg_size > p.max_message_size:
            return MESSAGE_TOO_BIG
        return 0

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

    # ------------------------------------------------------------------ the proxy closes it
    def go_away(self, code: int, reason: str) -> None:
        """Close the WebSocket cleanly: a close frame with ``code`` to each side at its next
        frame boundary, then the close handshake for at most WS_CLOSE_HANDSHAKE_TIMEOUT.
        ``reason`` ("drain", "shutdown") is what the tunnel's end is counted as."""
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
        """Half-close: pass the FIN on and keep the other direction flowing until it ends."""
        if self.first_closer is None:
            self.first_closer = "client" if from_client else "server"
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
        now = self.loop.time()
        ls = self.listener
        ls.live.discard(self)
        ls.bytes_in += self.bytes_in
        ls.bytes_out += self.bytes_out
        ls.connections_active -= 1
        ls.count_ws_close(self.group, self.reason, now - self.started)
        server = self.server
        server.stats.ws_closed(ls.name)
        server.active -= 1
        if self.access.enabled:
            # None: the access log was off when the tunnel opened (nothing kept for it).
            method, path = self.method_path or ("-", "-")
            m_in, m_out = self.messages()
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
