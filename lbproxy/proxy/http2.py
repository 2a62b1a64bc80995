"""The HTTP/2 front end (RFC 9113) of https listeners, on the ``h2`` package's state machine.

Owns, for a client connection whose TLS handshake chose ``h2`` by ALPN (``Alpn`` picks the
front end once the handshake is done): the h2 connection state, its streams (one ``Stream``
each, the ``exchange.Downstream`` of one ``Exchange``), flow control both ways, the
connection's one timer (every stream's idle and request timeouts), GOAWAY, and the limits
against abuse. Backends are spoken to in HTTP/1.1 by the exchange, as for any client.

Requests: the pseudo-headers become an HTTP/1.1 request head (``:authority`` -> Host, cookie
crumbs joined with "; ", a body without content-length sent chunked) that goes through the
HTTP/1.1 parser, so the backend sees what an HTTP/1.1 client's request would have become and
the listener's head limits apply (414/431 answered on the stream). Responses: connection
headers dropped, names lower-cased, the body's payload (never its chunked framing), 100
Continue relayed and other 1xx dropped, END_STREAM at the end; a failure after the head is
RST_STREAM.

Flow control:
- request body: DATA goes to the exchange at once, and is acknowledged (WINDOW_UPDATE) only
  while the exchange takes more: a slow backend holds at most one stream window (65535
  bytes) per stream in the proxy. The connection window is every stream's window, so a
  stalled stream never blocks the others.
- response body: sent as far as the client's windows allow; the rest waits on the stream
  and the backend connection is paused until WINDOW_UPDATEs drain it (and while the client
  socket is not writable).

Abuse limits: SETTINGS_MAX_CONCURRENT_STREAMS (h2 answers more with a connection error),
SETTINGS_MAX_HEADER_LIST_SIZE and the listener's head limits, and rapid reset
(CVE-2023-44487): each stream the client resets before its response is complete takes a
token from a bucket (RAPID_RESET_BURST, refilled at RAPID_RESET_RATE a second); a client that
empties it gets GOAWAY ENHANCE_YOUR_CALM and is disconnected (counted). Each batch of frames
is read in two passes, so a stream opened and reset in one batch never reaches a backend.

Shutdown (RFC 9113 6.8): GOAWAY with last stream id 2^31-1 and a PING; when the PING comes
back (or after GOAWAY_GRACE) GOAWAY with the highest stream id seen: streams up to it finish,
later ones are refused, and the connection closes once they are done. The GOAWAY frames are
written here: h2's close_connection() would put its state machine in CLOSED at once.

WebSockets stay on HTTP/1.1: SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441) is not offered, so
browsers open their WebSocket on a separate HTTP/1.1 connection. No h2c.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from ..config.model import Forwarding
from ..wire import headers
from ..wire.http1 import Limits, ParseError, RequestHead, ResponseHead, parse_request_head
from .client_socket import CLOSED, ClientSocket, ListenerHandle
from .exchange import Context, Exchange, record

log = logging.getLogger("lbproxy.http2")
_clock = time.perf_counter

MAX_CONCURRENT_STREAMS = 128  # as nginx; browsers open up to 100
STREAM_WINDOW = 65535  # the protocol's initial stream window, kept
CONNECTION_WINDOW = MAX_CONCURRENT_STREAMS * STREAM_WINDOW
RAPID_RESET_BURST = 100  # streams a client may reset before their answer, at once
RAPID_RESET_RATE = 50.0  # ... and a second after that
GOAWAY_GRACE = 1.0  # seconds the first GOAWAY waits for its PING to come back
_LAST_STREAM_ID = 2**31 - 1
_PING = b"lbproxyG"
_NEVER_DROPPED = frozenset({b"content-length", b"host"})
FLUSH_AT_ONCE = 16384  # a client read this large is answered at once, not at the turn's end
_P_UNREAD = 1  # why the client's socket is not read (a bit of ClientSocket.paused)


class Http2Connection(ClientSocket):
    """One HTTP/2 client connection (see the module docstring)."""

    def __init__(self, ctx: Context, handle: ListenerHandle) -> None:
        super().__init__(ctx, handle)
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
        self.streams: dict[int, Stream] = {}
        self.reset_budget = float(RAPID_RESET_BURST)
        self.reset_time = self.last
        self.goaway = 0  # 1: GOAWAY 2^31-1 and a PING sent; 2: the final GOAWAY sent
        self.goaway_at = 0.0  # when the final GOAWAY goes even if the PING never comes back
        self.last_stream = _LAST_STREAM_ID  # streams above it are refused
        self.opened = 0  # streams opened (client_header_timeout applies before the first)
        self.flush_soon = False  # a flush is scheduled for the end of this loop turn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.phase == CLOSED:  # refused (connections_per_client): not a byte of HTTP/2
            return
        lim = self.lr.limits
        list_size = lim.max_header_size + 32 * lim.max_header_count  # HPACK counts 32 a field
        h2 = self.h2
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                SettingCodes.MAX_HEADER_LIST_SIZE: list_size,
            },
        )
        h2.decoder.max_header_list_size = list_size  # h2 applies it only once acknowledged
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - STREAM_WINDOW)
        self.send()
        t = self.lr.config.timeouts
        self._arm(self.last + min(t.idle, t.client_header))

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
        data = self.h2.data_to_send()
        if data and self.phase != CLOSED:
            self.bytes_out += len(data)
            self.transport.write(data)

    def _close_after_write(self, linger: bool = False) -> None:
        self.flush()
        super()._close_after_write(linger)

    # ------------------------------------------------------------------ client transport events
    def data_received(self, data: bytes) -> None:
        if self.phase == CLOSED:
            return
        self.bytes_in += len(data)
        if self.shapers is not None:
            self._spend_in(len(data))
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as exc:
            log.info("%s: HTTP/2 protocol error: %s", self.client_addr, exc)
            self._abort_streams()
            self._close_after_write()
            return
        self._events(events)
        if len(data) >= FLUSH_AT_ONCE:
            # A large read may bring frames that each ask for an answer (PINGs, SETTINGS): they
            # go to the transport now, so that its flow control can stop reading the client
            # before the next read (TLS delivers several in one turn of the loop).
            self.flush()
        else:
            self.send()

    def _events(self, events: list[Event]) -> None:
        # Pass one: the streams this batch resets; pass two: the events, a stream opened and
        # reset in this batch skipped (it would cost a backend request for nothing).
        reset = {e.stream_id for e in events if isinstance(e, StreamReset)}
        skipped: set[int] = set()
        for ev in events:
            if isinstance(ev, RequestReceived):
                sid = ev.stream_id
                assert sid is not None
                if sid in reset:
                    skipped.add(sid)
                else:
                    self._open(sid, ev.headers or [], ev.stream_ended is not None)
            elif isinstance(ev, DataReceived):
                sid = ev.stream_id
                assert sid is not None
                stream = self.streams.get(sid)
                if stream is not None:
                    stream.data(ev.data or b"", ev.flow_controlled_length or 0)
                else:  # answered or reset already: dropped, its window given back
                    self.ack(sid, ev.flow_controlled_length or 0)
            elif isinstance(ev, StreamEnded):
                stream = self.streams.get(ev.stream_id or 0)
                if stream is not None:
                    stream.request_ended()
            elif isinstance(ev, StreamReset):
                if ev.stream_id is not None:  # by the client, or by h2 for a stream error
                    sid = ev.stream_id
                    self._client_reset(sid, sid in skipped, bool(ev.remote_reset))
            elif isinstance(ev, WindowUpdated):
                self._drain(ev.stream_id or 0)
            elif isinstance(ev, RemoteSettingsChanged):
                if SettingCodes.INITIAL_WINDOW_SIZE in ev.changed_settings:
                    self._drain(0)
            elif isinstance(ev, PingAckReceived):
                if self.goaway == 1 and ev.ping_data == _PING:
                    self._final_goaway()
            elif isinstance(ev, ConnectionTerminated):
                # The client is closing. h2's state machine is CLOSED now and sends nothing
                # more, so the streams in flight cannot be answered: they end here.
                self._abort_streams()
                self._close_after_write()
                return
            if self.phase == CLOSED:
                return

    def eof_received(self) -> bool:
        return False  # TLS has no half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._abort_streams()
        self._close()

    def pause_writing(self) -> None:
        # The client does not read what it is sent: no more from the backends, and nothing
        # more read from it either, for every frame it sends may ask for an answer (PING,
        # SETTINGS, a request): a client flooding them without reading would otherwise pile
        # the answers up here (CVE-2019-9512, -9515). Reading resumes once it has read.
        self.write_paused = True
        self._pause(_P_UNREAD)
        for stream in list(self.streams.values()):
            stream.sync_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._resume(_P_UNREAD)
        for stream in list(self.streams.values()):
            stream.sync_upstream()

    # ------------------------------------------------------------------ streams
    def _open(self, sid: int, raw: Iterable[tuple[bytes, bytes]], ended: bool) -> None:
        if sid > self.last_stream:
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)  # after the final GOAWAY
            return
        self.lr = self.handle.runtime  # each request sees the latest reload
        self.last = self.loop.time()
        self.opened += 1
        stream = Stream(self, sid)
        self.streams[sid] = stream
        stream.start(raw, ended)

    def ack(self, sid: int, size: int) -> None:
        """Give ``size`` received bytes back to the stream's and the connection's windows."""
        if size and self.phase != CLOSED:
            self.h2.acknowledge_received_data(size, sid)

    def _drain(self, sid: int) -> None:
        if sid:
            stream = self.streams.get(sid)
            if stream is not None and stream.out:
                stream.drain()
            return
        for stream in list(self.streams.values()):
            if stream.out:
                stream.drain()

    def stream_done(self, stream: Stream) -> None:
        if self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
        if not self.streams:
            self.last = self.loop.time()  # idle from now
            if self.goaway == 2:
                self.send()
                self._close_after_write()

    def _client_reset(self, sid: int, skipped: bool, by_client: bool = True) -> None:
        stream = self.streams.pop(sid, None)
        premature = skipped and by_client
        if stream is not None:
            premature = by_client and not stream.closed
            stream.client_reset()
        if premature:
            self._premature_reset()

    def _premature_reset(self) -> None:
        """A stream reset by the client before its answer was complete: a token from the
        bucket; an empty bucket is a rapid-reset attack (CVE-2023-44487)."""
        now = self.loop.time()
        refill = (now - self.reset_time) * RAPID_RESET_RATE
        self.reset_time = now
        self.reset_budget = min(float(RAPID_RESET_BURST), self.reset_budget + refill) - 1
        if self.reset_budget < 0:
            log.warning("%s: HTTP/2 streams reset too fast: disconnected", self.client_addr)
            self.lr.stats.h2_rapid_resets += 1
            self._write_goaway(self.h2.highest_inbound_stream_id, ErrorCodes.ENHANCE_YOUR_CALM)
            self._abort_streams()
            self._close_after_write()

    def _abort_streams(self) -> None:
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.client_reset()

    # ------------------------------------------------------------------ GOAWAY
    def _write_goaway(self, last: int, code: ErrorCodes) -> None:
        self.flush()  # what h2 queued goes first
        frame = GoAwayFrame(0)
        frame.last_stream_id = last
        frame.error_code = code
        data = frame.serialize()
        self.bytes_out += len(data)
        self.transport.write(data)

    def shutdown(self) -> None:
        """Graceful stop: two-phase GOAWAY; streams in flight finish."""
        if self.phase == CLOSED or self.goaway:
            return
        if not self.streams:
            self.goaway = 2
            self._write_goaway(self.h2.highest_inbound_stream_id, ErrorCodes.NO_ERROR)
            self._close_after_write()
            return
        self.goaway = 1
        self._write_goaway(_LAST_STREAM_ID, ErrorCodes.NO_ERROR)
        self.h2.ping(_PING)
        self.send()
        self.goaway_at = self.loop.time() + GOAWAY_GRACE
        self.wake_at(self.goaway_at)

    def _final_goaway(self) -> None:
        self.goaway = 2
        self.last_stream = self.h2.highest_inbound_stream_id
        self._write_goaway(self.last_stream, ErrorCodes.NO_ERROR)
        if not self.streams:
            self._close_after_write()

    # ------------------------------------------------------------------ timer
    def _on_timer(self) -> None:
        self.timer = None
        if self.phase == CLOSED:
            return
        now = self.loop.time()
        t = self.lr.config.timeouts
        if self.goaway == 1 and now >= self.goaway_at:
            self._final_goaway()
            if self.phase == CLOSED:
                return
        deadline = self.goaway_at if self.goaway == 1 else now + t.idle
        if not self.streams:
            limit = self.last + (t.idle if self.opened else min(t.idle, t.client_header))
            if now >= limit:
                self._write_goaway(self.h2.highest_inbound_stream_id, ErrorCodes.NO_ERROR)
                self._close_after_write()
                return
            deadline = min(deadline, limit)
        for stream in list(self.streams.values()):
            when = stream.check_timeouts(now, t.idle, t.request)
            if when:
                deadline = min(deadline, when)
        self.send()
        if self.phase != CLOSED:
            self._arm(deadline)


class Stream:
    """One HTTP/2 stream: a request and its response, the ``Downstream`` of its exchange."""

    __slots__ = (
        "cert_headers",
        "chunked",
        "client_addr",
        "client_ip",
        "closed",
        "conn",
        "end_sent",
        "ending",
        "exchange",
        "head_sent",
        "last",
        "out",
        "paused",
        "request_complete",
        "shapers",
        "sid",
        "slot",
        "unacked",
        "write_paused",
    )

    protocol = "HTTP/2"
    chunked_ok = False  # the body's payload goes out in DATA frames, never chunk framing

    def __init__(self, conn: Http2Connection, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.client_ip = conn.client_ip
        self.client_addr = conn.client_addr
        self.last = conn.last
        self.exchange: Exchange | None = None
        self.chunked = False  # the request body goes to the backend chunked (no length given)
        self.request_complete = False  # END_STREAM from the client
        self.head_sent = False
        self.out: deque[bytes] = deque()  # response bytes beyond the client's window
        self.ending = False  # END_STREAM waits for ``out`` to drain
        self.end_sent = False
        self.closed = False  # answered, cut or reset: nothing more goes out
        self.paused = False  # the exchange takes no more body: received DATA is not acked
        self.unacked = 0
        self.write_paused = False  # the backend is paused: bytes wait for a window or the socket
        # The connection's edge (mTLS headers, per-client slot: no tunnel takes it over HTTP/2).
        self.cert_headers = conn.cert_headers
        self.slot = conn.slot
        self.shapers = conn.shapers

    # ------------------------------------------------------------------ request
    def start(self, raw: Iterable[tuple[bytes, bytes]], ended: bool) -> None:
        t_start = _clock()
        self.request_complete = ended
        conn = self.conn
        try:
            req = request_head(raw, ended, conn.lr.limits)
        except ParseError as exc:
            log.info("%s: bad HTTP/2 request: %s", self.client_addr, exc.reason)
            self._refuse(t_start, exc.status, exc.reason)
            return
        self.chunked = req.chunked
        self.exchange = ex = Exchange(conn.ctx, conn.lr, req, self)
        if ex.begin():
            ex.send()

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
        if self.out:
            self.out.append(data)
        else:
            rest = self._push(data)
            if rest:
                self.out.append(rest)
                self.sync_upstream()
        self.conn.send()

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
        else:
            self.sync_upstream()

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

    def flush(self) -> None:
        self.conn.send()

    def end(self) -> None:
        if self.closed:
            return
        if self.out:
            self.ending = True  # after the bytes still waiting for a window
        else:
            self._end_stream()
        self.conn.send()

    def _end_stream(self) -> None:
        h2 = self.conn.h2
        try:
            if not self.end_sent:
                self.end_sent = True
                h2.end_stream(self.sid)
            if not self.request_complete:
                # Answered before the whole body came (RFC 9113 8.1): stop the client sending.
                h2.reset_stream(self.sid, ErrorCodes.NO_ERROR)
        except ProtocolError:  # the stream closed under us
            pass
        self._finished()

    def _finished(self) -> None:
        self.closed = True
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
        title = headers.REASONS.get(status, "Error")
        body = f"{status} {title}{': ' + reason if reason else ''}\n".encode()
        fields = [
            (b":status", b"%d" % status),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
        ]
        fields.extend((k.lower().encode(), v.encode()) for k, v in extra)
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
        raise RuntimeError("no upgrade over HTTP/2")  # h2 refuses Upgrade fields

    def local_host(self) -> bytes:
        return self.conn.local_host()

    def forwarding_lines(self, fwd: Forwarding) -> tuple[bytes, ...]:
        return self.conn.forwarding_lines(fwd)

    # ------------------------------------------------------------------ timeouts
    def check_timeouts(self, now: float, idle: float, request: float) -> float:
        """Apply this stream's timeouts at ``now``; the next time to look again (0: none)."""
        ex = self.exchange
        if ex is None or ex.done:
            if self.out and now >= self.last + idle:  # the client stopped reading the answer
                self.cut()
                return 0.0
            return self.last + idle if self.out else 0.0
        if ex.awaiting_head():
            deadline = ex.sent_at + request
            if now >= deadline:
                ex.request_timed_out(request)
                return 0.0
            return deadline
        deadline = self.last + idle
        if now >= deadline:
            ex.idle_timed_out()
            return 0.0
        return deadline


def request_head(raw: Iterable[tuple[bytes, bytes]], ended: bool, limits: Limits) -> RequestHead:
    """The HTTP/1.1 request an HTTP/2 request's fields (as h2 validated them) become, parsed
    by the HTTP/1.1 parser with the listener's ``limits``: ``:authority`` is Host (it wins
    over a host field, RFC 9113 8.3.1), cookie crumbs are joined with "; " (8.2.3), and a body
    that may follow (no END_STREAM) without content-length is chunked. Raises ParseError
    (501 for CONNECT, 400, 414, 431)."""
    method = path = authority = None
    lines: list[bytes] = []
    cookies: list[bytes] = []
    has_length = False
    for name, value in raw:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host" and authority is not None:
            continue
        if name == b"content-length":
            has_length = True
        lines.append(name + b": " + value)
    if method is None or path is None or method == b"CONNECT":
        raise ParseError(501, "CONNECT is not supported over HTTP/2")
    if path[:1] != b"/" and path != b"*":
        raise ParseError(400, "the :path is not a path")
    if authority is not None:
        lines.insert(0, b"host: " + authority)
    if cookies:
        lines.append(b"cookie: " + b"; ".join(cookies))
    if not ended and not has_length:
        lines.append(b"transfer-encoding: chunked")
    lines.append(b"\r\n")
    req = parse_request_head(method + b" " + path + b" HTTP/1.1\r\n" + b"\r\n".join(lines), limits)
    assert req is not None  # the head is complete
    return req


def response_fields(resp: ResponseHead, extra: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 response head as HTTP/2 fields: ``:status``, names lower-cased, hop-by-hop
    fields dropped (those Connection names too), content-length dropped beside chunked (the
    body goes out de-chunked), and the proxy's ``extra`` lines (``Name: value``) added."""
    drop = headers.HOP_BY_HOP
    if resp.connection:
        drop = drop | (resp.connection - _NEVER_DROPPED)
    if resp.chunked:
        drop = drop | {b"content-length"}
    fields = [(b":status", b"%d" % resp.status)]
    for name, value in resp.headers:
        lname = name.lower()
        if lname not in drop:
            fields.append((lname, value))
    for line in extra:
        name, _, value = line.partition(b":")
        fields.append((name.strip().lower(), value.strip()))
    return fields


def _cut(ex: Exchange) -> None:
    if not ex.done:
        ex.cut()
