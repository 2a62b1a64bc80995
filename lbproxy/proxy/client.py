"""The HTTP/1.1 front end: one accepted client connection, its requests one after another.

Owns the client transport from its first byte until it closes or becomes a WebSocket tunnel:
reading and parsing request heads, keep-alive, pipelining (a request that arrives early waits
for the current response), the timers (client_header, idle, request; linger after an answer),
flow control toward the client (pausing its reads, and pausing the backend while the client
does not read), and the proxy's own answers to a request that never parsed (400, 408, or the
parser's 414/431/505).

Each parsed request becomes an ``exchange.Exchange``, which does the rest (server, body,
retries, response, accounting) and reaches the client through this connection's
``Downstream`` methods: ``send_head``, ``write``, ``flush``, ``end``, ``send_error``, ``cut``,
``pause_reading``/``resume_reading``, ``wake_at``, ``upgrade``, ``local_host``,
``forwarding_lines``. What does not depend on the protocol spoken (stats, pausing, the
timer, writes, closing, lingering, the edge policies, the client certificate) is the base
both front ends share, ``client_socket.ClientSocket``.

The edge policies (issue 16) hook in here from one place each, their state and decisions
being ``edge.py``'s: a new connection is admitted or refused (``limits``,
connections_per_client) and gets its listener's bandwidth shapers; client reads spend on the
inbound shaper (``P_BANDWIDTH``), backend reads on the outbound one (the exchange's
``Dispatch.spend``), and a full client buffer and a cap never undo each other's pause
(``write_paused``); the connection's slot goes to a tunnel with the transport. The 429 of
``requests_per_second`` is the exchange's (``Exchange.begin``), gzip the response's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from ..wire import headers
from ..wire.http1 import (
    BODY_CHUNKED,
    BODY_CLOSE,
    ParseError,
    RequestHead,
    ResponseHead,
    parse_request_head,
)
from .client_socket import ACTIVE, CLOSED, HEAD, P_BANDWIDTH, ClientSocket, ListenerHandle
from .exchange import BUFFER_LIMIT, Exchange, record
from .exchange_base import Downstream

if TYPE_CHECKING:
    from .context import Context

__all__ = ["ClientConnection", "ListenerHandle"]

log = logging.getLogger("lbproxy.http")
_clock = time.perf_counter

# Why client reading is paused (a bit each; reading resumes when none is left).
_P_EXCHANGE: Final = 1  # the exchange takes no more body (connecting, or the backend is full)
_P_PIPELINED: Final = 2  # a request that came early waits for the current response


class ClientConnection(ClientSocket, Downstream):
    """One HTTP/1.x client connection (see the module docstring); the exchanges' Downstream."""

    def __init__(
        self,
        ctx: Context,
        handle: ListenerHandle,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(ctx, handle, loop)
        self.exchange: Exchange | None = None  # the request being answered (phase ACTIVE)
        self.buf = bytearray()
        self.keep_alive = True
        self.version = 1  # the current request's minor HTTP version
        self.protocol = "HTTP/1.1"  # the current request's, for metrics and the access log
        self.chunked_ok = True
        # When the request head being read started to count against client_header_timeout
        # (the accept, or its first byte); 0.0 between requests.
        self.head_start = self.last

    def accepted_at(self, when: float) -> None:
        self.last = self.head_start = when

    # ------------------------------------------------------------------ client transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.phase == CLOSED:  # refused (connections_per_client)
            return
        t = self.lr.config.timeouts
        self._arm(min(self.last + t.idle, self.head_start + t.client_header))

    def data_received(self, data: bytes) -> None:
        self.last = self.loop.time()
        self.bytes_in += len(data)
        if self.shapers is not None:
            self._spend_in(len(data))
        if self.phase == HEAD:
            if not self.head_start:
                self._start_head_clock(self.last)
            self.buf += data
            self._read_head()
        elif self.phase == ACTIVE:
            ex = self.exchange
            assert ex is not None
            if not ex.req_done:
                rest = ex.request_data(data)
                if rest:
                    self.buf += rest
                    self._pause(_P_PIPELINED)
            else:
                self.buf += data
                if len(self.buf) > BUFFER_LIMIT:
                    self._pause(_P_PIPELINED)

    def eof_received(self) -> bool:
        self.client_eof = True
        self.keep_alive = False
        if self.phase == CLOSED:  # lingering after an answer: the client is done too
            self._close()
            return False
        if self.phase == HEAD:
            if self.buf:  # the head can never complete now
                self._bad_request(400, "client closed before sending the whole request head")
            else:
                self._close()
            return False
        ex = self.exchange
        if ex is not None and not ex.req_done:
            ex.fail(400, "client closed before sending the whole body")  # it never can now
            return False
        # Keep writing the response to a half-closed client; TLS has no half-close (the
        # transport closes after the client's close_notify whatever this returns).
        return self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.client_gone()
        self._close()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.pause_upstream()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.resume_upstream()

    # ------------------------------------------------------------------ requests
    def _read_head(self) -> None:
        try:
            req = parse_request_head(self.buf, self.lr.limits)
        except ParseError as exc:
            log.info("%s: bad request: %s", self.client_addr, exc.reason)
            self._bad_request(exc.status, exc.reason)
            return
        if req is None:
            return
        del self.buf[: req.raw_len]
        self._start_request(req)

    def _start_head_clock(self, now: float) -> None:
        """The first byte of a request head: client_header_timeout counts from ``now``."""
        self.head_start = now
        self.wake_at(now + self.lr.client_header_timeout)

    def _start_request(self, req: RequestHead) -> None:
        self.lr = lr = self.handle.runtime  # a keep-alive connection's next request sees a reload
        self.phase = ACTIVE
        self.head_start = 0.0
        if req.target[0] != 0x2F and req.method != b"CONNECT" and req.target != b"*":
            # Absolute-form (RFC 9112 3.2.2): the parser took Host from its authority; rules
            # and backends see the origin-form path.
            req.target = headers.origin_form(req.target)
        self.version = req.version
        self.protocol = "HTTP/1.1" if req.version else "HTTP/1.0"
        self.chunked_ok = req.version >= 1
        self.keep_alive = req.keep_alive and not self.client_eof and not self.ctx.draining
        self.exchange = ex = Exchange(self.ctx, lr, req, self, self.loop)
        if not ex.begin():
            return
        if self.buf and not ex.req_done:
            data = bytes(self.buf)
            self.buf.clear()
            rest = ex.request_data(data)
            if ex.done:
                return
            self.buf += rest
        if self.buf:
            self._pause(_P_PIPELINED)  # answered in order, after this one
        # Expect: 100-continue needs nothing here: the backend's 100 is relayed as an interim
        # response.
        ex.send()

    # ------------------------------------------------------------------ Downstream
    def send_head(
        self, resp: ResponseHead, extra: tuple[bytes, ...], kind: int, ended: bool
    ) -> int:
        ex = self.exchange
        assert ex is not None
        relayed = kind == BODY_CHUNKED and self.chunked_ok
        chunked = relayed or ex.response.gz is not None  # gzip's output is chunked too
        if kind == BODY_CLOSE or (kind == BODY_CHUNKED and not relayed) or not ex.req_done:
            # The body ends by closing, or the rest of the request body would be taken for a
            # new request.
            self.keep_alive = False
        head = headers.client_response_head(
            resp,
            chunked=chunked,
            keep_alive=self.keep_alive,
            client_version=self.version,
            extra=extra,
        )
        n = len(head)
        self.bytes_out += n
        if ended:
            self.transport.write(head)
        else:
            # Held back to go out with the first body bytes in one writev: a small response
            # then costs the client side one syscall, not two.
            self.head_out = head
        return n

    def end(self) -> None:
        """The response is complete: the next request, or close."""
        ex = self.exchange
        assert ex is not None
        self.flush()  # a body that brought no bytes of its own
        self.exchange = None
        if not self.keep_alive or self.ctx.draining:
            # Unread request body, or bytes left waiting in the socket: linger (see below).
            linger = not ex.req_done or self.paused != 0 or bool(self.buf)
            self._close_after_write(linger=linger)
            return
        self.phase = HEAD
        if self.paused & (_P_EXCHANGE | _P_PIPELINED):
            # What the exchange paused for ended with it; early bytes go now (unless the
            # bandwidth cap still holds them back).
            self.paused &= P_BANDWIDTH
            if not self.paused:
                self.transport.resume_reading()
        if self.buf:
            self._start_head_clock(self.loop.time())  # a pipelined request, waiting since
            self._read_head()

    def send_error(self, status: int, reason: str, extra: tuple[tuple[str, str], ...]) -> int:
        self.exchange = None
        if self.phase == CLOSED:
            return 0
        data = headers.error_response(status, reason, extra=extra)
        self.write(data)
        self._close_after_write(linger=True)
        return len(data)

    def cut(self) -> None:
        self.exchange = None
        self.transport.abort()
        self._close()

    def pause_reading(self) -> None:
        self._pause(_P_EXCHANGE)

    def resume_reading(self) -> None:
        self._resume(_P_EXCHANGE)

    def upgrade(self, head: bytes) -> tuple[asyncio.Transport, bytes]:
        self.write(head)
        self.exchange = None
        ls = self.lr.stats
        ls.live.discard(self)  # the tunnel counts the connection from now on
        ls.bytes_in += self.bytes_in
        ls.bytes_out += self.bytes_out
        self._cancel_timer()
        self.phase = CLOSED
        self.paused = 0
        pending = bytes(self.buf)
        self.buf.clear()
        return self.transport, pending

    # ------------------------------------------------------------------ endings
    def _bad_request(self, status: int, reason: str) -> None:
        """A request that never parsed (or never completed its head): answer and close."""
        if self.phase == CLOSED:
            return
        if status >= 500:
            log.info("%s: %d: %s", self.client_addr, status, reason)
        t_start = _clock()  # a request that never parsed: its time and bytes start now
        bytes_in = len(self.buf)
        n = self.send_error(status, reason, ())
        lr = self.lr
        group = lr.group.name  # the listener's default: the request was never routed
        record(
            self.ctx,
            lr,
            self.client_addr,
            group,
            "",
            status,
            None,
            t_start,
            None,
            bytes_in,
            n,
            protocol=self.protocol,
        )

    def shutdown(self) -> None:
        """Graceful stop: an idle connection closes now, a busy one after its response."""
        if self.phase == HEAD and not self.buf:
            self._close()

    # ------------------------------------------------------------------ flow control and timer
    def _on_timer(self) -> None:
        self.timer = None
        if self.phase == CLOSED:
            return
        now = self.loop.time()
        t = self.lr.config.timeouts
        ex = self.exchange
        if ex is not None and ex.awaiting_head():
            deadline = ex.sent_at + t.request
            if now >= deadline:
                ex.request_timed_out(t.request)
                return
        else:
            deadline = self.last + t.idle
            head_deadline = 0.0
            if self.phase == HEAD and self.head_start:
                head_deadline = self.head_start + t.client_header
                if now >= head_deadline:
                    if not self.buf:
                        self._close()  # never sent a byte (a browser's preconnect, say)
                        return
                    log.info(
                        "%s: request head not complete within %gs",
                        self.client_addr,
                        t.client_header,
                    )
                    self._bad_request(408, f"request head not complete within {t.client_header:g}s")
                    return
            if now >= deadline:
                if ex is not None:
                    ex.idle_timed_out()
                elif self.buf:
                    self._bad_request(408, "idle timeout in the request head")
                else:
                    self._close()
                return
            if head_deadline and head_deadline < deadline:
                deadline = head_deadline
        self._arm(deadline)
