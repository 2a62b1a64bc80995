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
(a finished exchange is freed by reference counting): ``Exchange`` (the request, flow
control, timeouts, endings, accounting), ``Dispatch`` (the server and the connection to it),
``Response`` (the backend's answer). One place each: choosing a server ``Dispatch.choose``,
the upstream request head ``Dispatch.upstream_head``, the tunnel ``Dispatch.hand_over``,
releasing the server and its connection ``Dispatch.release``, the response head
``Response._start``, giving up ``Exchange.fail``/``cut``, accounting ``Exchange.account``.

Retries, where they are safe:
- a failed connect (refused, timeout) marks the server down and tries another;
- a fresh connection that resets before any response byte marks it down and tries another;
- a reused pooled connection that turns out dead is a stale entry: retried, not counted;
- never once response bytes reached the client; a non-idempotent request never after its
  body was sent; an idempotent one only if its body (if any) is still small enough to replay.

Errors map to statuses in one place (``_fail``): connect/reset -> 502, timeout -> 504,
nothing available -> 503, a malformed body -> 400.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import TYPE_CHECKING, Protocol

from . import bandwidth, edge, gzip_filter, headers, sticky, upstream
from .http1 import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    ChunkedTracker,
    ParseError,
    RequestHead,
    ResponseHead,
    parse_response_head,
    request_body_kind,
    response_body_kind,
)
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .access_log import AccessLog
    from .config import Forwarding, Listener
    from .metrics import Registry
    from .snapshot import GroupRuntime, ListenerRuntime, ServerState

log = logging.getLogger("lbproxy.http")
_clock = time.perf_counter

# connect() failures that are the proxy's own shortage, not the backend's.
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
REPLAY_LIMIT = 65536  # bytes of an idempotent request body kept for a retry
BUFFER_LIMIT = 65536  # client bytes buffered ahead (pipelining, body before connect)

# Why the exchange takes no more request body (a bit each; reading resumes when none is left).
_P_UPSTREAM_FULL = 1  # the backend is not reading the body as fast as the client sends it
_P_WAITING = 2  # connecting, or body bytes piling up before a connection is there


class Health(Protocol):
    """Passive health: where a failure seen while proxying goes (app.PassiveHealth)."""

    def passive_failure(self, server: ServerState, reason: str) -> None: ...


class Context:
    """What every connection of the process shares: the health reporter, stats, access log,
    the edge policies' state (per-client limits, bandwidth shapers: kept across reloads)."""

    def __init__(self, registry: Registry, access: AccessLog, report_health: Health) -> None:
        self.registry = registry
        self.access = access
        self.report_health = report_health
        self.draining = False
        self.edges = edge.Edges()


class Downstream(Protocol):
    """The client side of an exchange, as the exchange sees it (one per front end).

    Writes are counted by the exchange for its access-log line; the front end counts its own.
    """

    client_ip: str
    client_addr: str
    protocol: str  # what the client speaks, as metrics and the access log name it: "HTTP/2"
    last: float  # loop time of the last activity (upstream bytes keep the client side alive)
    chunked_ok: bool  # whether a chunked response body may go out with its framing
    cert_headers: tuple[bytes, ...]  # X-Client-Cert-* of a verified client certificate
    slot: edge.Slot | None  # its place in connections_per_client (a tunnel takes it over)
    shapers: bandwidth.Bandwidth | None  # the listener's bandwidth cap (backend reads spend too)
    write_paused: bool  # the client's write buffer is full (backend reading paused for it)

    def send_head(
        self, resp: ResponseHead, extra: tuple[bytes, ...], kind: int, ended: bool
    ) -> int:
        """Start the response (``kind``: its body framing; ``ended``: it has no body);
        returns the bytes it takes on the wire. May be held back to go with the first body
        bytes (``flush`` sends it alone)."""
        ...

    def write(self, data: bytes) -> None:
        """Response bytes (an interim response, or body bytes as framed for this client)."""
        ...

    def flush(self) -> None:
        """Send a held-back response head now: no body bytes came with it."""
        ...

    def end(self) -> None:
        """The response is complete and the exchange is over (the backend released)."""
        ...

    def send_error(self, status: int, reason: str, extra: tuple[tuple[str, str], ...]) -> int:
        """Answer with the proxy's own short response and close; returns the bytes written."""
        ...

    def cut(self) -> None:
        """The response started and cannot complete: the client learns it from a cut."""
        ...

    def pause_reading(self) -> None:
        """Take no more request body for now."""
        ...

    def resume_reading(self) -> None: ...

    def wake_at(self, when: float) -> None:
        """Check this exchange's timeouts at loop time ``when`` at the latest."""
        ...

    def upgrade(self, head: bytes) -> tuple[asyncio.Transport, bytes]:
        """Write the 101 ``head`` and give up the client transport to a tunnel; returns it and
        the client bytes read beyond the request."""
        ...

    def local_host(self) -> bytes:
        """The address the client connected to, as a Host value."""
        ...

    def forwarding_lines(self, fwd: Forwarding) -> tuple[bytes, ...]:
        """The balancer-owned header lines (``fwd.extra``: CLB's optional ones) for this
        client's connection."""
        ...


def _no_extensions(config: Listener) -> bool:
    """Whether WebSocket extensions are kept off this listener's tunnels: under a
    ``max_message_size`` (a compressed frame's length is not its message's size)."""
    policy = config.websocket
    return policy is not None and policy.max_message_size > 0


def record(
    ctx: Context,
    lr: ListenerRuntime,
    client_addr: str,
    group: str,
    server: str,
    status: int,
    req: RequestHead | None,
    t_start: float,
    upstream_time: float | None,
    bytes_in: int,
    bytes_out: int,
    access_line: bool = True,
    protocol: str = "HTTP/1.1",
) -> None:
    """One request done: metrics and the access log line."""
    now = _clock()
    lr.stats.count_request(group, server, status, now - t_start, protocol)
    access = ctx.access
    if access_line and access.enabled:
        access.request(
            client=client_addr,
            listener=lr.name,
            method=req.method.decode("latin-1") if req else "-",
            path=req.target.decode("latin-1") if req else "-",
            status=status,
            server=server,
            upstream_time=upstream_time,
            total_time=now - t_start,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            protocol=protocol,
        )


class Exchange:
    """One request and its response, from the parsed head until the response is complete,
    failed, or handed to a tunnel: the request side, flow control, timeouts, the endings and
    the accounting. ``dispatch`` sends the request to a server, ``response`` relays the answer.

    The front end calls ``begin``, ``request_data`` (the body as it arrives), ``send``, and the
    flow-control, timeout and client-event methods; the backend connection in use reports to
    it (``upstream_*``)."""

    __slots__ = (
        "affinity",
        "body_sent",
        "bytes_in",
        "bytes_out",
        "ctx",
        "dispatch",
        "done",
        "down",
        "group",
        "kind",
        "loop",
        "lr",
        "paused",
        "pending",
        "pending_size",
        "remaining",
        "replay",
        "req",
        "req_done",
        "response",
        "sent_at",
        "t_headers",
        "t_sent",
        "t_start",
        "tracker",
        "upgrade",
    )

    def __init__(
        self, ctx: Context, lr: ListenerRuntime, req: RequestHead, down: Downstream
    ) -> None:
        self.ctx = ctx
        self.lr = lr
        self.loop = asyncio.get_running_loop()
        self.down = down
        self.req = req
        self.done = False  # answered, failed, cut, handed over, or the client went away
        self.t_start = _clock()
        # Measurements use perf_counter (uvloop's loop.time() moves in whole milliseconds);
        # timers use loop.time(): sent_at is when request_timeout started counting.
        self.t_sent = 0.0
        self.t_headers: float | None = None
        self.sent_at = 0.0
        self.bytes_in = req.raw_len
        self.bytes_out = 0
        self.group: GroupRuntime = lr.route(req.host, req.target)
        self.upgrade = req.upgrade == b"websocket"
        kind = request_body_kind(req)
        self.kind = kind
        self.remaining = 0
        self.tracker: ChunkedTracker | None = None
        self.req_done = kind == BODY_NONE
        if kind == BODY_LENGTH:
            assert req.content_length is not None
            self.remaining = req.content_length
            self.req_done = req.content_length == 0
        elif kind == BODY_CHUNKED:
            self.tracker = ChunkedTracker()
        self.pending: list[bytes] = []  # body bytes not yet written to a backend
        self.pending_size = 0
        self.replay: list[bytes] | None = [] if req.method in IDEMPOTENT else None
        self.body_sent = False
        self.paused = 0
        self.affinity: sticky.Affinity | None = None
        cfg = self.group.sticky
        if cfg is not None:
            pins = self.group.pins
            self.affinity = sticky.Affinity(cfg, pins.sids, pins.cookies, req.target, req.headers)
            if cfg.socketio and b"sid=" in req.target:
                self.replay = []  # an Engine.IO POST may have to go to another server (hunt)
        self.dispatch = Dispatch()
        self.response = Response()

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
            self.remaining = n - len(data)
            if self.remaining == 0:
                self.req_done = True
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
            if tracker.done:
                self.req_done = True
        if data:
            self.bytes_in += len(data)  # the head was counted when it parsed
            if self.replay is not None:
                self.replay.append(data)
                if sum(map(len, self.replay)) > REPLAY_LIMIT:
                    self.replay = None
            up = self.dispatch.up
            if up is not None:
                self.body_sent = True
                up.transport.write(data)
                if self.req_done:
                    self.sent()
            else:
                self.pending.append(data)
                self.pending_size += len(data)
                if self.pending_size > BUFFER_LIMIT:
                    self.pause(_P_WAITING)
        return rest

    def sent(self) -> None:
        """The whole request is with the server: request_timeout counts from here."""
        self.t_sent = _clock()
        self.sent_at = now = self.loop.time()
        self.down.wake_at(now + self.lr.config.timeouts.request)

    # ------------------------------------------------------------------ upstream.Handler
    def upstream_data(self, data: bytes) -> None:
        self.down.last = self.loop.time()
        if self.down.shapers is not None:
            self.dispatch.spend(self, len(data))
        response = self.response
        if response.head is None:
            response.buf += data
            response.read_head(self)
        else:
            response.body(self, data)

    def upstream_eof(self) -> None:
        self.response.ended(self, None)

    def upstream_lost(self, exc: Exception | None) -> None:
        self.response.ended(self, exc)

    def upstream_pause(self) -> None:
        self.pause(_P_UPSTREAM_FULL)

    def upstream_resume(self) -> None:
        self.resume(_P_UPSTREAM_FULL)

    # ------------------------------------------------------------------ flow control
    def pause_upstream(self) -> None:
        """The client reads slower than the backend sends."""
        self.dispatch.pause_reading()

    def resume_upstream(self) -> None:
        self.dispatch.resume_reading()

    def uncap(self) -> None:
        """The bandwidth cap's debt is paid (``Dispatch.spend``)."""
        self.dispatch.uncap(client_full=self.down.write_paused)

    def pause(self, bit: int) -> None:
        """Take no more request body, for reason ``bit`` (``_P_*``)."""
        if not self.paused:
            self.down.pause_reading()
        self.paused |= bit

    def resume(self, bit: int) -> None:
        if self.paused & bit:
            self.paused &= ~bit
            if not self.paused:
                self.down.resume_reading()

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
        if self.response.started:
            log.info("%s: idle timeout mid-response", self.down.client_addr)
            self.fail(504, "idle timeout")
        elif self.dispatch.stopped_reading(self):
            self.fail(504, "the server stopped reading the request body")
        else:
            self.fail(504 if self.req_done else 408, "idle timeout")

    def client_gone(self) -> None:
        """The client went away mid-request: nothing more can be delivered."""
        self.done = True
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
        self.done = True
        self.account(resp.status)
        reuse = reuse and self.req_done and resp.keep_alive and self.response.kind != BODY_CLOSE
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
        if self.response.started:
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
        self.done = True
        self.dispatch.release(self, reuse=False)
        self.down.cut()

    def answer(self, status: int, reason: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """The proxy's own short response; the front end closes after it."""
        if self.done:
            return
        self.done = True
        if status >= 500:
            log.info("%s: %d: %s", self.down.client_addr, status, reason)
        self.bytes_out += self.down.send_error(status, reason, extra)
        self.account(status)

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


class Dispatch:
    """Where one exchange's request goes: a server (its session's pin, or the scheduler's
    pick), a connection to it (an idle pooled one, or a new connect) with the request head
    sent on it, and trying again elsewhere where that is safe (see the module docstring).
    Owns the servers tried, the server in use and the connection to it, until it is released
    or handed to a tunnel after a 101."""

    __slots__ = ("capped", "connect_task", "server", "tried", "up")

    def __init__(self) -> None:
        self.tried: list[ServerState] = []
        self.server: ServerState | None = None
        self.up: upstream.UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.capped = False  # reading the backend paused by the listener's bandwidth cap

    # ------------------------------------------------------------------ reading the backend
    def spend(self, ex: Exchange, n: int) -> None:
        """``n`` bytes read from the backend, against the listener's bandwidth cap: over it,
        reading pauses until the debt is paid (``Exchange.uncap``)."""
        shapers = ex.down.shapers
        assert shapers is not None
        if shapers.outbound.spend(n, ex.uncap):
            self.capped = True
            self.pause_reading()

    def pause_reading(self) -> None:
        if self.up is not None:
            self.up.transport.pause_reading()

    def resume_reading(self) -> None:
        """The client reads again; the bandwidth cap may still hold the backend back."""
        if self.up is not None and not self.capped:
            self.up.transport.resume_reading()

    def uncap(self, client_full: bool) -> None:
        """The cap's debt is paid; a full client buffer may still hold the backend back."""
        self.capped = False
        if self.up is not None and not client_full:
            self.up.transport.resume_reading()

    def stopped_reading(self, ex: Exchange) -> bool:
        """The body stalled because the backend stopped reading it (the client was paused for
        it): a backend timeout, counted as one, not the client's (408)."""
        server = self.server
        if ex.req_done or not ex.paused & _P_UPSTREAM_FULL or server is None:
            return False
        server.stats.errors["timeout"] += 1
        log.warning(
            "%s: upstream %s stopped reading the request body", ex.down.client_addr, server.label
        )
        return True

    def choose(self, ex: Exchange, server: ServerState | None = None) -> None:
        """Send the request to ``server``, or to the one its session is pinned to, or to the
        scheduler's pick; 503 when there is none."""
        group = ex.group
        if server is None:
            aff = ex.affinity
            if aff is not None:
                now = ex.loop.time()
                pinned = aff.pinned(ex.req.headers, group.by_id, group.by_token, now)
                # Gone, down or already failed: choose another (an insert cookie is replaced).
                if group.pinnable(pinned) and pinned not in self.tried:
                    server = pinned
            if server is None:
                server = group.pick(self._hash_key(ex), self.tried)
        if server is None:
            ex.answer(503, "no server available", (("Retry-After", "1"),))
            return
        self.tried.append(server)
        self.server = server
        server.active += 1
        conn = server.pool.take(ex.loop.time(), group.config.keepalive_timeout)
        if conn is not None:
            self._attach(ex, conn)
        else:
            ex.pause(_P_WAITING)
            timeout = ex.lr.config.timeouts.connect
            self.connect_task = ex.loop.create_task(self._connect(ex, server, timeout))

    def _hash_key(self, ex: Exchange) -> str:
        """What ``sh`` hashes: the client address, or the first X-Forwarded-For address."""
        if ex.group.hash_xff:
            for name, value in ex.req.headers:
                if name.lower() == b"x-forwarded-for":
                    first = value.split(b",", 1)[0].strip()
                    if first:
                        return first.decode("latin-1")
        return ex.down.client_ip

    async def _connect(self, ex: Exchange, server: ServerState, timeout: float) -> None:
        try:
            conn = await upstream.connect(server.connect_to, timeout)
        except TimeoutError:
            self.connect_task = None
            self.failed(ex, server, "timeout", f"connect timeout after {timeout:g}s", True)
        except OSError as exc:
            self.connect_task = None
            if exc.errno in _OUT_OF_RESOURCES:
                self._out_of_resources(ex, exc)
            else:
                self.failed(ex, server, "connect", describe(exc), True)
        else:
            self.connect_task = None
            if ex.done or self.server is not server:
                conn.close()
                return
            self._attach(ex, conn)

    def _attach(self, ex: Exchange, conn: upstream.UpstreamConnection) -> None:
        server = self.server
        assert server is not None
        conn.handler = ex
        self.up = conn
        head = self.upstream_head(ex, server)
        if ex.pending:
            head += b"".join(ex.pending)
            ex.body_sent = True
            ex.pending = []
            ex.pending_size = 0
        conn.transport.write(head)
        ex.response.buf.clear()
        ex.sent()
        ex.resume(_P_WAITING)

    def upstream_head(self, ex: Exchange, server: ServerState) -> bytes:
        """The request head as ``server`` gets it."""
        config, down = ex.lr.config, ex.down
        fwd = config.forwarding
        extra = down.cert_headers
        if fwd.extra:
            extra = extra + down.forwarding_lines(fwd)
        return headers.upstream_request_head(
            ex.req,
            client_ip=down.client_ip,
            scheme=b"https" if config.tls is not None else b"http",
            forwarded=config.x_forwarded_for,
            default_host=server.label.encode(),
            upgrade=ex.upgrade,
            proto=fwd.proto,
            extra=extra,
            no_extensions=ex.upgrade and _no_extensions(config),
        )

    def _out_of_resources(self, ex: Exchange, exc: OSError) -> None:
        """The proxy itself is out of descriptors or memory: not the server's fault (no
        error counted, no passive failure), and nothing to retry elsewhere."""
        log.warning("%s: cannot connect to a backend: %s", ex.down.client_addr, exc.strerror)
        self.release(ex, reuse=False)
        ex.answer(503, "proxy out of resources", (("Retry-After", "1"),))

    def failed(
        self, ex: Exchange, server: ServerState, kind: str, reason: str, fresh: bool
    ) -> None:
        """The backend failed before any response byte; retry elsewhere or answer."""
        if ex.done:
            return
        self.release(ex, reuse=False)
        group = ex.group
        if fresh:
            server.stats.errors[kind] += 1
            log.warning(
                "%s: upstream %s %s failed: %s",
                ex.down.client_addr,
                group.name,
                server.label,
                reason,
            )
            ex.ctx.report_health.passive_failure(server, reason)
        can_retry = not ex.response.started and (
            not ex.body_sent or (ex.replay is not None and ex.req_done)
        )
        if not fresh:
            # A pooled connection closed under us: a stale entry, not evidence against the
            # server. Only idempotent requests may be sent again.
            can_retry = can_retry and ex.replay is not None
            if can_retry:
                self.tried.remove(server)  # not this server's fault: it may be tried again
        if can_retry:
            if not fresh and group.pinnable(server):
                nxt: ServerState | None = server  # a stale pooled entry: same server, new conn
            else:
                nxt = group.pick(self._hash_key(ex), self.tried)
            if nxt is not None:
                if fresh:
                    ex.ctx.registry.count_retry(group.name)
                self._retry(ex, nxt, replay=ex.body_sent)
                return
        ex.answer(504 if kind == "timeout" else 502, reason)

    def _retry(self, ex: Exchange, server: ServerState, replay: bool) -> None:
        """Send the request again, to ``server``; ``replay``: with the body kept for it."""
        if replay and ex.replay is not None:
            ex.pending = list(ex.replay)
            ex.pending_size = sum(map(len, ex.pending))
        ex.body_sent = False
        self.choose(ex, server)

    def sid_hunt(self, ex: Exchange, status: int) -> bool:
        """A response during a sid hunt: True when it is a 400 ("not my session") and the
        request went on to the next server; otherwise the answer is the client's."""
        server = self.server
        aff = ex.affinity
        assert aff is not None and server is not None
        ttl = ex.lr.config.timeouts.idle
        if not aff.hunt_answer(status, server.id, ex.loop.time(), ttl):
            return False
        if not ex.req_done or ex.replay is None:
            return False  # the body cannot be sent again: the 400 goes to the client
        nxt = ex.group.pick(self._hash_key(ex), self.tried)
        if nxt is None:
            return False  # every server said no: the session is gone
        self.release(ex, reuse=False)  # the 400's body is not read: not reusable
        ex.response.buf.clear()
        self._retry(ex, nxt, replay=True)
        return True

    def hand_over(self, ex: Exchange, head: bytes, rest: bytes) -> None:
        """101: the client and the backend now talk directly through a Tunnel."""
        server, up = self.server, self.up
        assert server is not None and up is not None
        ex.t_headers = _clock() - ex.t_sent
        server.stats.upstream_response.observe(ex.t_headers)
        ex.bytes_out += len(head)
        ex.done = True
        ex.account(101, access_line=False)  # the tunnel logs one line when it closes
        down = ex.down
        client, client_pending = down.upgrade(head)
        up.handler = None
        self.up = None  # the server stays taken (``active``) until the tunnel closes
        aff, req = ex.affinity, ex.req
        slot, down.slot = down.slot, None  # the tunnel gives it back when it closes
        tunnel = Tunnel(
            ex.loop,
            client,
            up.transport,
            listener=ex.lr.stats,
            group=ex.group.name,
            server=server,
            idle_timeout=ex.lr.config.timeouts.idle,
            access=ex.ctx.access,
            # Kept only for the access log's line: an idle tunnel is mostly these strings.
            client_addr=ex.down.client_addr if ex.ctx.access.enabled else "-",
            method_path=(
                (req.method.decode("latin-1"), req.target.decode("latin-1"))
                if ex.ctx.access.enabled
                else None
            ),
            on_close=edge.on_tunnel_close(
                slot, aff.tunnel_closed if aff is not None and aff.sid is not None else None
            ),
            policy=ex.lr.config.websocket,
            shapers=down.shapers,
        )
        if ex.pending:
            client_pending += b"".join(ex.pending)
            ex.pending = []
        tunnel.start(client_pending, rest)

    def release(self, ex: Exchange, reuse: bool) -> None:
        """Done with the server: one open request less, and the connection back to its pool
        (``reuse``) or closed (a connect under way is cancelled)."""
        server = self.server
        if server is not None and server in self.tried:
            server.active -= 1
        self.server = None
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        up = self.up
        if up is None:
            return
        self.up = None
        last = self.tried[-1] if self.tried else None
        # A draining server's keep-alive connections close after their current response.
        if reuse and last is not None and not up.closed and not last.draining:
            up.transport.resume_reading()
            last.pool.put(up, ex.loop.time(), ex.group.config.keepalive_connections)
        else:
            up.close()


class Response:
    """The response side of one exchange: reads the backend's response head, frames the body,
    relays both downstream. The exchange (the backend connection's handler) passes itself in:
    nothing here points back at it, so a finished exchange is freed by reference counting."""

    __slots__ = ("buf", "decode", "gz", "head", "kind", "remaining", "started", "tracker")

    def __init__(self) -> None:
        self.head: ResponseHead | None = None
        self.buf = bytearray()  # response head bytes not parsed yet
        self.kind = BODY_NONE
        self.remaining = 0
        self.tracker: ChunkedTracker | None = None
        self.decode = False  # chunked framing removed for this client
        self.started = False  # response bytes went downstream: no retry, a failure is a cut
        self.gz: gzip_filter.GzipStream | None = None  # the body being compressed (gzip)

    # ------------------------------------------------------------------ head
    def read_head(self, ex: Exchange) -> None:
        buf = self.buf
        while self.head is None and not ex.done:
            try:
                resp = parse_response_head(buf)
            except ParseError as exc:
                ex.bad_gateway(f"invalid response head: {exc.reason}")
                return
            if resp is None:
                return
            raw = bytes(buf[: resp.raw_len])
            del buf[: resp.raw_len]
            status = resp.status
            aff = ex.affinity
            if status == 101:
                if ex.upgrade:
                    if _no_extensions(ex.lr.config) and headers.accepts_extension(resp):
                        # Not offered (the offer was dropped): a compressed message could
                        # pass max_message_size, so the tunnel is never made.
                        ex.bad_gateway("101 accepting a WebSocket extension that was not offered")
                        return
                    if aff is not None and aff.hunt:
                        ex.dispatch.sid_hunt(ex, status)  # found the session's server: pin it
                    ex.dispatch.hand_over(ex, raw, bytes(buf))
                else:
                    ex.bad_gateway("101 Switching Protocols to a request that asked for none")
                return
            if status < 200:
                # Interim responses (100 Continue, 103 Early Hints) go to HTTP/1.1 clients as-is
                # (an HTTP/2 stream drops them: it frames only what follows its send_head).
                if ex.req.version >= 1:
                    self._write(ex, raw)
                continue
            if aff is not None and aff.hunt and ex.dispatch.sid_hunt(ex, status):
                return
            self._start(ex, resp)
            if buf and not ex.done:
                rest = bytes(buf)
                buf.clear()
                self.body(ex, rest)
            elif not ex.done:
                ex.down.flush()  # the body comes in a later read
            return

    def _start(self, ex: Exchange, resp: ResponseHead) -> None:
        server = ex.dispatch.server
        assert server is not None
        ex.t_headers = _clock() - ex.t_sent
        server.stats.upstream_response.observe(ex.t_headers)
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
        self.started = True
        ex.bytes_out += ex.down.send_head(out, extra, kind, ended)
        if ended:
            ex.finish()

    # ------------------------------------------------------------------ body
    def _write(self, ex: Exchange, data: bytes) -> None:
        ex.bytes_out += len(data)
        ex.down.write(data)

    def body(self, ex: Exchange, data: bytes) -> None:
        aff = ex.affinity
        if aff is not None and aff.probe is not None:
            server = ex.dispatch.server
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
                self._write(ex, data)
                return
            if len(data) > n:
                # Bytes beyond the declared length: the connection is not reusable.
                self._write(ex, data[:n])
                self.remaining = 0
                ex.finish(reuse=False)
                return
            self._write(ex, data)
            self.remaining = 0
            ex.finish()
        elif kind == BODY_CHUNKED:
            tracker = self.tracker
            assert tracker is not None
            try:
                if self.decode:
                    pieces, used = tracker.feed_decode(data)
                    for p in pieces:
                        self._write(ex, p)
                else:
                    used = tracker.feed(data)
                    self._write(ex, data[:used] if used < len(data) else data)
            except ParseError as exc:
                ex.bad_gateway(f"invalid chunked response: {exc.reason}")
                return
            if tracker.done:
                ex.finish(reuse=used == len(data))
        elif kind == BODY_CLOSE:
            self._write(ex, data)
        else:
            ex.finish(reuse=False)  # bytes after a body-less response

    def _gzip_body(self, ex: Exchange, gz: gzip_filter.GzipStream, data: bytes) -> None:
        """The body through gzip: the stream reads the backend's framing itself."""
        try:
            out, done, clean = gz.feed(data)
        except ParseError as exc:
            ex.bad_gateway(f"invalid chunked response: {exc.reason}")
            return
        if out:
            self._write(ex, out)
        if done:
            ex.finish(reuse=clean)

    def gzip_tail(self, ex: Exchange) -> None:
        """The compressed body's last bytes, at its end."""
        gz = self.gz
        assert gz is not None
        self.gz = None
        tail = gz.finish()
        if tail:
            self._write(ex, tail)

    def ended(self, ex: Exchange, exc: Exception | None) -> None:
        """The backend connection closed (``exc``: why, if known)."""
        up, server = ex.dispatch.up, ex.dispatch.server
        if ex.done or up is None:
            return
        assert server is not None
        resp = self.head
        if resp is None:
            reason = describe(exc) if exc else "closed before responding"
            if not self.buf:
                ex.dispatch.failed(ex, server, "reset", reason, fresh=not up.reused)
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


def describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
