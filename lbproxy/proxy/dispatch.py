"""Where one exchange's request goes: the server, the connection to it, the request bytes on
their way there, and trying again elsewhere where that is safe.

Retries, where they are safe (``exchange_state.can_retry`` says it from the state):
- a failed connect (refused, timeout) marks the server down and tries another;
- a fresh connection that resets before any response byte marks it down and tries another;
- a reused pooled connection that turns out dead is a stale entry: retried, not counted;
- never once response bytes reached the client; a non-idempotent request never after its
  body was sent; an idempotent one only if its body (if any) is still small enough to replay.

A group's ``tls`` makes each new connection a TLS one (a failed handshake is a failed connect:
counted by reason in the server's ``tls_failures``, then retried like any), and its
``proxy_protocol`` starts each new connection with the client's PROXY header; a pooled
connection is taken only when it was opened the same way (``conn_key``: the group's TLS and
the very header, so one client's header never carries another client's requests). How such
a connection is opened is ``upstream``'s (``open_to``, ``preface_and_key``); how its
failure counts and what is retried, here.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING, cast

from ..wire import headers
from . import upstream, upstream_tls
from .exchange_base import (
    BUFFER_LIMIT,
    OUT_OF_RESOURCES,
    P_UPSTREAM_FULL,
    P_WAITING,
    REPLAY_LIMIT,
    ExchangeBase,
    describe,
    log,
    no_extensions,
)
from .exchange_state import body_sent, can_retry

if TYPE_CHECKING:
    from ..core.snapshot import ServerState


class Dispatch:
    """Where one exchange's request goes: a server (its session's pin, or the scheduler's
    pick), a connection to it (an idle pooled one, or a new connect) with the request head
    sent on it, and trying again elsewhere where that is safe (see the module docstring).
    Owns the servers tried, the server in use and the connection to it (until released or
    handed to a tunnel after a 101), and the request body bytes not yet sent (``pending``)
    or kept to send again (``replay``). The exchange passes itself in: nothing here points
    back at it, so a finished exchange is freed by reference counting."""

    __slots__ = (
        "capped",
        "conn_key",
        "connecting",
        "pending",
        "pending_size",
        "replay",
        "server",
        "tried",
        "up",
    )

    def __init__(self, replayable: bool) -> None:
        self.tried: list[ServerState] = []
        self.server: ServerState | None = None
        self.up: upstream.UpstreamConnection | None = None
        # A new connection under way: ``upstream.Connecting``, or a task for one with a PROXY
        # header or TLS (their handshakes are coroutines); both are cancelled the same way.
        self.connecting: upstream.Connecting | asyncio.Task[None] | None = None
        self.capped = False  # reading the backend paused by the listener's bandwidth cap
        self.pending: list[bytes] = []  # body bytes not yet written to a backend
        self.pending_size = 0
        # The body kept for a retry (idempotent requests only; None once too big for it).
        self.replay: list[bytes] | None = [] if replayable else None
        self.conn_key = ""  # what a backend connection must have been opened with (core.pool)

    # ------------------------------------------------------------------ the request body
    def forward(self, ex: ExchangeBase, data: bytes) -> bool:
        """Request body bytes: to the backend, or held until connected; True when sent."""
        replay = self.replay
        if replay is not None:
            replay.append(data)
            if sum(map(len, replay)) > REPLAY_LIMIT:
                self.replay = None
        up = self.up
        if up is not None:
            up.transport.write(data)
            return True
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > BUFFER_LIMIT:
            ex.pause(P_WAITING)
        return False

    def _take_pending(self) -> bytes:
        data = b"".join(self.pending)
        self.pending = []
        self.pending_size = 0
        return data

    # ------------------------------------------------------------------ reading the backend
    def spend(self, ex: ExchangeBase, n: int) -> None:
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

    def stopped_reading(self, ex: ExchangeBase) -> bool:
        """The body stalled because the backend stopped reading it (the client was paused for
        it): a backend timeout, counted as one, not the client's (408)."""
        server = self.server
        if ex.req_done or not ex.paused & P_UPSTREAM_FULL or server is None:
            return False
        server.stats.errors["timeout"] += 1
        log.warning(
            "%s: upstream %s stopped reading the request body", ex.down.client_addr, server.label
        )
        return True

    # ------------------------------------------------------------------ a server, a connection
    def choose(self, ex: ExchangeBase, server: ServerState | None = None) -> None:
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
                    # A rebalance or shed is moving WebSockets off it: an upgrade (or a new
                    # Socket.IO session) pinned there by the insert cookie is placed anew and
                    # re-pinned on its answer, or the cookie would send it straight back.
                    if (
                        server is not None
                        and server.relieved_until > now
                        and aff.movable(ex.upgrade)
                    ):
                        server = None
            if server is None:
                server = group.pick(hash_key(ex), self.tried)
        if server is None:
            ex.answer(503, "no server available", (("Retry-After", "1"),))
            return
        self.tried.append(server)
        self.server = server
        server.active += 1
        preface, key = upstream.preface_and_key(group.config, ex.down)
        self.conn_key = key
        # The pool holds only what ``release`` put there: this server's upstream connections.
        conn = cast(
            "upstream.UpstreamConnection | None",
            server.pool.take(ex.loop.time(), group.config.keepalive_timeout, key),
        )
        if conn is not None:
            self._attach(ex, conn)
            return
        ex.pause(P_WAITING)
        timeout = ex.lr.config.timeouts.connect
        if not preface and group.config.tls is None:
            # The common case, in the loop's callbacks: no task per new connection.
            self.connecting = _connecting(self, ex, server, timeout)
        else:
            self.connecting = ex.loop.create_task(_connect(self, ex, server, timeout, preface))

    def _connected(
        self,
        ex: ExchangeBase,
        server: ServerState,
        timeout: float,
        conn: upstream.UpstreamConnection | None,
        exc: BaseException | None,
    ) -> None:
        """A new connection's connect is over: send the request on it, or count the
        failure and retry or answer."""
        self.connecting = None
        if conn is not None:
            if ex.done or self.server is not server:
                conn.close()
                return
            conn.key = self.conn_key
            self._attach(ex, conn)
        elif isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES:
            self._out_of_resources(ex, exc)
        elif exc is not None:
            kind, reason = _failure(exc, server, ex.group.config.tls is not None, timeout)
            self.failed(ex, server, kind, reason, True)

    def _attach(self, ex: ExchangeBase, conn: upstream.UpstreamConnection) -> None:
        server = self.server
        assert server is not None
        conn.handler = ex
        self.up = conn
        if ex.down.write_paused:
            # The client is still behind (an earlier pipelined response; on HTTP/2, the
            # connection's other streams): its transport will not say pause again, only
            # resume, so this backend starts paused or its whole answer would be read into
            # memory.
            conn.transport.pause_reading()
        head = upstream_head(ex, server)
        with_body = bool(self.pending)
        if with_body:
            head += self._take_pending()
        conn.transport.write(head)
        ex.connected(with_body)

    def _out_of_resources(self, ex: ExchangeBase, exc: OSError) -> None:
        """The proxy itself is out of descriptors or memory: not the server's fault (no
        error counted, no passive failure), and nothing to retry elsewhere."""
        log.warning("%s: cannot connect to a backend: %s", ex.down.client_addr, exc.strerror)
        self.release(ex, reuse=False)
        ex.answer(503, "proxy out of resources", (("Retry-After", "1"),))

    # ------------------------------------------------------------------ failing, retrying
    def failed(
        self, ex: ExchangeBase, server: ServerState, kind: str, reason: str, fresh: bool
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
        replayable = self.replay is not None
        retry = can_retry(ex.state, replayable)
        if not fresh:
            # A pooled connection closed under us: a stale entry, not evidence against the
            # server. Only idempotent requests may be sent again.
            retry = retry and replayable
            if retry:
                self.tried.remove(server)  # not this server's fault: it may be tried again
        if retry:
            if not fresh and group.pinnable(server):
                nxt: ServerState | None = server  # a stale pooled entry: same server, new conn
            else:
                nxt = group.pick(hash_key(ex), self.tried)
            if nxt is not None:
                if fresh:
                    ex.ctx.registry.count_retry(group.name)
                self._retry(ex, nxt, replay=body_sent(ex.state))
                return
        ex.answer(504 if kind == "timeout" else 502, reason)

    def _retry(self, ex: ExchangeBase, server: ServerState, replay: bool) -> None:
        """Send the request again, to ``server``; ``replay``: with the body kept for it."""
        if replay and self.replay is not None:
            self.pending = list(self.replay)
            self.pending_size = sum(map(len, self.pending))
        ex.retrying()
        self.choose(ex, server)

    def sid_hunt(self, ex: ExchangeBase, status: int) -> bool:
        """A response during a sid hunt: True when it is a 400 ("not my session") and the
        request went on to the next server; otherwise the answer is the client's."""
        server = self.server
        aff = ex.affinity
        assert aff is not None and server is not None
        ttl = ex.lr.config.timeouts.idle
        if not aff.hunt_answer(status, server.id, ex.loop.time(), ttl):
            return False
        if not ex.req_done or self.replay is None:
            return False  # the body cannot be sent again: the 400 goes to the client
        nxt = ex.group.pick(hash_key(ex), self.tried)
        if nxt is None:
            return False  # every server said no: the session is gone
        self.release(ex, reuse=False)  # the 400's body is not read: not reusable
        self._retry(ex, nxt, replay=True)
        return True

    # ------------------------------------------------------------------ letting go
    def hand_over(self, ex: ExchangeBase, head: bytes, rest: bytes) -> None:
        """101: the client and the backend now talk directly through a tunnel (the
        exchange's ``start_tunnel``), which the server's connection is handed to."""
        server, up = self.server, self.up
        assert server is not None and up is not None
        server.stats.upstream_response.observe(ex.head_time())
        ex.handed_over(head)
        client, client_pending = ex.down.upgrade(head)
        up.handler = None
        self.up = None  # the server stays taken (``active``) until the tunnel closes
        if self.pending:
            client_pending += self._take_pending()
        ex.start_tunnel(server, client, up.transport, client_pending, rest)

    def release(self, ex: ExchangeBase, reuse: bool) -> None:
        """Done with the server: one open request less, and the connection back to its pool
        (``reuse``) or closed (a connect under way is cancelled)."""
        server = self.server
        if server is not None and server in self.tried:
            server.active -= 1
        self.server = None
        connecting = self.connecting
        if connecting is not None:
            self.connecting = None
            connecting.cancel()
        up = self.up
        if up is None:
            return
        self.up = None
        last = self.tried[-1] if self.tried else None
        # A draining server's keep-alive connections close after their current response.
        if reuse and last is not None and not up.closed and not last.draining:
            up.transport.resume_reading()
            up.handler = None  # idle: whatever the backend sends now closes it
            last.pool.put(up, ex.loop.time(), ex.group.config.keepalive_connections)
        else:
            up.close()


def _connecting(
    d: Dispatch, ex: ExchangeBase, server: ServerState, timeout: float
) -> upstream.Connecting:
    """A plain connect for ``d`` (``Dispatch.choose``'s; a function of its own: a lambda in
    ``choose`` would make mypyc keep all of choose's locals in an object made per request)."""
    return upstream.Connecting(
        ex.loop,
        server.connect_to,
        timeout,
        lambda conn, exc: d._connected(ex, server, timeout, conn, exc),
    )


async def _connect(
    d: Dispatch, ex: ExchangeBase, server: ServerState, timeout: float, preface: bytes
) -> None:
    """A new connection with a PROXY header or TLS (their handshakes are coroutines)."""
    try:
        conn = await upstream.open_to(server, ex.group.config.tls, timeout, preface)
    except (OSError, upstream_tls.TlsError) as exc:  # TimeoutError, ssl.SSLError too
        d._connected(ex, server, timeout, None, exc)
    else:
        d._connected(ex, server, timeout, conn, None)


def _failure(exc: BaseException, server: ServerState, tls: bool, timeout: float) -> tuple[str, str]:
    """How a failed connect counts: its kind and reason; a TLS handshake's failure is counted
    by its reason in the server's ``tls_failures`` too."""
    if isinstance(exc, (ssl.SSLError, upstream_tls.TlsError, ConnectionResetError)) and tls:
        # With TLS a reset comes from the handshake (a TCP connect is refused).
        server.stats.tls_failures[upstream_tls.failure_reason(exc)] += 1
        return "connect", f"TLS handshake failed: {upstream_tls.describe(exc)}"
    if isinstance(exc, TimeoutError):
        return "timeout", f"connect timeout after {timeout:g}s"
    return "connect", describe(exc)


def hash_key(ex: ExchangeBase) -> str:
    """What ``sh`` hashes: the client address, or the first X-Forwarded-For address."""
    if ex.group.hash_xff:
        for name, value in ex.req.headers:
            if name.lower() == b"x-forwarded-for":
                first = value.split(b",", 1)[0].strip()
                if first:
                    return first.decode("latin-1")
    return ex.down.client_ip


def upstream_head(ex: ExchangeBase, server: ServerState) -> bytes:
    """The request head as ``server`` gets it (a function of the exchange and the server:
    no state of the dispatch)."""
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
        no_extensions=ex.upgrade and no_extensions(config),
    )
