"""One proxied request and its response, whatever front end the request came in on.

Owns, per request: its head and body framing toward the backend (with the balancer's own
lines: forwarding options, X-Client-Cert-*), the choice of a server (asking
``sticky.Affinity`` for the session's pin), connecting (to the server's resolved addresses),
retries, the response (``Response``: head, body framing, gzip, relay), backend reads under
the listener's bandwidth cap, the 429 of ``limits.requests_per_second``, the tunnel after a
101 (taking the client's connection slot) and the accounting (metrics, access log; a cut
response too).

An ``Exchange`` never touches the client's socket: it talks to its front end through the
small ``Downstream`` interface (write a response head, body bytes, end, pause, resume, cut,
answer an error, give the transport to a tunnel). ``http_proxy.ClientConnection`` is the
HTTP/1.1 front end; another (an HTTP/2 stream) can drive the same exchange.

Three objects per request, the exchange pointing at the other two and nothing pointing back
(a finished exchange is freed by reference counting): ``Exchange`` (the request, its state,
flow control, timeouts, endings, accounting; its fields and the methods the other two call
are ``exchange_base.ExchangeBase``'s), ``dispatch.Dispatch`` (the server, the connection to
it, the body on its way there, retries), ``response.Response`` (the backend's answer). Each
writes only its own fields. One place each: the state and its moves ``exchange_state``
(drawn there), choosing a server ``Dispatch.choose``, the upstream request head
``dispatch.upstream_head``, letting the server's connection go to a tunnel
``Dispatch.hand_over`` and the tunnel itself ``Exchange.start_tunnel``, releasing the server
and its connection ``Dispatch.release``, whether to retry ``exchange_state.can_retry``, the
response head ``Response._start``, giving up ``Exchange.fail``/``cut``, accounting
``Exchange.account``.

Errors map to statuses in one place (``_fail``): connect/reset -> 502, timeout -> 504,
nothing available -> 503, a malformed body -> 400.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.sticky import Affinity
from ..wire import headers
from ..wire.http1 import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    ChunkedTracker,
    ParseError,
    request_body_kind,
)
from .dispatch import Dispatch
from .exchange_base import (
    BUFFER_LIMIT,
    IDEMPOTENT,
    P_UPSTREAM_FULL,
    P_WAITING,
    Downstream,
    ExchangeBase,
    log,
    record,
)
from .exchange_state import BODY_SENT, END, REQUEST_END, responding
from .response import Response
from .tunnel import Tunnel

if TYPE_CHECKING:
    import asyncio

    from ..core.snapshot import ListenerRuntime, ServerState
    from ..wire.http1 import RequestHead
    from .context import Context

# What the front ends import from here (the exchange's interface is one module for them).
__all__ = ["BUFFER_LIMIT", "Downstream", "Exchange", "record"]


class Exchange(ExchangeBase):
    """One request and its response, from the parsed head until the response is complete,
    failed, or handed to a tunnel: the request side, flow control, timeouts, the endings and
    the accounting. ``dispatch`` sends the request to a server, ``response`` relays the answer.

    The front end calls ``begin``, ``request_data`` (the body as it arrives), ``send``, and the
    flow-control, timeout and client-event methods; the backend connection in use reports to
    it (``upstream_*``)."""

    __slots__ = ("dispatch", "kind", "remaining", "response", "tracker")

    def __init__(
        self,
        ctx: Context,
        lr: ListenerRuntime,
        req: RequestHead,
        down: Downstream,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        kind = request_body_kind(req)
        super().__init__(ctx, lr, req, down, kind, loop)
        self.kind = kind
        self.remaining = 0
        self.tracker: ChunkedTracker | None = None
        if kind == BODY_LENGTH:
            assert req.content_length is not None
            self.remaining = req.content_length
        elif kind == BODY_CHUNKED:
            self.tracker = ChunkedTracker()
        replayable = req.method in IDEMPOTENT
        cfg = self.group.sticky
        if cfg is not None:
            pins = self.group.pins
            self.affinity = Affinity(cfg, pins.sids, pins.cookies, req.target, req.headers)
            if cfg.socketio and b"sid=" in req.target:
                replayable = True  # an Engine.IO POST may have to go to another server (hunt)
        self.dispatch = dispatch = Dispatch(replayable)
        self.response = Response(dispatch)

    def begin(self) -> bool:
        """False when the listener answers the request itself (429 past
        ``limits.requests_per_second``, upgrades counted too; ``redirect_https``)."""
        lr, down = self.lr, self.down
        if lr.config.limits is not None:
            edges = self.ctx.edges
            wait = edges.retry_after(lr, down.slot, down.client_ip, self.req.headers, down.last)
            if wait is not None:
                self.answer(429, "request rate limit", (("Retry-After", wait),))
                return False
        port = lr.config.redirect_https
        if port:
            host = self.req.host
            if host is None:  # an HTTP/1.0 request without Host: the address it connected to
                host = self.down.local_host()
            location = headers.https_location(host, port, self.req.target)
            self.answer(301, location, (("Location", location),))
            return False
        return True

    def send(self) -> None:
        """Choose a server and send the request (the body follows as it arrives)."""
        self.dispatch.choose(self)

    # ------------------------------------------------------------------ request body
    def request_data(self, data: bytes) -> bytes:
        """Forward (or hold, while connecting) body bytes; returns what follows the body
        (the next request's bytes)."""
        rest = b""
        if self.kind == BODY_LENGTH:
            n = self.remaining
            if len(data) > n:
                data, rest = data[:n], data[n:]
            self.remaining = n = n - len(data)
            complete = n == 0
        else:
            tracker = self.tracker
            assert tracker is not None
            try:
                used = tracker.feed(data)
            except ParseError as exc:
                self.fail(exc.status, f"bad chunked body: {exc.reason}")
                return b""
            if used < len(data):
                data, rest = data[:used], data[used:]
            complete = tracker.done
        sent = False
        if data:
            self.bytes_in += len(data)  # the head was counted when it parsed
            sent = self.dispatch.forward(self, data)
            if sent:
                self.move(BODY_SENT)
        if complete:
            self.move(REQUEST_END)
            if sent:
                self.sent()
        return rest

    def connected(self, body_sent: bool) -> None:
        if body_sent:
            self.move(BODY_SENT)
        self.response.reset()
        self.sent()
        self.resume(P_WAITING)

    # ------------------------------------------------------------------ UpstreamConnection.handler
    def upstream_data(self, data: bytes) -> None:
        self.down.last = self.loop.time()
        if self.down.shapers is not None:
            self.dispatch.spend(self, len(data))
        self.response.data(self, data)

    def upstream_eof(self) -> None:
        self.response.ended(self, None)

    def upstream_lost(self, exc: Exception | None) -> None:
        self.response.ended(self, exc)

    def upstream_pause(self) -> None:
        self.pause(P_UPSTREAM_FULL)

    def upstream_resume(self) -> None:
        self.resume(P_UPSTREAM_FULL)

    # ------------------------------------------------------------------ flow control
    def pause_upstream(self) -> None:
        """The client reads slower than the backend sends."""
        self.dispatch.pause_reading()

    def resume_upstream(self) -> None:
        self.dispatch.resume_reading()

    def uncap(self) -> None:
        self.dispatch.uncap(client_full=self.down.write_paused)

    # ------------------------------------------------------------------ timeouts, client events
    def awaiting_head(self) -> bool:
        """The request is with the server and no response head came yet: request_timeout
        applies (while the body is still coming, idle does)."""
        return self.dispatch.up is not None and self.response.head is None and self.req_done

    def request_timed_out(self, timeout: float) -> None:
        server = self.dispatch.server
        assert server is not None
        server.stats.errors["timeout"] += 1
        log.warning(
            "%s: upstream %s sent no response head within %gs",
            self.down.client_addr,
            server.label,
            timeout,
        )
        self.fail(504, f"no response from the server within {timeout:g}s")

    def idle_timed_out(self) -> None:
        if responding(self.state):
            log.info("%s: idle timeout mid-response", self.down.client_addr)
            self.fail(504, "idle timeout")
        elif self.dispatch.stopped_reading(self):
            self.fail(504, "the server stopped reading the request body")
        else:
            self.fail(504 if self.req_done else 408, "idle timeout")

    def client_gone(self) -> None:
        """The client went away mid-request: nothing more can be delivered."""
        if self.done:
            return
        self.move(END)
        self.account(499)
        self.dispatch.release(self, reuse=False)

    # ------------------------------------------------------------------ endings
    def finish(self, reuse: bool = True) -> None:
        """The response is complete: account, release the backend, let the front go on."""
        response = self.response
        resp = response.head
        assert resp is not None
        if response.gz is not None:  # the end of a compressed body (if the close framed it)
            response.gzip_tail(self)
        self.move(END)
        self.account(resp.status)
        reuse = reuse and self.req_done and resp.keep_alive and response.kind != BODY_CLOSE
        self.dispatch.release(self, reuse)
        self.down.end()

    def bad_gateway(self, reason: str, kind: str = "protocol") -> None:
        server = self.dispatch.server
        if server is not None:
            # Not a passive failure (health.py: only a failed connect or a fresh reset is):
            # a bad answer to one request says nothing about the server's other requests.
            server.stats.errors[kind] += 1
            log.warning("%s: upstream %s: %s", self.down.client_addr, server.label, reason)
        self.fail(502, reason)

    def fail(self, status: int, reason: str) -> None:
        """Give up on the request: answer ``status``, or cut the connection if the response
        has already started."""
        if responding(self.state):
            self.cut()
            return
        self.dispatch.release(self, reuse=False)
        self.answer(status, reason)

    def cut(self) -> None:
        """The response has started: the client can only learn of a failure from a cut.
        Counted and logged with the status that started, whatever cut it (a bad or closing
        backend, a timeout)."""
        resp = self.response.head
        if resp is not None:
            self.account(resp.status)
        self.move(END)
        self.dispatch.release(self, reuse=False)
        self.down.cut()

    def account(self, status: int, access_line: bool = True) -> None:
        """One request done: metrics and the access log line."""
        tried = self.dispatch.tried
        # The last server tried, even if it has been released (a 502 belongs to it).
        label = tried[-1].label if tried else ""
        record(
            self.ctx,
            self.lr,
            self.down.client_addr,
            self.group.name,
            label,
            status,
            self.req,
            self.t_start,
            self.t_headers,
            self.bytes_in,
            self.bytes_out,
            access_line,
            self.down.protocol,
        )

    def start_tunnel(
        self,
        server: ServerState,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        client_pending: bytes,
        backend_pending: bytes,
    ) -> None:
        """101: the tunnel between the client's and ``server``'s connections, taking over the
        client's connection slot (it gives it back when it closes)."""
        down, aff, req, access = self.down, self.affinity, self.req, self.ctx.access
        slot, down.slot = down.slot, None
        config = self.lr.config
        tunnel = Tunnel(
            self.loop,
            client,
            backend,
            listener=self.lr.stats,
            group=self.group.name,
            server=server,
            idle_timeout=config.timeouts.idle,
            access=access,
            # Kept only for the access log's line: an idle tunnel is mostly these strings.
            client_addr=down.client_addr if access.enabled else "-",
            method_path=(
                (req.method.decode("latin-1"), req.target.decode("latin-1"))
                if access.enabled
                else None
            ),
            slot=slot,
            on_close=aff.tunnel_closed if aff is not None and aff.sid is not None else None,
            policy=config.websocket,
            shapers=down.shapers,
            protocol=down.protocol,
        )
        tunnel.start(client_pending, backend_pending, down.write_paused)
