"""The HTTP/2 front end (RFC 9113) of https listeners, on the ``h2`` package's state machine.

Owns, for a client connection whose TLS handshake chose ``h2`` by ALPN (``Alpn`` picks the
front end once the handshake is done): the h2 connection state, its streams (one
``http2_stream.Stream`` each, the ``Downstream`` of one ``Exchange``: this connection opens
it and gives it its exchange), flow control both ways, the connection's one timer (every
stream's idle and request timeouts), GOAWAY, and the limits against abuse. Backends are
spoken to in HTTP/1.1 by the exchange, as for any client.

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

WebSockets: with the listener's ``http2_websocket`` (as it was when the connection opened: a
reload changes it for new connections), SETTINGS_ENABLE_CONNECT_PROTOCOL (RFC 8441) is
offered and an extended CONNECT with ``:protocol: websocket`` becomes an HTTP/1.1
Upgrade toward the backend (its stream is a ``WebSocketStream``, here); after its 101
the stream is a tunnel's client side (``http2_tunnel``). Without it, browsers open their
WebSocket on a separate HTTP/1.1 connection. No h2c.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

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

from ..wire.http1 import RequestHead, parse_response_head
from .client_socket import CLOSED
from .exchange import Exchange
from .http2_fields import extended_connect, websocket_fields, websocket_key
from .http2_stream import H2Socket, Stream, StreamOut
from .http2_tunnel import StreamTransport

if TYPE_CHECKING:
    from .client_socket import ListenerHandle
    from .context import Context

log = logging.getLogger("lbproxy.http2")

MAX_CONCURRENT_STREAMS: Final = 128  # as nginx; browsers open up to 100
STREAM_WINDOW: Final = 65535  # the protocol's initial stream window, kept
CONNECTION_WINDOW = MAX_CONCURRENT_STREAMS * STREAM_WINDOW
RAPID_RESET_BURST: Final = 100  # streams a client may reset before their answer, at once
RAPID_RESET_RATE: Final = 50.0  # ... and a second after that
GOAWAY_GRACE: Final = 1.0  # seconds the first GOAWAY waits for its PING to come back
_LAST_STREAM_ID: Final = 2**31 - 1
_PING: Final = b"lbproxyG"
FLUSH_AT_ONCE: Final = 16384  # a client read this large is answered at once, not at the turn's end
_P_UNREAD: Final = 1  # why the client's socket is not read (a bit of ClientSocket.paused)


class Http2Connection(H2Socket):
    """One HTTP/2 client connection (see the module docstring)."""

    def __init__(
        self,
        ctx: Context,
        handle: ListenerHandle,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(ctx, handle, loop)
        self.streams: dict[int, Stream] = {}
        self.reset_budget = float(RAPID_RESET_BURST)
        self.reset_time = self.last
        self.goaway = 0  # 1: GOAWAY 2^31-1 and a PING sent; 2: the final GOAWAY sent
        self.goaway_at = 0.0  # when the final GOAWAY goes even if the PING never comes back
        self.last_stream = _LAST_STREAM_ID  # streams above it are refused
        self.opened = 0  # streams opened (client_header_timeout applies before the first)
        # Whether SETTINGS_ENABLE_CONNECT_PROTOCOL was advertised (``http2_websocket`` at
        # connection_made): a reload changing it must not refuse what this connection offered.
        self.websocket = False

    def accepted_at(self, when: float) -> None:
        self.last = self.reset_time = when

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.phase == CLOSED:  # refused (connections_per_client): not a byte of HTTP/2
            return
        lim = self.lr.limits
        list_size = lim.max_header_size + 32 * lim.max_header_count  # HPACK counts 32 a field
        h2 = self.h2
        settings = {
            SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
            SettingCodes.MAX_HEADER_LIST_SIZE: list_size,
        }
        self.websocket = self.lr.config.http2_websocket
        if self.websocket:
            settings[SettingCodes.ENABLE_CONNECT_PROTOCOL] = 1  # RFC 8441: WebSockets here
        h2.local_settings = Settings(client=False, initial_values=settings)
        h2.decoder.max_header_list_size = list_size  # h2 applies it only once acknowledged
        h2.initiate_connection()
        h2.increment_flow_control_window(CONNECTION_WINDOW - STREAM_WINDOW)
        self.send()
        t = self.lr.config.timeouts
        self._arm(self.last + min(t.idle, t.client_header))

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
        if self.websocket and extended_connect(raw):
            stream: Stream = WebSocketStream(self, sid)
        else:
            stream = Stream(self, sid)
        self.streams[sid] = stream
        req = stream.request(raw, ended)
        if req is not None:
            stream.exchange = ex = Exchange(self.ctx, self.lr, req, stream, self.loop)
            if ex.begin():
                ex.send()

    def _drain(self, sid: int) -> None:
        if sid:
            stream = self.streams.get(sid)
            if stream is not None and stream.out:
                stream.drain()
            return
        for stream in list(self.streams.values()):
            if stream.out:
                stream.drain()

    def stream_done(self, stream: StreamOut) -> None:
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
            when = self._stream_timeouts(stream, now, t.idle, t.request)
            if when:
                deadline = min(deadline, when)
        self.send()
        if self.phase != CLOSED:
            self._arm(deadline)

    def _stream_timeouts(self, stream: Stream, now: float, idle: float, request: float) -> float:
        """Apply ``stream``'s timeouts at ``now``; the next time to look again (0: none)."""
        if stream.tunneling():
            return 0.0  # its idle timeout is the tunnel's (tunnel.IdleSweeper)
        ex = stream.exchange
        if ex is None or ex.done:
            if stream.out and now >= stream.last + idle:  # the client stopped reading the answer
                stream.cut()
                return 0.0
            return stream.last + idle if stream.out else 0.0
        if ex.awaiting_head():
            deadline = ex.sent_at + request
            if now >= deadline:
                ex.request_timed_out(request)
                return 0.0
            return deadline
        deadline = stream.last + idle
        if now >= deadline:
            ex.idle_timed_out()
            return 0.0
        return deadline


class WebSocketStream(Stream):
    """The stream of an RFC 8441 extended CONNECT (``http2_websocket``): an exchange's
    ``Downstream`` up to the backend's 101, then the client side of its tunnel, carried in
    DATA frames both ways (``CarriedStream`` for its ``http2_tunnel.StreamTransport``).
    Before the 101 the client's bytes are held, unacknowledged (a stream window at most)."""

    __slots__ = ("carrier", "early", "half_end")

    def __init__(self, conn: H2Socket, sid: int) -> None:
        super().__init__(conn, sid)
        self.ws_key = websocket_key()  # the Sec-WebSocket-Key the backend gets (HTTP/2 has none)
        self.early: list[bytes] = []  # the client's bytes before the 101
        self.carrier: StreamTransport | None = None  # after the 101: the tunnel's side
        self.half_end = False  # END_STREAM waits for ``out`` to drain, the stream stays open

    def request(self, raw: Iterable[tuple[bytes, bytes]], ended: bool) -> RequestHead | None:
        req = super().request(raw, ended)
        if req is not None and req.upgrade is None:
            self.ws_key = b""  # not a WebSocket after all: an ordinary request
        return req

    def data(self, data: bytes, size: int) -> None:
        carrier = self.carrier
        if carrier is not None:
            self.last = self.conn.loop.time()
            carrier.received(data, size)
            return
        ex = self.exchange
        if self.ws_key and ex is not None and not ex.done:
            self.last = self.conn.loop.time()
            self.early.append(data)
            self.unacked += size
            return
        super().data(data, size)

    def request_ended(self) -> None:
        carrier = self.carrier
        if carrier is None:
            super().request_ended()
            return
        self.request_complete = True
        carrier.ended()

    def sync_upstream(self) -> None:
        carrier = self.carrier
        if carrier is None:
            super().sync_upstream()
            return
        if self.half_end and not self.out and not self.closed:
            self._end_output()  # what waited for a window went out: now the half-close
        want = bool(self.out) or self.conn.write_paused
        if want != self.write_paused and not self.closed:
            self.write_paused = want
            carrier.writable(not want)

    def client_reset(self) -> None:
        super().client_reset()
        carrier = self.carrier
        if carrier is not None:
            carrier.lost()

    def tunneling(self) -> bool:
        carrier = self.carrier
        return carrier is not None and not carrier.closing

    def upgrade(self, head: bytes) -> tuple[asyncio.Transport, bytes]:
        """The backend's 101 to an extended CONNECT (RFC 8441): the stream answers 200 with
        the subprotocol and extensions the backend chose, and becomes the tunnel's client
        transport; the connection and its slot stay the HTTP/2 connection's."""
        resp = parse_response_head(bytearray(head))
        assert resp is not None  # the response side parsed this very head
        self._headers(websocket_fields(resp), False)
        self.exchange = None
        self.slot = None  # the connection's, not the tunnel's to give back
        self.carrier = carrier = StreamTransport(self)
        # The tunnel counts itself a connection when it closes: this stream is one while open.
        self.conn.lr.stats.connections_active += 1
        pending = b"".join(self.early)
        self.early.clear()
        self.conn.bytes_in -= len(pending)  # the tunnel counts it
        if self.unacked:
            self.conn.ack(self.sid, self.unacked)
            self.unacked = 0
        # What ``write_paused`` said was the exchange's (the backend started paused for it,
        # ``Dispatch._attach``); the tunnel's start resumes reading the backend, and kept, the
        # carrier would never be told ``writable(False)`` for a client still behind. Anew for
        # the tunnel, once it has started.
        self.write_paused = False
        loop = self.conn.loop
        if self.closed:  # the 200 could not go out: the tunnel learns it once it has started
            loop.call_soon(carrier.lost)
        else:
            loop.call_soon(self.sync_upstream)
        self.conn.send()
        return carrier, pending

    def end_output(self) -> None:
        """A tunnel's half-close toward the client: END_STREAM once ``out`` is sent; the
        stream stays open for what the client still sends."""
        if self.closed or self.end_sent:
            return
        self.push_tail()
        if self.out:
            self.half_end = True
        else:
            self._end_output()
        self.conn.send()

    def _end_output(self) -> None:
        self.half_end = False
        if not self.end_sent:
            self.end_sent = True
            with contextlib.suppress(ProtocolError):
                self.conn.h2.end_stream(self.sid)

    # ------------------------------------------------------------------ CarriedStream
    def gone(self) -> bool:
        return self.closed

    def carried_in(self, n: int, size: int, ack: bool) -> None:
        conn = self.conn
        conn.bytes_in -= n  # the tunnel counts it
        if ack and not self.closed:
            conn.ack(self.sid, size)
        else:
            self.unacked += size

    def release_held(self) -> None:
        if self.unacked and not self.closed:
            self.conn.ack(self.sid, self.unacked)
            self.unacked = 0
            self.conn.send()

    def carried_out(self, data: bytes) -> None:
        self.write(data)
        self.conn.bytes_out -= len(data)  # the tunnel counts it

    def waiting_out(self) -> int:
        return sum(map(len, self.out)) + (len(self.tail) if self.tail is not None else 0)

    def extra_info(self, name: str, default: Any) -> Any:
        return self.conn.transport.get_extra_info(name, default)
