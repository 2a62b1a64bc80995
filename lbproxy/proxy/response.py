"""The response side of one exchange: the backend's response head (interim ones relayed, a 101
handed to a tunnel, a sid hunt's 400 sent on), its body framing (length, chunked, close;
decoded for a client that cannot read chunked; gzip), and the relay of both to the client.
Errors in what the backend sends become the exchange's 502 or cut (``bad_gateway``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..wire import headers
from ..wire.http1 import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    ChunkedTracker,
    ParseError,
    ResponseHead,
    parse_response_head,
    response_body_kind,
)
from . import gzip_filter
from .exchange_base import ExchangeBase, describe, log, no_extensions

if TYPE_CHECKING:
    from .dispatch import Dispatch


class Response:
    """The response side of one exchange: reads the backend's response head, frames the body,
    relays both downstream. The exchange (the backend connection's handler) passes itself in:
    nothing here points back at it, so a finished exchange is freed by reference counting.
    ``dispatch`` is the same exchange's: the server and connection the response comes from."""

    __slots__ = ("buf", "decode", "dispatch", "gz", "head", "kind", "remaining", "tracker")

    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.head: ResponseHead | None = None
        self.buf = bytearray()  # response head bytes not parsed yet
        self.kind = BODY_NONE
        self.remaining = 0
        self.tracker: ChunkedTracker | None = None
        self.decode = False  # chunked framing removed for this client
        self.gz: gzip_filter.GzipStream | None = None  # the body being compressed (gzip)

    def data(self, ex: ExchangeBase, data: bytes) -> None:
        """Bytes from the backend."""
        if self.head is None:
            self.buf += data
            self.read_head(ex)
        else:
            self.body(ex, data)

    def reset(self) -> None:
        """A new connection to a server: nothing of a response read yet."""
        self.buf.clear()

    # ------------------------------------------------------------------ head
    def read_head(self, ex: ExchangeBase) -> None:
        buf = self.buf
        while self.head is None and not ex.done:
            try:
                resp = parse_response_head(buf)
            except ParseError as exc:
                ex.bad_gateway(f"invalid response head: {exc.reason}")
                return
            if resp is None:
                return
            status = resp.status
            # The head's own bytes: only a 101 and an interim response are passed on as such.
            raw = bytes(buf[: resp.raw_len]) if status < 200 else b""
            del buf[: resp.raw_len]
            aff = ex.affinity
            if status == 101:
                if ex.upgrade:
                    if no_extensions(ex.lr.config) and headers.accepts_extension(resp):
                        # Not offered (the offer was dropped): a compressed message could
                        # pass max_message_size, so the tunnel is never made.
                        ex.bad_gateway("101 accepting a WebSocket extension that was not offered")
                        return
                    if aff is not None and aff.hunt:
                        self.dispatch.sid_hunt(ex, status)  # found the session's server: pin it
                    if aff is not None:
                        raw = self._pin_upgrade(ex, resp, raw)
                    self.dispatch.hand_over(ex, raw, bytes(buf))
                else:
                    ex.bad_gateway("101 Switching Protocols to a request that asked for none")
                return
            if status < 200:
                # Interim responses (100 Continue, 103 Early Hints) go to HTTP/1.1 clients as-is
                # (an HTTP/2 stream drops them: it frames only what follows its send_head).
                if ex.req.version >= 1:
                    ex.write(raw)
                continue
            if aff is not None and aff.hunt and self.dispatch.sid_hunt(ex, status):
                buf.clear()  # the 400's body: not read
                return
            self._start(ex, resp)
            if buf and not ex.done:
                rest = bytes(buf)
                buf.clear()
                self.body(ex, rest)
            elif not ex.done:
                ex.down.flush()  # the body comes in a later read
            return

    def _pin_upgrade(self, ex: ExchangeBase, resp: ResponseHead, raw: bytes) -> bytes:
        """A 101 pins the session as any answer does: an upgrade placed anew (no insert
        cookie yet, or its server gone, down or relieved by a rebalance) gets its cookie on
        the 101 itself, the one answer it sees."""
        server = self.dispatch.server
        aff = ex.affinity
        assert server is not None and aff is not None
        now = ex.loop.time()
        extra = aff.response(101, resp.headers, server.id, server.token, now)
        if not extra:
            return raw
        return raw[:-2] + b"".join(line + b"\r\n" for line in extra) + b"\r\n"

    def _start(self, ex: ExchangeBase, resp: ResponseHead) -> None:
        server = self.dispatch.server
        assert server is not None
        server.stats.upstream_response.observe(ex.head_time())
        self.head = resp
        kind = response_body_kind(ex.req.method, resp)
        self.kind = kind
        if kind == BODY_LENGTH:
            assert resp.content_length is not None
            self.remaining = resp.content_length
        elif kind == BODY_CHUNKED:
            self.tracker = ChunkedTracker()
            # HTTP/1.0 cannot read chunked: send the payload and end it by closing.
            self.decode = not ex.down.chunked_ok
        extra: tuple[bytes, ...] = ()
        if ex.affinity is not None:
            now = ex.loop.time()
            extra = ex.affinity.response(resp.status, resp.headers, server.id, server.token, now)
        out = resp
        gzip_cfg = ex.lr.config.gzip
        if gzip_cfg is not None:  # gzip: maybe another head, and a stream for the body
            # An HTTP/2 stream (no chunked framing) frames the compressed bytes itself.
            out, self.gz = gzip_filter.start(gzip_cfg, ex.req, resp, kind, ex.down.chunked_ok)
        ended = kind == BODY_NONE or (kind == BODY_LENGTH and self.remaining == 0)
        ex.start_response(out, extra, kind, ended)
        if ended:
            ex.finish()

    # ------------------------------------------------------------------ body
    def body(self, ex: ExchangeBase, data: bytes) -> None:
        aff = ex.affinity
        if aff is not None and aff.probe is not None:
            server = self.dispatch.server
            assert server is not None
            ttl = ex.lr.config.timeouts.idle
            aff.read_handshake(data, self.kind == BODY_CHUNKED, server.id, ex.loop.time(), ttl)
        if self.gz is not None:
            self._gzip_body(ex, self.gz, data)
            return
        kind = self.kind
        if kind == BODY_LENGTH:
            n = self.remaining
            if len(data) < n:
                self.remaining = n - len(data)
                ex.write(data)
                return
            if len(data) > n:
                # Bytes beyond the declared length: the connection is not reusable.
                ex.write(data[:n])
                self.remaining = 0
                ex.finish(reuse=False)
                return
            ex.write(data)
            self.remaining = 0
            ex.finish()
        elif kind == BODY_CHUNKED:
            tracker = self.tracker
            assert tracker is not None
            try:
                if self.decode:
                    pieces, used = tracker.feed_decode(data)
                    for p in pieces:
                        ex.write(p)
                else:
                    used = tracker.feed(data)
                    ex.write(data[:used] if used < len(data) else data)
            except ParseError as exc:
                ex.bad_gateway(f"invalid chunked response: {exc.reason}")
                return
            if tracker.done:
                ex.finish(reuse=used == len(data))
        elif kind == BODY_CLOSE:
            ex.write(data)
        else:
            ex.finish(reuse=False)  # bytes after a body-less response

    def _gzip_body(self, ex: ExchangeBase, gz: gzip_filter.GzipStream, data: bytes) -> None:
        """The body through gzip: the stream reads the backend's framing itself."""
        try:
            out, done, clean = gz.feed(data)
        except ParseError as exc:
            ex.bad_gateway(f"invalid chunked response: {exc.reason}")
            return
        if out:
            ex.write(out)
        if done:
            ex.finish(reuse=clean)

    def gzip_tail(self, ex: ExchangeBase) -> None:
        """The compressed body's last bytes, at its end."""
        gz = self.gz
        assert gz is not None
        self.gz = None
        tail = gz.finish()
        if tail:
            ex.write(tail)

    def ended(self, ex: ExchangeBase, exc: Exception | None) -> None:
        """The backend connection closed (``exc``: why, if known)."""
        dispatch = self.dispatch
        up, server = dispatch.up, dispatch.server
        if ex.done or up is None:
            return
        assert server is not None
        resp = self.head
        if resp is None:
            reason = describe(exc) if exc else "closed before responding"
            if not self.buf:
                dispatch.failed(ex, server, "reset", reason, fresh=not up.reused)
            else:
                ex.bad_gateway(f"incomplete response head: {reason}", "reset")
            return
        if self.kind == BODY_CLOSE:
            ex.finish(reuse=False)
            return
        # The response was cut short: the client can only learn it from a cut connection.
        server.stats.errors["reset"] += 1
        log.warning("%s: upstream %s closed mid-response", ex.down.client_addr, server.label)
        ex.cut()
