"""The client-side HTTP/1.x protocol: parse, choose a server, forward, stream, hand over.

Owns one accepted client connection from its first byte until it closes or becomes a
WebSocket tunnel (``tunnel.Tunnel`` takes both transports after a 101). Everything runs in
Protocol callbacks; the only task is the connect to a backend that has no pooled connection.

Per request it takes the listener's current runtime (so a keep-alive connection's next
request sees a reload), picks a server, sends the rewritten head, streams the body both ways
with transport backpressure, and retries on the next server where that is safe:
- a failed connect (refused, timeout) marks the server down and tries another;
- a fresh connection that resets before any response byte marks it down and tries another;
- a reused pooled connection that turns out dead is a stale entry: retried, not counted;
- never once response bytes reached the client; a non-idempotent request never after its
  body was sent; an idempotent one only if its body (if any) is still small enough to replay.

Errors map to statuses in one place (``_fail``): connect/reset -> 502, timeout -> 504,
nothing available -> 503, a malformed request -> 400 (or the parser's 414/431/505).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from . import edge, gzip_filter, headers, sticky, tls, upstream
from .config import LINGER_TIMEOUT
from .http1 import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    ChunkedTracker,
    ParseError,
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
    request_body_kind,
    response_body_kind,
)
from .tunnel import Tunnel

if TYPE_CHECKING:
    from .access_log import AccessLog
    from .metrics import Registry
    from .snapshot import GroupRuntime, ListenerRuntime, ServerState

log = logging.getLogger("lbproxy.http")
_clock = time.perf_counter

# connect() failures that are the proxy's own shortage, not the backend's.
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
REPLAY_LIMIT = 65536  # bytes of an idempotent request body kept for a retry
BUFFER_LIMIT = 65536  # client bytes buffered ahead (pipelining, body before connect)
SIO_PROBE_LIMIT = 4096  # bytes of an Engine.IO handshake body read for its sid (~100 needed)

# Why client reading is paused (a bit each; reading resumes when none is left).
_P_UPSTREAM_FULL = 1  # the backend is not reading the body as fast as the client sends it
_P_WAITING = 2  # connecting, or a pipelined request waits for the current response
_P_BANDWIDTH = 4  # the listener's bandwidth cap (edge.Bandwidth)

_HEAD, _ACTIVE, _CLOSED = 0, 1, 2


class Context:
    """What every connection of the process shares: the health reporter, stats, access log."""

    def __init__(
        self,
        registry: Registry,
        access: AccessLog,
        report_health: Health,
    ) -> None:
        self.registry = registry
        self.access = access
        self.report_health = report_health
        self.draining = False
        self.edges = edge.Edges()  # per-client limits, bandwidth: state kept across reloads


class Health(Protocol):
    """Passive health: where a failure seen while proxying goes (app.PassiveHealth)."""

    def passive_failure(self, server: ServerState, reason: str) -> None: ...


class ListenerHandle:
    """A listener's current runtime; replaced on reload, kept as-is if the listener is removed."""

    __slots__ = ("runtime",)

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime


class ClientConnection(asyncio.Protocol):
    def __init__(self, ctx: Context, handle: ListenerHandle) -> None:
        self.ctx = ctx
        self.handle = handle
        self.lr = handle.runtime
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.client_ip = "-"
        self.client_addr = "-"
        self.cert_headers: tuple[bytes, ...] = ()  # a verified client certificate (mutual TLS)
        self.phase = _HEAD
        self.buf = bytearray()
        self.paused = 0
        self.client_eof = False
        self.keep_alive = True
        self.bytes_in = 0
        self.bytes_out = 0
        self.last = self.loop.time()  # the protocol is made at the accept: its time
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0
        # When the request head being read started to count against client_header_timeout
        # (the accept, or its first byte); 0.0 between requests.
        self.head_start = self.last
        # per request
        self.req: RequestHead | None = None
        self.req_kind = BODY_NONE
        self.req_remaining = 0
        self.req_tracker: ChunkedTracker | None = None
        self.req_done = True
        self.upgrade = False
        self.pending: list[bytes] = []  # body bytes not yet written to a backend
        self.pending_size = 0
        self.replay: list[bytes] | None = None
        self.body_sent = False
        self.tried: list[ServerState] = []
        self.group: GroupRuntime = self.lr.group  # the request's group (forwarding rules)
        self.sticky_token: str | None = None  # the insert cookie the client sent
        self.sio = False  # a request under the group's Socket.IO path
        self.sid: str | None = None  # the Engine.IO session id the request carries
        # The request carries a sid this process has no pin for (learnt by another worker, or
        # before a restart): servers are tried in turn until one does not answer 400.
        self.sid_hunt = False
        self.sio_probe: bytearray | None = None  # a Socket.IO handshake body being read
        self.server: ServerState | None = None
        self.up: upstream.UpstreamConnection | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.resp: ResponseHead | None = None
        self.resp_buf = bytearray()
        self.resp_kind = BODY_NONE
        self.resp_remaining = 0
        self.resp_tracker: ChunkedTracker | None = None
        self.resp_decode = False
        self.resp_started = False
        self.head_out: bytes | None = None  # a response head waiting for its first body bytes
        self.gz: gzip_filter.GzipStream | None = None  # the response body being compressed
        # Measurements use perf_counter (uvloop's loop.time() moves in whole milliseconds);
        # timers use loop.time(): sent_at is when request_timeout started counting.
        self.t_start = 0.0
        self.t_sent = 0.0
        self.t_headers: float | None = None
        self.sent_at = 0.0
        self.req_bytes_in = 0
        self.req_bytes_out = 0
        self.slot: edge.Slot | None = None  # counted against connections_per_client
        self.bw: edge.Bandwidth | None = None  # the listener's bandwidth cap, if any
        self.up_capped = False  # upstream reading paused by the bandwidth cap
        self.write_paused = False  # the client's write buffer is full

    # ------------------------------------------------------------------ client transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip = str(peer[0])
            self.client_addr = (
                f"[{peer[0]}]:{peer[1]}" if ":" in self.client_ip else f"{peer[0]}:{peer[1]}"
            )
        tls_config = self.lr.config.tls
        if tls_config is not None and tls_config.client_auth is not None:
            self.cert_headers = tls.client_cert_headers(transport.get_extra_info("ssl_object"))
        if self.lr.config.limits is not None:
            self.slot = self.ctx.edges.admit(self.lr, self.client_ip)
            if self.slot is None:  # over connections_per_client: closed at once, counted
                self.phase = _CLOSED
                transport.close()
                return
        if self.lr.config.bandwidth:
            self.bw = self.ctx.edges.bandwidth(self.lr)
        ls = self.lr.stats
        ls.connections_active += 1
        ls.connections_total += 1
        ls.live.add(self)
        t = self.lr.config.timeouts
        self._arm(min(self.last + t.idle, self.head_start + t.client_header))

    def live_bytes(self) -> tuple[int, int]:
        return self.bytes_in, self.bytes_out

    def data_received(self, data: bytes) -> None:
        self.last = self.loop.time()
        self.bytes_in += len(data)
        if self.bw is not None and self.bw.inbound.spend(len(data), self._bw_resume_client):
            self._pause(_P_BANDWIDTH)
        if self.phase == _HEAD:
            if not self.head_start:
                self._start_head_clock(self.last)
            self.buf += data
            self._read_head()
        elif self.phase == _ACTIVE:
            if not self.req_done:
                self._request_body(data)
            else:
                self.buf += data
                if len(self.buf) > BUFFER_LIMIT:
                    self._pause(_P_WAITING)

    def eof_received(self) -> bool:
        self.client_eof = True
        self.keep_alive = False
        if self.phase == _CLOSED:  # lingering after an answer: the client is done too
            self._close()
            return False
        if self.phase == _HEAD:
            if self.buf:  # the head can never complete now
                self._error_response(400, "client closed before sending the whole request head")
            else:
                self._close()
            return False
        if self.phase == _ACTIVE and not self.req_done:
            # The body can never complete now.
            self._fail(400, "client closed before sending the whole body")
            return False
        # Keep writing the response to a half-closed client; TLS has no half-close (the
        # transport closes after the client's close_notify whatever this returns).
        return self.transport.can_write_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == _ACTIVE and self.req is not None:
            # The client went away mid-request: nothing more can be delivered.
            self._account(499)
            self._release_server()
        self._drop_upstream(reuse=False)
        self._close()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.up is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.up is not None and not self.up_capped:
            self.up.transport.resume_reading()

    def _bw_resume_client(self) -> None:
        self._resume(_P_BANDWIDTH)

    def _bw_resume_upstream(self) -> None:
        self.up_capped = False
        if self.up is not None and not self.write_paused:
            self.up.transport.resume_reading()

    # ------------------------------------------------------------------ request side
    def _read_head(self) -> None:
        try:
            req = parse_request_head(self.buf, self.lr.limits)
        except ParseError as exc:
            log.info("%s: bad request: %s", self.client_addr, exc.reason)
            self._error_response(exc.status, exc.reason)
            return
        if req is None:
            return
        del self.buf[: req.raw_len]
        self._start_request(req)

    def _start_head_clock(self, now: float) -> None:
        """The first byte of a request head: client_header_timeout counts from ``now``."""
        self.head_start = now
        deadline = now + self.lr.config.timeouts.client_header
        if deadline < self.timer_when:
            self._arm(deadline)

    def _start_request(self, req: RequestHead) -> None:
        self.lr = lr = self.handle.runtime
        self.phase = _ACTIVE
        self.req = req
        self.head_start = 0.0
        if req.target[0] != 0x2F and req.method != b"CONNECT" and req.target != b"*":
            # Absolute-form (RFC 9112 3.2.2): the parser took Host from its authority; rules
            # and backends see the origin-form path.
            req.target = headers.origin_form(req.target)
        self.t_start = _clock()
        self.t_headers = None
        self.req_bytes_in = req.raw_len
        self.req_bytes_out = 0
        self.tried = []
        self.group = lr.route(req.host, req.target)
        self.resp = None
        self.resp_started = False
        self.sio_probe = None
        self.upgrade = req.upgrade == b"websocket"
        self.keep_alive = req.keep_alive and not self.client_eof and not self.ctx.draining
        if lr.config.limits is not None:
            wait = self.ctx.edges.retry_after(lr, self.slot, self.client_ip, req.headers, self.last)
            if wait is not None:  # over requests_per_second (upgrades count too)
                self._error_response(429, "request rate limit", extra=(("Retry-After", wait),))
                return
        if lr.config.redirect_https:
            self._redirect_https(req, lr.config.redirect_https)
            return
        kind = request_body_kind(req)
        self.req_kind = kind
        self.req_done = kind == BODY_NONE
        if kind == BODY_LENGTH:
            assert req.content_length is not None
            self.req_remaining = req.content_length
            self.req_done = req.content_length == 0
        elif kind == BODY_CHUNKED:
            self.req_tracker = ChunkedTracker()
        self.pending = []
        self.pending_size = 0
        self.body_sent = False
        self.replay = [] if req.method in IDEMPOTENT else None
        self.sid_hunt = False
        sticky_cfg = self.group.sticky
        if sticky_cfg is not None and sticky_cfg.socketio and b"sid=" in req.target:
            self.replay = []  # an Engine.IO POST may have to go to another server (sid hunt)
        if self.buf and not self.req_done:
            data = bytes(self.buf)
            self.buf.clear()
            self._request_body(data)
            if self.phase != _ACTIVE:
                return
        if self.buf:
            self._pause(_P_WAITING)  # pipelined: answered in order, after this one
        # Expect: 100-continue needs nothing here: the backend's 100 is relayed as an interim
        # response.
        self._choose()

    def _request_body(self, data: bytes) -> None:
        """Forward (or hold, while connecting) body bytes; the rest is the next request."""
        rest = b""
        if self.req_kind == BODY_LENGTH:
            n = self.req_remaining
            if len(data) > n:
                data, rest = data[:n], data[n:]
            self.req_remaining = n - len(data)
            if self.req_remaining == 0:
                self.req_done = True
        else:
            tracker = self.req_tracker
            assert tracker is not None
            try:
                used = tracker.feed(data)
            except ParseError as exc:
                self._fail(exc.status, f"bad chunked body: {exc.reason}")
                return
            if used < len(data):
                data, rest = data[:used], data[used:]
            if tracker.done:
                self.req_done = True
        if data:
            self.req_bytes_in += len(data)  # the head was counted when it parsed
            if self.replay is not None:
                self.replay.append(data)
                if sum(map(len, self.replay)) > REPLAY_LIMIT:
                    self.replay = None
            up = self.up
            if up is not None:
                self.body_sent = True
                up.transport.write(data)
                if self.req_done:
                    # The whole request is with the server: request_timeout counts from here.
                    self.t_sent = _clock()
                    self.sent_at = now = self.loop.time()
                    deadline = now + self.lr.config.timeouts.request
                    if deadline < self.timer_when:
                        self._arm(deadline)
            else:
                self.pending.append(data)
                self.pending_size += len(data)
                if self.pending_size > BUFFER_LIMIT:
                    self._pause(_P_WAITING)
        if rest:
            self.buf += rest
            self._pause(_P_WAITING)

    # ------------------------------------------------------------------ choosing and connecting
    def _choose(self, server: ServerState | None = None) -> None:
        lr, group = self.lr, self.group
        if server is None:
            if group.sticky is not None:
                server = self._pinned(group)
            if server is None:
                server = group.pick(self._hash_key(group), self.tried)
        if server is None:
            self._error_response(503, "no server available", extra=(("Retry-After", "1"),))
            return
        self.tried.append(server)
        self.server = server
        server.active += 1
        conn = server.pool.take(self.loop.time(), group.config.keepalive_timeout)
        if conn is not None:
            self._attach(conn)
        else:
            self._pause(_P_WAITING)
            self.connect_task = self.loop.create_task(
                self._connect(server, lr.config.timeouts.connect)
            )

    def _hash_key(self, group: GroupRuntime) -> str:
        """What ``sh`` hashes: the client address, or the first X-Forwarded-For address."""
        if group.hash_xff and self.req is not None:
            for name, value in self.req.headers:
                if name.lower() == b"x-forwarded-for":
                    first = value.split(b",", 1)[0].strip()
                    if first:
                        return first.decode("latin-1")
        return self.client_ip

    def _pinned(self, group: GroupRuntime) -> ServerState | None:
        """The server this request's session is pinned to, if it can still take it."""
        req = self.req
        cfg = group.sticky
        assert req is not None and cfg is not None
        now = self.loop.time()
        server: ServerState | None = None
        self.sid = None
        self.sio = cfg.socketio and sticky.is_socketio(req.target, cfg.socketio_path)
        token = self.sticky_token = (
            sticky.find_cookie(req.headers, cfg.cookie) if cfg.type == "insert" else None
        )
        if self.sio:
            self.sid = sid = sticky.sid_from_query(req.target)
            if sid is not None:
                sid_server = group.pins.sids.lookup(sid, now)
                if sid_server is not None:
                    server = group.by_id.get(sid_server)
                else:
                    self.sid_hunt = True
        if server is None and token is not None:
            server = group.by_token.get(token)
        elif server is None and cfg.type == "server":
            value = sticky.find_cookie(req.headers, cfg.cookie)
            if value is not None:
                pinned_id = group.pins.cookies.lookup(value, now)
                if pinned_id is not None:
                    server = group.by_id.get(pinned_id)
        if server is not None and group.pinnable(server) and server not in self.tried:
            return server
        return None  # gone, down or already failed: choose another (the cookie is replaced)

    async def _connect(self, server: ServerState, timeout: float) -> None:
        try:
            conn = await upstream.connect(server.connect_to, timeout)
        except TimeoutError:
            self.connect_task = None
            self._upstream_failed(server, "timeout", f"connect timeout after {timeout:g}s", True)
        except OSError as exc:
            self.connect_task = None
            if exc.errno in _OUT_OF_RESOURCES:
                self._out_of_resources(exc)
            else:
                self._upstream_failed(server, "connect", _describe(exc), True)
        else:
            self.connect_task = None
            if self.phase != _ACTIVE or self.server is not server:
                conn.close()
                return
            self._attach(conn)

    def _attach(self, conn: upstream.UpstreamConnection) -> None:
        req = self.req
        server = self.server
        assert req is not None and server is not None
        lr = self.lr
        conn.handler = self
        self.up = conn
        fwd = lr.config.forwarding
        head = headers.upstream_request_head(
            req,
            client_ip=self.client_ip,
            scheme=b"https" if lr.config.tls is not None else b"http",
            forwarded=lr.config.x_forwarded_for,
            default_host=server.label.encode(),
            upgrade=self.upgrade,
            proto=fwd.proto,
            extra=self.cert_headers + edge.forwarding_lines(fwd, self.transport)
            if fwd.extra
            else self.cert_headers,
        )
        if self.pending:
            head += b"".join(self.pending)
            self.body_sent = True
            self.pending = []
            self.pending_size = 0
        conn.transport.write(head)
        self.t_sent = _clock()
        self.sent_at = now = self.loop.time()
        self.resp_buf.clear()
        deadline = now + lr.config.timeouts.request
        if deadline < self.timer_when:
            self._arm(deadline)
        if self.req_done and self.buf:
            pass  # still waiting: the pipelined request goes after this response
        else:
            self._resume(_P_WAITING)

    def _out_of_resources(self, exc: OSError) -> None:
        """The proxy itself is out of descriptors or memory: not the server's fault (no
        error counted, no passive failure), and nothing to retry elsewhere."""
        log.warning("%s: cannot connect to a backend: %s", self.client_addr, exc.strerror)
        self._drop_upstream(reuse=False)
        self._release_server()
        self._error_response(503, "proxy out of resources", extra=(("Retry-After", "1"),))

    def _redirect_https(self, req: RequestHead, port: int) -> None:
        """``redirect_https``: 301 to the same host name and target on https."""
        host = req.host
        if host is None:  # an HTTP/1.0 request without Host: the address it connected to
            local = self.transport.get_extra_info("sockname")
            name = str(local[0]) if isinstance(local, tuple) else "localhost"
            host = (f"[{name}]" if ":" in name else name).encode()
        location = headers.https_location(host, port, req.target)
        self._error_response(301, location, extra=(("Location", location),))

    def _upstream_failed(self, server: ServerState, kind: str, reason: str, fresh: bool) -> None:
        """The backend failed before any response byte; retry elsewhere or answer."""
        if self.phase != _ACTIVE:
            return
        self._drop_upstream(reuse=False)
        self._release_server()
        group = self.group
        if fresh:
            server.stats.errors[kind] += 1
            log.warning(
                "%s: upstream %s %s failed: %s", self.client_addr, group.name, server.label, reason
            )
            self.ctx.report_health.passive_failure(server, reason)
        can_retry = not self.resp_started and (
            not self.body_sent or (self.replay is not None and self.req_done)
        )
        if not fresh:
            # A pooled connection closed under us: a stale entry, not evidence against the
            # server. Only idempotent requests may be sent again.
            can_retry = can_retry and self.replay is not None
            if can_retry:
                self.tried.remove(server)  # not this server's fault: it may be tried again
        if can_retry:
            if self.body_sent and self.replay is not None:
                self.pending = list(self.replay)
                self.pending_size = sum(map(len, self.pending))
            self.body_sent = False
            if not fresh and group.pinnable(server):
                nxt: ServerState | None = server  # a stale pooled entry: same server, new conn
            else:
                nxt = group.pick(self._hash_key(group), self.tried)
            if nxt is not None:
                if fresh:
                    self.ctx.registry.count_retry(group.name)
                self._choose(nxt)
                return
        status = 504 if kind == "timeout" else 502
        self._error_response(status, reason)

    # ------------------------------------------------------------------ upstream events
    def upstream_data(self, data: bytes) -> None:
        self.last = self.loop.time()
        if self.bw is not None and self.bw.outbound.spend(len(data), self._bw_resume_upstream):
            self.up_capped = True
            assert self.up is not None
            self.up.transport.pause_reading()
        if self.resp is None:
            self.resp_buf += data
            self._read_response_head()
            return
        self._response_body(data)

    def _read_response_head(self) -> None:
        buf = self.resp_buf
        while self.resp is None and self.phase == _ACTIVE:
            try:
                resp = parse_response_head(buf)
            except ParseError as exc:
                self._bad_gateway(f"invalid response head: {exc.reason}")
                return
            if resp is None:
                return
            raw = bytes(buf[: resp.raw_len])
            del buf[: resp.raw_len]
            status = resp.status
            if status == 101:
                if self.upgrade:
                    if self.sid_hunt:
                        self._sid_hunt(resp)  # found the session's server: pin it
                    self._hand_over(raw, bytes(buf))
                else:
                    self._bad_gateway("101 Switching Protocols to a request that asked for none")
                return
            if status < 200:
                # Interim responses (100 Continue, 103 Early Hints) go to HTTP/1.1 clients as-is.
                assert self.req is not None
                if self.req.version >= 1:
                    self._write(raw)
                continue
            if self.sid_hunt and self._sid_hunt(resp):
                return
            self._response_head(resp)
            if buf and self._responding():
                rest = bytes(buf)
                buf.clear()
                self._response_body(rest)
            elif self.head_out is not None:
                self.transport.write(self.head_out)  # the body comes in a later read
                self.head_out = None
            return

    def _responding(self) -> bool:
        # A method, not the expression inline in _read_response_head, where mypy still takes
        # self.resp for None (the loop's condition) after _response_head set it: compiled with
        # mypyc, that test would be compiled as always false.
        return self.phase == _ACTIVE and self.resp is not None

    def _sid_hunt(self, resp: ResponseHead) -> bool:
        """An unknown sid: a 400 means "not my session", so try the next server (True);
        any other answer comes from the server that holds the session: pin it (False)."""
        group, server = self.group, self.server
        assert server is not None and self.sid is not None
        if resp.status != 400:
            ttl = self.lr.config.timeouts.idle
            group.pins.sids.learn(self.sid, server.id, self.loop.time(), ttl)
            self.sid_hunt = False
            return False
        if not self.req_done or self.replay is None:
            return False  # the body cannot be sent again: the 400 goes to the client
        nxt = group.pick(self._hash_key(group), self.tried)
        if nxt is None:
            return False  # every server said no: the session is gone
        self._drop_upstream(reuse=False)  # the 400's body is not read: not reusable
        self._release_server()
        self.resp_buf.clear()
        self.pending = list(self.replay)
        self.pending_size = sum(map(len, self.pending))
        self.body_sent = False
        self._choose(nxt)
        return True

    def _response_head(self, resp: ResponseHead) -> None:
        req = self.req
        server = self.server
        assert req is not None and server is not None
        self.t_headers = _clock() - self.t_sent
        server.stats.upstream_response.observe(self.t_headers)
        self.resp = resp
        kind = response_body_kind(req.method, resp)
        self.resp_kind = kind
        chunked_out = False
        self.resp_decode = False
        if kind == BODY_LENGTH:
            assert resp.content_length is not None
            self.resp_remaining = resp.content_length
        elif kind == BODY_CHUNKED:
            self.resp_tracker = ChunkedTracker()
            if req.version >= 1:
                chunked_out = True
            else:
                # HTTP/1.0 cannot read chunked: send the payload and end it by closing.
                self.resp_decode = True
                self.keep_alive = False
        elif kind == BODY_CLOSE:
            self.keep_alive = False
        if not self.req_done:
            self.keep_alive = False  # the rest of the body would be taken for a new request
        extra = self._sticky_response(resp, server) if self.group.sticky is not None else ()
        out = resp
        self.gz = None
        gzip_cfg = self.lr.config.gzip
        if gzip_cfg is not None:  # gzip: maybe another head, and a stream for the body
            out, self.gz = gzip_filter.start(gzip_cfg, req, resp, kind)
            chunked_out = chunked_out or self.gz is not None
        head = headers.client_response_head(
            out,
            chunked=chunked_out,
            keep_alive=self.keep_alive,
            client_version=req.version,
            extra=extra,
        )
        self.resp_started = True
        if kind == BODY_NONE or (kind == BODY_LENGTH and self.resp_remaining == 0):
            self._write(head)
            self._finish()
        else:
            # Held back to go out with the first body bytes in one writev: a small response
            # then costs the client side one syscall, not two.
            n = len(head)
            self.bytes_out += n
            self.req_bytes_out += n
            self.head_out = head

    def _sticky_response(self, resp: ResponseHead, server: ServerState) -> tuple[bytes, ...]:
        """Learn or set what pins the session to ``server``; the extra response headers."""
        group = self.group
        cfg = group.sticky
        assert cfg is not None
        now = self.loop.time()
        extra: tuple[bytes, ...] = ()
        if cfg.type == "insert" and self.sticky_token != server.token:
            # New client, or its pinned server is gone or down: (re)pin it to this one.
            cookie = sticky.set_cookie_header(cfg.cookie, server.token, cfg.cookie_timeout)
            extra = (b"Set-Cookie: " + cookie,)
        elif cfg.type == "server":
            value = sticky.response_set_cookie(resp.headers, cfg.cookie)
            if value is not None:
                group.pins.cookies.learn(value, server.id, now, cfg.cookie_timeout)
        if self.sio:
            if self.sid is None and resp.status == 200:
                self.sio_probe = bytearray()  # an Engine.IO handshake: its body names the sid
            elif self.sid is not None and resp.status == 400:
                group.pins.sids.forget(self.sid)  # "Session ID unknown": the session is over
        return extra

    def _probe_sid(self, data: bytes) -> None:
        """Read an Engine.IO handshake body as it passes, and pin its sid to the server."""
        probe = self.sio_probe
        server = self.server
        assert probe is not None and server is not None
        probe += data[: SIO_PROBE_LIMIT - len(probe)]
        body = bytes(probe)
        if self.resp_kind == BODY_CHUNKED:
            body = body.partition(b"\r\n")[2]  # the handshake fits the first chunk
        sid = sticky.sid_from_handshake(body)
        if sid is not None:
            ttl = self.lr.config.timeouts.idle
            self.group.pins.sids.learn(sid, server.id, self.loop.time(), ttl)
            self.sio_probe = None
        elif len(probe) >= SIO_PROBE_LIMIT:
            self.sio_probe = None

    def _response_body(self, data: bytes) -> None:
        if self.sio_probe is not None:
            self._probe_sid(data)
        if self.gz is not None:
            self._gzip_body(self.gz, data)
            return
        kind = self.resp_kind
        if kind == BODY_LENGTH:
            n = self.resp_remaining
            if len(data) < n:
                self.resp_remaining = n - len(data)
                self._write(data)
                return
            if len(data) > n:
                # Bytes beyond the declared length: the connection is not reusable.
                self._write(data[:n])
                self.resp_remaining = 0
                self._finish(reuse=False)
                return
            self._write(data)
            self.resp_remaining = 0
            self._finish()
        elif kind == BODY_CHUNKED:
            tracker = self.resp_tracker
            assert tracker is not None
            try:
                if self.resp_decode:
                    pieces, used = tracker.feed_decode(data)
                    for p in pieces:
                        self._write(p)
                else:
                    used = tracker.feed(data)
                    self._write(data[:used] if used < len(data) else data)
            except ParseError as exc:
                self._bad_gateway(f"invalid chunked response: {exc.reason}")
                return
            if tracker.done:
                self._finish(reuse=used == len(data))
        elif kind == BODY_CLOSE:
            self._write(data)
        else:
            self._finish(reuse=False)  # bytes after a body-less response

    def _gzip_body(self, gz: gzip_filter.GzipStream, data: bytes) -> None:
        """The body through gzip: the stream reads the backend's framing itself."""
        try:
            out, done, clean = gz.feed(data)
        except ParseError as exc:
            self._bad_gateway(f"invalid chunked response: {exc.reason}")
            return
        if out:
            self._write(out)
        if done:
            self._finish(reuse=clean)

    def upstream_eof(self) -> None:
        self._upstream_ended(None)

    def upstream_lost(self, exc: Exception | None) -> None:
        self._upstream_ended(exc)

    def _upstream_ended(self, exc: Exception | None) -> None:
        if self.phase != _ACTIVE or self.up is None:
            return
        conn = self.up
        if self.resp is None:
            server = self.server
            assert server is not None
            reason = _describe(exc) if exc else "closed before responding"
            if not self.resp_buf:
                self._upstream_failed(server, "reset", reason, fresh=not conn.reused)
            else:
                self._bad_gateway(f"incomplete response head: {reason}", "reset")
            return
        if self.resp_kind == BODY_CLOSE:
            self._finish(reuse=False)
            return
        # The response was cut short: the client can only learn it from a cut connection.
        server = self.server
        assert server is not None
        server.stats.errors["reset"] += 1
        log.warning("%s: upstream %s closed mid-response", self.client_addr, server.label)
        self._cut()

    def upstream_pause(self) -> None:
        self._pause(_P_UPSTREAM_FULL)

    def upstream_resume(self) -> None:
        self._resume(_P_UPSTREAM_FULL)

    # ------------------------------------------------------------------ endings
    def _finish(self, reuse: bool = True) -> None:
        """The response is complete: account, release the backend, await the next request."""
        assert self.resp is not None
        if self.gz is not None:  # the end of a compressed body (if the close framed it)
            tail = self.gz.finish()
            self.gz = None
            if tail:
                self._write(tail)
        if self.head_out is not None:  # a body that brought no bytes of its own
            self.transport.write(self.head_out)
            self.head_out = None
        self._account(self.resp.status)
        self._release_server()
        reuse = reuse and self.req_done and self.resp.keep_alive and self.resp_kind != BODY_CLOSE
        self._drop_upstream(reuse=reuse)
        self.req = None
        self.tried = []
        if not self.keep_alive or self.ctx.draining:
            # Unread request body, or bytes left waiting in the socket: linger (see below).
            self._close_after_write(linger=not self.req_done or self.paused != 0)
            return
        self.phase = _HEAD
        self._resume(_P_WAITING)
        if self.buf:
            self._start_head_clock(self.loop.time())  # a pipelined request, waiting since
            self._read_head()

    def _hand_over(self, head: bytes, rest: bytes) -> None:
        """101: the client and the backend now talk directly through a Tunnel."""
        req, server, up = self.req, self.server, self.up
        assert req is not None and server is not None and up is not None
        lr = self.lr
        self.t_headers = _clock() - self.t_sent
        server.stats.upstream_response.observe(self.t_headers)
        self._write(head)
        self._account(101, access_line=False)  # the tunnel logs one line when it closes
        ls = lr.stats
        ls.live.discard(self)
        ls.bytes_in += self.bytes_in
        ls.bytes_out += self.bytes_out
        self._cancel_timer()
        self.phase = _CLOSED
        up.handler = None
        self.up = None
        tunnel = Tunnel(
            self.loop,
            self.transport,
            up.transport,
            listener=ls,
            group=self.group.name,
            server=server,
            idle_timeout=lr.config.timeouts.idle,
            client_addr=self.client_addr,
            method_path=(req.method.decode("latin-1"), req.target.decode("latin-1")),
            access=self.ctx.access,
            on_close=edge.on_tunnel_close(
                self.slot, _forget_sid(self.group, self.sid) if self.sid is not None else None
            ),
            policy=lr.config.websocket,
            shapers=self.bw,
        )
        self.slot = None  # the tunnel gives it back
        client_pending = bytes(self.buf) + b"".join(self.pending)
        self.buf.clear()
        self.pending = []
        self.paused = 0
        tunnel.start(client_pending, rest)

    def _bad_gateway(self, reason: str, kind: str = "protocol") -> None:
        server = self.server
        if server is not None:
            # Not a passive failure (health.py: only a failed connect or a fresh reset is):
            # a bad answer to one request says nothing about the server's other requests.
            server.stats.errors[kind] += 1
            log.warning("%s: upstream %s: %s", self.client_addr, server.label, reason)
        self._fail(502, reason)

    def _fail(self, status: int, reason: str) -> None:
        """Give up on the request: answer ``status``, or cut the connection if the response
        has already started."""
        if self.resp_started:
            self._cut()
            return
        self._drop_upstream(reuse=False)
        self._release_server()
        self._error_response(status, reason)

    def _cut(self) -> None:
        """The response has started: the client can only learn of a failure from a cut.
        Counted and logged with the status that started, whatever cut it (a bad or closing
        backend, a timeout)."""
        if self.resp is not None:
            self._account(self.resp.status)
        self._release_server()
        self._drop_upstream(reuse=False)
        self.transport.abort()
        self._close()

    def _error_response(
        self, status: int, reason: str, extra: tuple[tuple[str, str], ...] = ()
    ) -> None:
        """Answer with the proxy's own short response and close the connection."""
        if self.phase == _CLOSED:
            return
        if status >= 500:
            log.info("%s: %d: %s", self.client_addr, status, reason)
        if self.req is None:  # a request that never parsed: its time and bytes start now
            self.t_start = _clock()
            self.req_bytes_in, self.req_bytes_out = len(self.buf), 0
        self._write(headers.error_response(status, reason, extra=extra))
        self._account(status)
        self.req = None
        self._close_after_write(linger=True)

    def _account(self, status: int, access_line: bool = True) -> None:
        """One request done: metrics and the access log line."""
        now = _clock()
        lr = self.lr
        # The last server tried, even if it has been released (a 502 belongs to it).
        label = self.tried[-1].label if self.tried else ""
        group = self.group.name
        lr.stats.count_request(group, label, status, now - self.t_start)
        access = self.ctx.access
        if access_line and access.enabled:
            req = self.req
            access.request(
                client=self.client_addr,
                listener=lr.name,
                method=req.method.decode("latin-1") if req else "-",
                path=req.target.decode("latin-1") if req else "-",
                status=status,
                server=label,
                upstream_time=self.t_headers,
                total_time=now - self.t_start,
                bytes_in=self.req_bytes_in,
                bytes_out=self.req_bytes_out,
            )

    def _release_server(self) -> None:
        if self.server is not None and self.tried and self.server in self.tried:
            self.server.active -= 1
        self.server = None

    def _drop_upstream(self, reuse: bool) -> None:
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        up = self.up
        if up is None:
            return
        self.up = None
        server = self.tried[-1] if self.tried else None
        # A draining server's keep-alive connections close after their current response.
        if reuse and server is not None and not up.closed and not server.draining:
            up.transport.resume_reading()
            server.pool.put(up, self.loop.time(), self.group.config.keepalive_connections)
        else:
            up.close()

    def _write(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.req_bytes_out += len(data)
        head = self.head_out
        if head is None:
            self.transport.write(data)
        else:
            self.head_out = None
            self.transport.writelines((head, data))

    def _close_after_write(self, linger: bool = False) -> None:
        """Close once what is buffered is written. With ``linger``, when the client may still
        be sending (RFC 9112 9.6): send FIN after the answer and read and drop what comes for
        at most LINGER_TIMEOUT (or until the client closes), for a close with unread bytes
        sends a reset, which can destroy the answer before the client reads it."""
        transport = self.transport
        if linger and not self.client_eof and transport.can_write_eof():
            transport.write_eof()  # after what is buffered
            self._close(linger=True)
            return
        transport.close()  # flushes what is buffered first
        self._close()

    def _close(self, linger: bool = False) -> None:
        if self.phase == _CLOSED and self.timer is None:
            return
        self.phase = _CLOSED
        self._cancel_timer()
        if linger:
            # Still open (and counted) until the client closes or the time is up.
            self.paused = 0
            self.transport.resume_reading()
            self.timer = self.loop.call_later(LINGER_TIMEOUT, self._close)
            return
        if not self.transport.is_closing():
            self.transport.close()
        if self.slot is not None:
            self.slot.release()
            self.slot = None
        ls = self.lr.stats
        if self in ls.live:
            ls.live.discard(self)
            ls.connections_active -= 1
            ls.bytes_in += self.bytes_in
            ls.bytes_out += self.bytes_out

    def shutdown(self) -> None:
        """Graceful stop: an idle connection closes now, a busy one after its response."""
        if self.phase == _HEAD and not self.buf:
            self._close()

    # ------------------------------------------------------------------ flow control and timer
    def _pause(self, bit: int) -> None:
        if not self.paused and self.phase != _CLOSED:
            self.transport.pause_reading()
        self.paused |= bit

    def _resume(self, bit: int) -> None:
        if self.paused & bit:
            self.paused &= ~bit
            if not self.paused and self.phase != _CLOSED:
                self.transport.resume_reading()

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer_when = when
        self.timer = self.loop.call_at(when, self._on_timer)

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _on_timer(self) -> None:
        self.timer = None
        if self.phase == _CLOSED:
            return
        now = self.loop.time()
        t = self.lr.config.timeouts
        if self.phase == _ACTIVE and self.up is not None and self.resp is None and self.req_done:
            # Waiting for the response head; while the body is still coming, idle applies.
            deadline = self.sent_at + t.request
            if now >= deadline:
                server = self.server
                assert server is not None
                server.stats.errors["timeout"] += 1
                log.warning(
                    "%s: upstream %s sent no response head within %gs",
                    self.client_addr,
                    server.label,
                    t.request,
                )
                self._fail(504, f"no response from the server within {t.request:g}s")
                return
        else:
            deadline = self.last + t.idle
            head_deadline = 0.0
            if self.phase == _HEAD and self.head_start:
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
                    self._error_response(
                        408, f"request head not complete within {t.client_header:g}s"
                    )
                    return
            if now >= deadline:
                if self.phase == _ACTIVE and self.resp_started:
                    log.info("%s: idle timeout mid-response", self.client_addr)
                    self._fail(504, "idle timeout")
                elif self.phase == _ACTIVE and self._upstream_stopped_reading():
                    self._fail(504, "the server stopped reading the request body")
                elif self.phase == _ACTIVE:
                    self._fail(504 if self.req_done else 408, "idle timeout")
                elif self.buf:
                    self._error_response(408, "idle timeout in the request head")
                else:
                    self._close()
                return
            if head_deadline and head_deadline < deadline:
                deadline = head_deadline
        self._arm(deadline)

    def _upstream_stopped_reading(self) -> bool:
        """The body stalled because the backend stopped reading it (the client was paused for
        it): a backend timeout, counted as one, not the client's (408)."""
        server = self.server
        if self.req_done or not self.paused & _P_UPSTREAM_FULL or server is None:
            return False
        server.stats.errors["timeout"] += 1
        log.warning(
            "%s: upstream %s stopped reading the request body", self.client_addr, server.label
        )
        return True


def _forget_sid(group: GroupRuntime, sid: str) -> Callable[[Tunnel], None]:
    """An upgraded Engine.IO session ends with its tunnel: its sid pin goes with it."""

    def forget(_: Tunnel) -> None:
        group.pins.sids.forget(sid)

    return forget


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
