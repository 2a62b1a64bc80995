"""An HTTP/2 stream (``Stream``): one request and its response on an HTTP/2 client connection,
the ``exchange_base.Downstream`` of its exchange; and the connection's side its streams write
through (``H2Socket``: the h2 state machine, the flush at the end of the loop's turn, the
windows given back).

A request's fields become the HTTP/1.1 request head the exchange sends (``http2_fields``); a
response head becomes HTTP/2 fields (there too); the body's payload goes out in DATA
frames as far as the client's windows allow, the rest waiting on the stream (``out``) with
the backend paused. The connection itself (frames in, opening and resetting streams, the
timer, GOAWAY, abuse limits) is ``http2.Http2Connection``, a subclass of ``H2Socket``: the
stream names only this base, so this module does not import ``http2`` back, and its calls
stay native under mypyc.

A stream's way out (the head, DATA as far as the windows allow, END_STREAM) is its base
``StreamOut``; the request and the exchange's side are ``Stream``. An RFC 8441 extended
CONNECT (``http2_websocket``) has a subclass of its own, ``http2.WebSocketStream`` (there,
beside the connection that opens it: a module between this one and ``http2`` would deepen
the import stack, ``tests/unit/test_layers.py``): an ordinary stream's calls test for no
tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError

from ..wire.hpack_static import StaticEncoder
from ..wire.http1 import ParseError, RequestHead, ResponseHead
from .client_socket import CLOSED, ClientSocket
from .exchange_base import Downstream, record
from .http2_fields import (
    error_response,
    request_head,
    response_fields,
)
from .http2_tunnel import CarriedStream

if TYPE_CHECKING:
    from ..config.model import Forwarding
    from .client_socket import ListenerHandle
    from .context import Context
    from .exchange import Exchange

log = logging.getLogger("lbproxy.http2")


def _quiet(*args: object) -> None:
    return None


# hpack logs every integer and field it codes at debug level, ~22 calls a request: even with
# debug off each is two Python calls (debug, isEnabledFor), ~4% of an HTTP/2 request's CPU.
# Its debug output is of no use in a proxy; one no-op call each instead.
setattr(logging.getLogger("hpack.hpack"), "debug", _quiet)  # noqa: B010
_clock = time.perf_counter


class H2Socket(ClientSocket):
    """An HTTP/2 client connection as its streams see it: the h2 state machine, what it
    queued written once a turn of the loop, received bytes acknowledged. The rest is
    ``http2.Http2Connection``'s (``stream_done`` too: declared here, it raises)."""

    def __init__(
        self,
        ctx: Context,
        handle: ListenerHandle,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(ctx, handle, loop)
        self.h2 = H2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                # response_fields() builds lower-cased, connection-header-free fields from a
                # parsed (validated) backend head: checking them again costs ~10% of a request.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        # Header blocks without the dynamic table, each field's encoding made once and shared
        # (``wire.hpack_static``): h2's own encoder searched, indexed and Huffman-coded every
        # field of every response in Python again (bench/H2.md).
        self.h2.encoder = StaticEncoder()  # type: ignore[assignment]
        self.flush_soon = False  # a flush is scheduled for the end of this loop turn
        self.tails: list[StreamOut] = []  # streams holding this turn's last DATA (``tail``)

    def send(self) -> None:
        """Write what the h2 state machine has queued, at the end of this turn of the loop:
        the frames of every stream that moved in it go out in one TLS write (one record and
        one syscall instead of one per backend read; measured: ~15% less CPU a request)."""
        if not self.flush_soon:
            self.flush_soon = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write what the h2 state machine has queued, now."""
        self.flush_soon = False
        tails = self.tails
        if tails:
            self.tails = []
            for stream in tails:
                stream.push_tail()
        data = self.h2.data_to_send()
        if data and self.phase != CLOSED:
            self.bytes_out += len(data)
            self.transport.write(data)

    def ack(self, sid: int, size: int) -> None:
        """Give ``size`` received bytes back to the stream's and the connection's windows."""
        if size and self.phase != CLOSED:
            self.h2.acknowledge_received_data(size, sid)

    def stream_done(self, stream: StreamOut) -> None:
        """``stream`` is over: nothing more goes out on it."""
        raise NotImplementedError


class StreamOut(CarriedStream):
    """An HTTP/2 stream's way out: the head, then the response's bytes in DATA frames as far
    as the client's windows allow, the rest waiting in ``out`` with the backend paused
    (``sync_upstream``) until WINDOW_UPDATEs drain it (``drain``); END_STREAM after the last.
    ``Stream``, its subclass, is the rest of the stream."""

    __slots__ = (
        "closed",
        "conn",
        "end_sent",
        "ending",
        "head_sent",
        "last",
        "out",
        "request_complete",
        "sid",
        "tail",
        "write_paused",
    )

    def __init__(self, conn: H2Socket, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.last = conn.last
        self.request_complete = False  # END_STREAM from the client
        self.head_sent = False
        self.out: deque[bytes] = deque()  # response bytes beyond the client's window
        # The last bytes written in this turn of the loop, sent at its end (``push_tail``), or
        # with END_STREAM in the same DATA frame if the response ends in the same turn: one
        # frame less per response (an empty DATA frame's h2 work: ~4% of a request's CPU).
        self.tail: bytes | None = None
        self.ending = False  # END_STREAM waits for ``out`` to drain
        self.end_sent = False
        self.closed = False  # answered, cut or reset: nothing more goes out
        self.write_paused = False  # the backend is paused: bytes wait for a window or the socket

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.head_sent:
            # An interim response: 100 Continue goes on (a client waiting to send its body
            # needs it); others (103 Early Hints) are dropped.
            if data.startswith((b"HTTP/1.1 100 ", b"HTTP/1.0 100 ")):
                with contextlib.suppress(ProtocolError):
                    self.conn.h2.send_headers(self.sid, [(b":status", b"100")])
                self.conn.send()
            return
        tail = self.tail
        if tail is not None:
            self.tail = None
            self._send_now(tail)
        if self.out:
            self.out.append(data)
        elif not self.closed:
            self.tail = data
            self.conn.tails.append(self)
        self.conn.send()

    def push_tail(self) -> None:
        """The end of the loop's turn: the held bytes go out."""
        tail = self.tail
        if tail is not None:
            self.tail = None
            if not self.closed:
                self._send_now(tail)

    def _send_now(self, data: bytes) -> None:
        if self.out:
            self.out.append(data)
            return
        rest = self._push(data)
        if rest:
            self.out.append(rest)
            self.sync_upstream()

    def _push(self, data: bytes) -> bytes:
        """Send what the windows allow of ``data``; returns the rest."""
        h2 = self.conn.h2
        view = memoryview(data)
        i, size = 0, len(data)
        try:
            while i < size:
                window = h2.local_flow_control_window(self.sid)
                if window <= 0:
                    break
                n = min(window, h2.max_outbound_frame_size, size - i)
                h2.send_data(self.sid, view[i : i + n])
                i += n
        except ProtocolError:  # the stream closed under us (h2 reset it): nothing more goes
            self.conn.stream_done(self)
            self.client_reset()
            return b""
        if i:
            self.last = self.conn.loop.time()
        return data[i:] if i < size else b""

    def drain(self) -> None:
        """Windows opened: send what waits; then the end, or the backend resumes."""
        out = self.out
        while out:
            rest = self._push(out[0])
            if rest:
                out[0] = rest
                return
            out.popleft()
        if self.closed:
            return
        if self.ending:
            self._end_stream()
            return
        self.sync_upstream()

    def flush(self) -> None:
        self.conn.send()

    def end(self) -> None:
        if self.closed:
            return
        tail = self.tail
        if tail is not None:
            self.tail = None
            h2 = self.conn.h2
            n = len(tail)
            if (
                not self.out
                and n <= h2.max_outbound_frame_size
                and n <= h2.local_flow_control_window(self.sid)
            ):
                self._end_stream(tail)  # the body's last bytes and END_STREAM: one frame
                self.conn.send()
                return
            self._send_now(tail)
        if self.out:
            self.ending = True  # after the bytes still waiting for a window
        else:
            self._end_stream()
        self.conn.send()

    def _end_stream(self, last: bytes = b"") -> None:
        h2 = self.conn.h2
        try:
            if not self.end_sent:
                self.end_sent = True
                if last:
                    h2.send_data(self.sid, last, end_stream=True)
                    self.last = self.conn.loop.time()
                else:
                    h2.end_stream(self.sid)
            if not self.request_complete:
                # Answered before the whole body came (RFC 9113 8.1): stop the client sending.
                h2.reset_stream(self.sid, ErrorCodes.NO_ERROR)
        except ProtocolError:  # the stream closed under us
            pass
        self._finished()

    def sync_upstream(self) -> None:
        """Pause the backend while this stream's bytes wait for a window or the socket."""
        raise NotImplementedError

    def client_reset(self) -> None:
        """The client reset the stream, or the connection is gone."""
        raise NotImplementedError

    def _finished(self) -> None:
        """Answered or cut: the stream is over."""
        raise NotImplementedError


class Stream(StreamOut, Downstream):
    """One HTTP/2 stream: a request and its response, the ``Downstream`` of its exchange (the
    way its bytes go out is ``StreamOut``'s). ``CarriedStream`` is a base so that the tunnel
    transport's calls on a ``http2.WebSocketStream`` stay native; only that subclass carries
    a tunnel."""

    __slots__ = (
        "cert_headers",
        "chunked",
        "client_addr",
        "client_ip",
        "exchange",
        "paused",
        "shapers",
        "slot",
        "unacked",
        "ws_key",
    )

    protocol = "HTTP/2"
    chunked_ok = False  # the body's payload goes out in DATA frames, never chunk framing

    def __init__(self, conn: H2Socket, sid: int) -> None:
        super().__init__(conn, sid)
        self.client_ip = conn.client_ip
        self.client_addr = conn.client_addr
        self.exchange: Exchange | None = None
        self.chunked = False  # the request body goes to the backend chunked (no length given)
        self.paused = False  # the exchange takes no more body: received DATA is not acked
        self.unacked = 0
        # The connection's edge (mTLS headers, per-client slot: no tunnel takes it over HTTP/2).
        self.cert_headers = conn.cert_headers
        self.slot = conn.slot
        self.shapers = conn.shapers
        self.ws_key = b""  # an extended CONNECT's (``WebSocketStream``)

    # ------------------------------------------------------------------ request
    def request(self, raw: Iterable[tuple[bytes, bytes]], ended: bool) -> RequestHead | None:
        """The stream's request as an HTTP/1.1 head, for the connection to give an exchange;
        None when it is refused (answered on the stream: 400, 414, 431, 501)."""
        t_start = _clock()
        self.request_complete = ended
        lr = self.conn.lr
        try:
            req = request_head(raw, ended, lr.limits, self.ws_key)
        except ParseError as exc:
            log.info("%s: bad HTTP/2 request: %s", self.client_addr, exc.reason)
            self._refuse(t_start, exc.status, exc.reason)
            return None
        self.chunked = req.chunked
        return req

    def _refuse(self, t_start: float, status: int, reason: str) -> None:
        """A request that never became an exchange: answered on its stream."""
        n = self.send_error(status, reason, ())
        lr = self.conn.lr
        record(
            self.conn.ctx, lr, self.client_addr, lr.group.name, "", status, None, t_start,
            None, 0, n, protocol=self.protocol,
        )  # fmt: skip

    def data(self, data: bytes, size: int) -> None:
        self.last = self.conn.loop.time()
        ex = self.exchange
        if ex is None or ex.done or ex.req_done:
            self.conn.ack(self.sid, size)  # body after the answer: dropped
            return
        if data:
            ex.request_data(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if self.paused and not ex.done:
            self.unacked += size
        else:
            self.conn.ack(self.sid, size)

    def request_ended(self) -> None:
        self.request_complete = True
        ex = self.exchange
        if ex is None or ex.done:
            return
        if self.chunked:
            ex.request_data(b"0\r\n\r\n")
        elif not ex.req_done:
            ex.fail(400, "the request body is shorter than its content-length")

    # ------------------------------------------------------------------ Downstream
    def send_head(
        self, resp: ResponseHead, extra: tuple[bytes, ...], kind: int, ended: bool
    ) -> int:
        return self._headers(response_fields(resp, extra), ended)

    def _headers(self, fields: list[tuple[bytes, bytes]], ended: bool) -> int:
        self.head_sent = True
        try:
            self.conn.h2.send_headers(self.sid, fields, end_stream=ended)
        except ProtocolError as exc:  # a field HTTP/2 cannot carry
            log.warning("%s: response head not sendable over HTTP/2: %s", self.client_addr, exc)
            with contextlib.suppress(ProtocolError):
                self.conn.h2.reset_stream(self.sid, ErrorCodes.INTERNAL_ERROR)
            ex = self.exchange
            if ex is not None:
                # After the exchange's send_head returns: it lets its backend go as after a cut.
                self.conn.loop.call_soon(_cut, ex)
            self._finished()
            return 0
        self.end_sent = ended
        return sum(len(k) + len(v) + 4 for k, v in fields)  # as an HTTP/1.1 head would count

    def sync_upstream(self) -> None:
        """Pause the backend while this stream's bytes wait for a window or the socket."""
        ex = self.exchange
        if ex is None or ex.done:
            return
        want = bool(self.out) or self.conn.write_paused
        if want != self.write_paused:
            self.write_paused = want
            if want:
                ex.pause_upstream()
            else:
                ex.resume_upstream()

    def _finished(self) -> None:
        self.closed = True
        self.tail = None
        self.out.clear()
        self._give_back()
        self.exchange = None  # no cycle with its Downstream: reference counting frees both
        self.conn.stream_done(self)

    def _give_back(self) -> None:
        """DATA held unacknowledged goes back to the connection's window: the stream is over,
        and the connection would otherwise shrink by it for good."""
        if self.unacked:
            self.conn.ack(self.sid, self.unacked)
            self.unacked = 0

    def send_error(self, status: int, reason: str, extra: tuple[tuple[str, str], ...]) -> int:
        if self.closed:
            return 0
        fields, body = error_response(status, reason, extra)
        n = self._headers(fields, False)
        self.write(body)
        self.end()
        return n + len(body)

    def cut(self) -> None:
        if self.closed:
            return
        with contextlib.suppress(ProtocolError):  # already closed in h2: nothing to reset
            self.conn.h2.reset_stream(self.sid, ErrorCodes.INTERNAL_ERROR)
        self._finished()
        self.conn.send()

    def client_reset(self) -> None:
        """The client reset the stream, or the connection is gone."""
        self.closed = True
        self.tail = None
        self.out.clear()
        self._give_back()
        ex = self.exchange
        self.exchange = None
        if ex is not None and not ex.done:
            ex.client_gone()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        if self.unacked:
            self.conn.ack(self.sid, self.unacked)
            self.unacked = 0
            self.conn.send()

    def wake_at(self, when: float) -> None:
        self.conn.wake_at(when)

    def upgrade(self, head: bytes) -> tuple[asyncio.Transport, bytes]:
        # A plain stream's request asks for no upgrade (the response side checks it first).
        raise NotImplementedError("only an extended CONNECT's stream is upgraded")

    def local_host(self) -> bytes:
        return self.conn.local_host()

    def forwarding_lines(self, fwd: Forwarding) -> tuple[bytes, ...]:
        return self.conn.forwarding_lines(fwd)

    def addresses(self) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        return self.conn.addresses()

    def tunneling(self) -> bool:
        """Whether the stream carries an open tunnel (whose idle timeout is the tunnel's)."""
        return False


def _cut(ex: Exchange) -> None:
    if not ex.done:
        ex.cut()
