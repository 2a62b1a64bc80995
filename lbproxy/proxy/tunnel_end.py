"""One side of a WebSocket tunnel (``End``) and the tunnel as its sides see it (``TunnelBase``).

An ``End`` is the Protocol of one of the tunnel's two transports: what it reads is written to
the other transport as it came, while it follows the WebSocket frame *headers* in it
(``wsframes``: payloads skipped by length, never unmasked or copied) to count messages and
close codes, to put the proxy's own close frame between two frames (never inside one), and,
on the client's side under a listener's ``websocket`` policy, to refuse a frame before any
of it reaches the server. It also pauses its own reading for the listener's bandwidth cap
and for the other side's full write buffer.

``TunnelBase`` holds what both ends share (the clock of the last activity, the byte
counters, the transports, the listener's stats and limits) and the client's message policy
(``police``: size, rate, extensions); ``tunnel.Tunnel`` is its one subclass (opening,
closing, the close handshake, accounting), whose methods the ends call are declared here
(they raise). The ends name only this base, so this module does not import ``tunnel``, and
their calls stay native under mypyc.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

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
    from .shaping import Bandwidth, Shaper

# What a frame-aware side does with what it reads.
_FORWARD: Final = 0  # pass it on
_INJECT: Final = 1  # pass it on up to the next frame boundary, then send ``pending`` instead
_DROP: Final = 2  # the proxy has sent its own close frame: read (for the reply), pass nothing on


class TunnelBase:
    """What a tunnel's ends share and call (see the module docstring)."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "client",
        "client_first",
        "closed",
        "ends",
        "last",
        "listener",
        "loop",
        "msg_size",
        "policy",
        "protocol",
        "shapers",
        "stamp",
        "tokens",
        "upstream",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        listener: ListenerStats,
        policy: WebSocketPolicy | None,
        shapers: Bandwidth | None,
    ) -> None:
        self.loop = loop
        self.client = client
        self.upstream = upstream
        self.listener = listener
        self.last = loop.time()  # loop time of the last read, either side
        self.bytes_in = 0
        self.bytes_out = 0
        self.closed = False
        # A move (rebalance, shed): the close went to the client only; what the client sends
        # until its close frame still reaches the server, and the server's 1001 takes the
        # place of the client's close frame (``End._frames``), so no message is lost.
        self.client_first = False
        self.ends: tuple[End, End] | None = None  # (client side, server side)
        self.policy = policy  # limits on the client's messages (listeners[].websocket)
        self.shapers = shapers  # the listener's bandwidth cap (listeners[].bandwidth)
        self.msg_size = 0  # bytes of the client's current message so far (its frames' lengths)
        self.tokens = float(policy.burst) if policy is not None else 0.0  # the rate's bucket
        self.stamp = self.last  # when the bucket was last filled
        self.protocol = "HTTP/1.1"  # the client's ("HTTP/2": a stream, RFC 8441)

    def other(self, end: End) -> End:
        ends = self.ends
        assert ends is not None
        return ends[1] if end is ends[0] else ends[0]

    def count_messages(self, from_client: bool, n: int = 1) -> None:
        if from_client:
            self.listener.ws_messages_in += n
        else:
            self.listener.ws_messages_out += n

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

    # ------------------------------------------------------------------ tunnel.Tunnel's
    def count_close(self, side: str, code: int | None) -> None:
        """A close frame passed (or the proxy sent its own)."""
        raise NotImplementedError

    def refuse(self, code: int) -> None:
        """The client broke the policy: close with ``code``."""
        raise NotImplementedError

    def close_injected(self) -> None:
        """One of the proxy's close frames went out."""
        raise NotImplementedError

    def close_replied(self) -> None:
        """A side answered the proxy's close frame."""
        raise NotImplementedError

    def side_eof(self, from_client: bool) -> bool:
        raise NotImplementedError

    def side_lost(self, from_client: bool, exc: Exception | None) -> None:
        raise NotImplementedError


class End(asyncio.Protocol):
    """One side of a tunnel: what arrives here is written to ``peer``, frame headers followed."""

    __slots__ = (
        "blocked",
        "capped",
        "capture",
        "cmask",
        "fragmented",
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

    def __init__(self, tunnel: TunnelBase, peer: asyncio.Transport, is_client: bool) -> None:
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
        # Inside a fragmented message (its first frame had no FIN, its last has not come):
        # a rebalance does not pick such a tunnel (``midway``).
        self.fragmented = False
        self.replied = False  # sent its close frame after the proxy's own (_DROP)
        # Nothing in the way of the inline walk in data_received: forwarding, no close code
        # being read, no header held, no message policy to apply (kept by _frames).
        self.quick = not (is_client and tunnel.policy is not None)
        # The listener's bandwidth cap for what this side sends, if any; reading from this
        # side pauses while the cap (``capped``) or the peer's full buffer (``blocked``) says.
        shapers = tunnel.shapers
        self.shaper: Shaper | None = None
        if shapers is not None and not (is_client and tunnel.protocol == "HTTP/2"):
            # (An HTTP/2 client's bytes were spent by its connection, frames and all.)
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
        frag = self.fragmented
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
            b0 = data[pos]
            op = b0 & 0x0F
            if op > OP_BINARY:
                if op == OP_CLOSE:
                    self._frames(data)
                    return
            else:
                if op != OP_CONTINUATION:
                    msgs += 1
                frag = not b0 & 0x80
            pos += size + length
        self.remaining = pos - n
        self.fragmented = frag
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
                self.fragmented = not buf[0] & 0x80
                if op != OP_CONTINUATION and self.mode != _DROP:
                    self.messages += 1
                    t.count_messages(self.is_client)
            elif op == OP_CLOSE:
                if (
                    self.is_client
                    and t.client_first
                    and self.mode == _FORWARD
                    and not partial
                    and hstart >= start
                ):
                    # The client answers a move: everything before its close frame went on;
                    # the server gets the proxy's 1001 in its place (and it is the reply).
                    if hstart > start:
                        self.peer.write(data[start:hstart])
                    start = n
                    self.pending = close_frame(GOING_AWAY, masked=True)
                    self._inject_now()
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

    @property
    def midway(self) -> bool:
        """Inside a frame or a fragmented message: closing now would cut a message short."""
        return self.remaining > 0 or bool(self.partial) or self.fragmented

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
