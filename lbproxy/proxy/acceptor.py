"""Accepting the connections of one listening address: the ``Acceptor`` (one per listener's
address, made and closed by ``listener.Listeners``), and what a connection is handed to.

The ``Acceptor`` accepts in a reader callback rather than through ``loop.create_server``:
- running out of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) stops accepting for
  ``ACCEPT_RETRY_DELAY`` and then tries again, leaving waiting clients in the kernel's backlog
  (uvloop's server instead accepts and closes every waiting connection at EMFILE, and closes
  the listening socket for good on any other accept error it does not expect);
- the ACL and ``max_connections`` are applied to the bare accepted socket: a refused client
  is closed before any of its bytes is read and before a TLS handshake costs anything;
- with ``proxy_protocol``, a socket from an allowed balancer has its PROXY header read off
  first (``proxied.HeaderReader``: a reader callback, no task), the ACL is applied to the
  client address the header gives, and that address is the connection's from then on (its
  protocol's ``proxied``); anything else is closed and counted.
The accepting itself is ``_accept.c`` in the compiled build (up to ACCEPT_BATCH a readiness
callback; finding none left costs no exception there) and the socket's C-level ``_accept`` in
the pure build; each connection is a bare ``_socket.socket`` (bench/CONNECT.md says why and
what it saved).
Each accepted socket becomes a transport with ``loop.connect_accepted_socket``, stepped
through by hand (``_drive``) rather than wrapped in a task. Measured with connection churn
(wrk, ``Connection: close``): a bare accept-answer-close server costs ~38 us of CPU per
connection this way against ~28 us with uvloop's server; through the whole proxy no extra
cost showed (86-93 us of proxy CPU per connection, 105-127 us with uvloop's server, at the
same wrk-bound rate of 3-6k connections/s on 2 cores).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import functools
import logging
import os
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Final

from ..config.model import ACCEPT_RETRY_DELAY, Address
from . import tls
from .client_socket import ClientSocket, ListenerHandle
from .proxied import HeaderReader

if TYPE_CHECKING:
    from ..core.metrics import ListenerStats
    from ..wire.proxy_protocol import ProxyHeader
    from .context import Context

# The listeners' logger (the messages say "listener ..."), as before the accepting moved here.
log = logging.getLogger("lbproxy.proxy.listener")

# accept() errors that concern one connection only (Linux reports a new connection's pending
# network error there): skip it and go on.
_SKIP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPROTO",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETDOWN",
        "ENETUNREACH",
        "EPERM",
        "ETIMEDOUT",
    )
    if hasattr(errno, name)
)
_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
# What ``next`` gives back when a driven coroutine has returned.
_DONE = object()
# connections accepted per readiness callback, then other events get a turn
ACCEPT_BATCH: Final = 64


def _c_accept_loop() -> Callable[[int, int], tuple[list[tuple[int, Any]], int]] | None:
    """The compiled build's accept loop in C (``_accept.c``); None in the pure build."""
    try:
        from ._accept import accept
    except ImportError:
        return None
    return accept


_c_accept = _c_accept_loop()


def _py_accept(sock: socket.socket) -> tuple[list[tuple[int, Any]], int]:
    """``_accept.c``'s loop in Python (the pure build): a BlockingIOError ends it."""
    taken: list[tuple[int, Any]] = []
    accept = sock._accept  # type: ignore[attr-defined]  # the C method under socket.accept()
    try:
        for _ in range(ACCEPT_BATCH):
            taken.append(accept())
    except (BlockingIOError, InterruptedError):
        pass
    except OSError as exc:
        return taken, exc.errno or errno.EIO
    return taken, 0


# A front end: the protocol that speaks HTTP on an accepted connection, made for it
# (``client.ClientConnection`` for HTTP/1.x, ``http2.Http2Connection`` for h2).
Front = Callable[["Context", ListenerHandle, asyncio.AbstractEventLoop], ClientSocket]


class Fronts:
    """The front ends a listener hands its connections to: ``http1`` (plain connections, and
    TLS ones whose ALPN did not choose h2) and ``http2``. The app gives them: the listener
    only accepts, so it sits beside the data path rather than on top of all of it."""

    __slots__ = ("http1", "http2")

    def __init__(self, http1: Front, http2: Front) -> None:
        self.http1 = http1
        self.http2 = http2


class Alpn(asyncio.Protocol):
    """The protocol of an accepted TLS connection until its handshake is done: then the
    front end ALPN chose (``h2``: ``fronts.http2``, otherwise ``fronts.http1``) takes the
    transport over."""

    def __init__(
        self,
        ctx: Context,
        handle: ListenerHandle,
        fronts: Fronts,
        loop: asyncio.AbstractEventLoop,
        proxied: ProxyHeader | None,
    ) -> None:
        self.ctx = ctx
        self.handle = handle
        self.fronts = fronts
        self.loop = loop
        self.proxied = proxied
        self.accepted = loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        make = self.fronts.http2 if chosen == "h2" else self.fronts.http1
        front = make(self.ctx, self.handle, self.loop)
        front.accepted_at(self.accepted)  # client_header_timeout counts the handshake too
        front.proxied = self.proxied
        transport.set_protocol(front)
        front.connection_made(transport)


def _plain(
    ctx: Context,
    handle: ListenerHandle,
    make: Front,
    loop: asyncio.AbstractEventLoop,
    proxied: ProxyHeader | None,
) -> ClientSocket:
    front = make(ctx, handle, loop)
    front.proxied = proxied
    return front


def _peer_ip(conn: _socket.socket) -> str:
    try:
        return str(conn.getpeername()[0])
    except OSError:
        return "-"


class Bound:
    """One listening socket; ``handle`` is the listener its new connections belong to."""

    __slots__ = ("address", "handle", "server")

    def __init__(self, address: Address, handle: ListenerHandle) -> None:
        self.address = address
        self.handle = handle  # a rename hands the socket (and its new connections) over
        self.server: Acceptor


class Acceptor:
    """Accepts the connections of one listening address (one socket per resolved address;
    ``host:port`` normally resolves to one). Quacks like the part of asyncio.Server in use:
    ``sockets``, ``is_serving``, ``close``."""

    def __init__(
        self,
        ctx: Context,
        fronts: Fronts,
        tls_contexts: dict[str, ssl.SSLContext],
        bound: Bound,
        sockets: list[socket.socket],
        hold: bool,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.ctx = ctx
        self.fronts = fronts
        # The listeners' TLS contexts by listener name, kept up to date by them.
        self.tls_contexts = tls_contexts
        self.bound = bound
        self.sockets = sockets
        self.pending = 0  # accepted, not yet a connection (transport or TLS handshake to come)
        # Sockets whose PROXY header is awaited (``listeners[].proxy_protocol``): a close
        # drops them, rather than handing them to a listener that has stopped.
        self.readers: dict[_socket.socket, HeaderReader] = {}
        self.retry: asyncio.TimerHandle | None = None
        self.closed = False
        # Held: listening (clients wait in the backlog) but not accepting yet, until
        # ``accept``: the proxy's start holds its listeners while servers are warmed.
        self.held = hold
        if not hold:
            self._add_readers()

    def accept(self) -> None:
        """Start accepting on a socket opened held."""
        if self.held and not self.closed:
            self.held = False
            self._add_readers()

    def _add_readers(self) -> None:
        for sock in self.sockets:
            fd = sock.fileno()
            # What a connection's _socket.socket is made with (socket.socket's family and type
            # properties make enums, in Python code).
            kind = (int(sock.family), int(sock.type), sock.proto)
            self.loop.add_reader(fd, self._on_readable, sock, fd, kind)

    def _remove_readers(self) -> None:
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())

    def is_serving(self) -> bool:
        return not self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        elif not self.held:
            self._remove_readers()
        for sock in self.sockets:
            sock.close()
        for reader in self.readers.values():
            reader.cancel()
        self.pending -= len(self.readers)
        self.readers.clear()

    def _on_readable(self, sock: socket.socket, fd: int, kind: tuple[int, int, int]) -> None:
        """Take what waits, up to ACCEPT_BATCH (then other events get a turn)."""
        if _c_accept is not None:
            taken, error = _c_accept(fd, ACCEPT_BATCH)
        else:
            taken, error = _py_accept(sock)
        for i, (conn_fd, peer) in enumerate(taken):
            if self.closed:  # a connection handed over closed the listener
                for rest, _ in taken[i:]:
                    os.close(rest)
                return
            # A bare _socket.socket: uvloop's connect_accepted_socket reads its family and
            # type, which socket.socket would make into enums in Python code, for every
            # connection. Once the transport has the descriptor, the object lets go of it
            # (``_hand``).
            self._take(_socket.socket(kind[0], kind[1], kind[2], conn_fd), peer)
        if error and error not in _SKIP_ERRNOS and not self.closed:
            # (A skipped error concerned one connection: the others still wait, and the
            # socket stays readable, so the loop comes back.)
            self._pause(OSError(error, os.strerror(error)))

    def _pause(self, exc: OSError) -> None:
        """Stop accepting for a moment (waiting clients stay in the backlog), then resume."""
        if exc.errno in _OUT_OF_RESOURCES:
            log.warning(
                "listener %s: cannot accept: %s; pausing accepts for %gs",
                self.bound.handle.runtime.name,
                exc.strerror,
                ACCEPT_RETRY_DELAY,
            )
        else:
            log.error(
                "listener %s: accept failed: %s; pausing accepts for %gs",
                self.bound.handle.runtime.name,
                exc,
                ACCEPT_RETRY_DELAY,
            )
        self._remove_readers()
        self.retry = self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume)

    def _resume(self) -> None:
        self.retry = None
        if not self.closed:
            self._add_readers()

    def _take(self, conn: _socket.socket, peer: Any) -> None:
        handle = self.bound.handle
        lr = handle.runtime
        cfg = lr.config
        stats = lr.stats
        pp = cfg.proxy_protocol
        if pp is not None:
            if not pp.allows(peer[0]):
                stats.connections_refused["proxy_protocol"] += 1
                # Quiet, as an ACL refusal: anyone can knock. A balancer's bad header is logged.
                log.debug("listener %s: %s is not in proxy_protocol.from", lr.name, peer[0])
                conn.close()
                return
        elif cfg.acl is not None and not cfg.acl.allows(peer[0]):
            stats.connections_refused["acl"] += 1
            conn.close()
            return
        limit = cfg.max_connections
        if limit and stats.connections_active + self.pending >= limit:
            stats.connections_refused["max_connections"] += 1
            conn.close()
            return
        self.pending += 1
        if pp is not None:
            self.readers[conn] = HeaderReader(conn, pp.versions, pp.timeout, self._proxied)
        else:
            self._hand(conn, None)

    def _proxied(self, conn: _socket.socket, header: ProxyHeader | None, why: str) -> None:
        """The PROXY header read (or not: ``why``); the ACL then sees the real client."""
        del self.readers[conn]
        lr = self.bound.handle.runtime
        stats = lr.stats
        if header is None:
            self.pending -= 1
            stats.connections_refused["proxy_protocol"] += 1
            log.info("listener %s: connection refused: %s", lr.name, why)
            conn.close()
            return
        acl = lr.config.acl
        if acl is not None:
            client = header.source[0] if header.source is not None else _peer_ip(conn)
            if not acl.allows(client):
                self.pending -= 1
                stats.connections_refused["acl"] += 1
                conn.close()
                return
        if header.tls:
            log.debug("listener %s: %s spoke TLS to the balancer", lr.name, header.source)
        self._hand(conn, header if header.source is not None else None)

    def _hand(self, conn: _socket.socket, proxied: ProxyHeader | None) -> None:
        """Make ``conn`` a connection of its listener (counted in ``pending`` until then)."""
        handle = self.bound.handle
        lr = handle.runtime
        cfg = lr.config
        stats = lr.stats
        ctx = self.ctx
        fronts = self.fronts
        loop = self.loop
        ssl_ctx = None
        if cfg.tls is not None:
            ssl_ctx = self.tls_contexts.get(lr.name)
            if ssl_ctx is None:  # apply() builds it before any runtime uses it: never plain
                log.error("listener %s: no TLS context, connection refused", lr.name)
                self.pending -= 1
                conn.close()
                return
        coro: Coroutine[Any, Any, Any]
        # (connect_accepted_socket asks for a socket.socket; what it uses of one, family,
        # type and fileno(), a bare _socket.socket has.)
        try:
            if ssl_ctx is None:
                coro = self.loop.connect_accepted_socket(
                    functools.partial(_plain, ctx, handle, fronts.http1, loop, proxied),
                    conn,  # type: ignore[arg-type]
                )
            else:
                # The front end is chosen once the handshake has settled ALPN (Alpn).
                coro = self.loop.connect_accepted_socket(
                    functools.partial(Alpn, ctx, handle, fronts, loop, proxied),
                    conn,  # type: ignore[arg-type]
                    ssl=ssl_ctx,
                    ssl_handshake_timeout=cfg.timeouts.client_header,
                )
            steps = coro.__await__()
            step = next(steps, _DONE)
        except Exception:
            # Before the transport took the descriptor (uvloop opens it first thing).
            log.exception("listener %s: cannot take an accepted connection", lr.name)
            self.pending -= 1
            conn.close()
            return
        # The transport has the descriptor now and closes it with itself: the socket object
        # lets go of it (uvloop closes a file object it was given that is not a
        # socket.socket, which would close the number again, perhaps another file's by then).
        conn.detach()
        self._drive(steps, step, stats if ssl_ctx is not None else None)

    def _drive(self, steps: Iterator[Any], step: Any, tls_stats: ListenerStats | None) -> None:
        """Run ``steps`` (a connect_accepted_socket's) to its end without a task: each time
        it waits on a future (``step``), go on when that future is done. A failed TLS
        handshake is counted in ``tls_stats``. (``next`` with a default, not ``send``: the
        end is then no StopIteration caught here, which costs a compiled function a
        traceback made for it.)"""
        if step is _DONE:
            self.pending -= 1
        elif step is None:  # a bare yield: go on at the next turn of the loop
            self.loop.call_soon(self._step, steps, tls_stats)
        else:  # a future: go on when it is done
            step.add_done_callback(functools.partial(self._step, steps, tls_stats))

    def _step(
        self, steps: Iterator[Any], tls_stats: ListenerStats | None, _: object = None
    ) -> None:
        try:
            step = next(steps, _DONE)
        except (Exception, asyncio.CancelledError) as exc:
            # A TLS handshake that failed or timed out; the transport is closed already.
            self.pending -= 1
            if tls_stats is not None:
                tls_stats.tls_failures[tls.failure_reason(exc)] += 1
            log.debug("listener %s: connection failed: %r", self.bound.handle.runtime.name, exc)
            return
        self._drive(steps, step, tls_stats)
