"""The listening sockets of the proxied listeners, reconciled against each new snapshot.

Owns the listening sockets, one ``Acceptor`` per listener, each listener's ``ListenerHandle``
(the runtime new connections and new requests read) and each https listener's SSLContext.
``apply`` builds the TLS contexts and opens every socket the new snapshot needs *before*
anything changes, so a bind or a certificate that fails leaves the old listeners as they
were; then it points handles at the new runtimes and stops accepting on the sockets no longer
wanted. A listener renamed (or moved onto an address another one leaves) takes that socket
over instead of binding it twice. Stopping a listener never touches connections it already
accepted.

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
Each accepted socket becomes a transport with ``loop.connect_accepted_socket``, stepped
through by hand (``_drive``) rather than wrapped in a task. Measured with connection churn
(wrk, ``Connection: close``): a bare accept-answer-close server costs ~38 us of CPU per
connection this way against ~28 us with uvloop's server; through the whole proxy no extra
cost showed (86-93 us of proxy CPU per connection, 105-127 us with uvloop's server, at the
same wrk-bound rate of 3-6k connections/s on 2 cores).

``raise_fd_limit`` takes the process's whole open-file hard limit, every process that
accepts (single, worker) calls it once at start: each accepted client and each backend
connection is a descriptor.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import resource
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Final

from ..config.model import ACCEPT_RETRY_DELAY, Address
from . import tls
from .client_socket import ClientSocket, ListenerHandle
from .proxied import HeaderReader

if TYPE_CHECKING:
    from ..config.sections import Tls
    from ..core.metrics import ListenerStats
    from ..core.snapshot import Snapshot
    from ..wire.proxy_protocol import ProxyHeader
    from .context import Context

log = logging.getLogger("lbproxy.proxy.listener")

BACKLOG: Final = 2048
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


class BindError(Exception):
    """A listener's address could not be bound; carries the config place of it."""


class _Bound:
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
        self, owner: Listeners, bound: _Bound, sockets: list[socket.socket], hold: bool
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.owner = owner
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
            # socket.socket's accept() is Python code (and its family and type properties
            # make enums): the C method under it gives the bare descriptor.
            accept = sock._accept  # type: ignore[attr-defined]
            kind = (int(sock.family), int(sock.type), sock.proto)
            self.loop.add_reader(sock.fileno(), self._on_readable, accept, kind)

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

    def _on_readable(
        self, accept: Callable[[], tuple[int, Any]], kind: tuple[int, int, int]
    ) -> None:
        """One connection a readiness callback, as nginx by default (``multi_accept off``):
        the socket stays readable while more wait, so the loop comes back at its next turn,
        other events first. Accepting on until EAGAIN would end every callback on an
        exception raised and caught (measured: with the Python-level ``socket.accept`` it
        was a tenth of the CPU of a WebSocket connect-echo-close)."""
        try:
            fd, peer = accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno not in _SKIP_ERRNOS:  # else only that connection failed
                self._pause(exc)
            return
        # A bare _socket.socket: uvloop's connect_accepted_socket reads its family and type,
        # which socket.socket would make into enums in Python code, for every connection.
        # Once the transport has the descriptor, the object lets go of it (``_drive``).
        self._take(_socket.socket(kind[0], kind[1], kind[2], fd), peer)

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
        ctx = self.owner.ctx
        fronts = self.owner.fronts
        loop = self.loop
        ssl_ctx = None
        if cfg.tls is not None:
            ssl_ctx = self.owner.tls_contexts.get(lr.name)
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
                    lambda: _plain(ctx, handle, fronts.http1, loop, proxied),
                    conn,  # type: ignore[arg-type]
                )
            else:
                # The front end is chosen once the handshake has settled ALPN (Alpn).
                coro = self.loop.connect_accepted_socket(
                    lambda: Alpn(ctx, handle, fronts, loop, proxied),
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
            step.add_done_callback(lambda _: self._step(steps, tls_stats))

    def _step(self, steps: Iterator[Any], tls_stats: ListenerStats | None) -> None:
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


class Opening:
    """Sockets opened for a snapshot, held as they are until ``Listeners.commit`` or
    ``cancel``. (A plain class: a compiled dataclass would import its fields' types, the
    snapshot and the config, when this module loads.)"""

    __slots__ = ("contexts", "moved", "opened", "snap")

    def __init__(
        self,
        snap: Snapshot,
        contexts: dict[str, tuple[tuple[Tls, bool], ssl.SSLContext]],
        opened: dict[str, _Bound],
        moved: dict[str, str],
    ) -> None:
        self.snap = snap
        self.contexts = contexts
        self.opened = opened
        self.moved = moved  # listener -> the listener whose socket it takes over


class Listeners:
    def __init__(self, ctx: Context, fronts: Fronts, reuse_port: bool = False) -> None:
        self.ctx = ctx
        self.fronts = fronts
        # Workers share each listening address through SO_REUSEPORT; a lone process does not
        # set it, so a second lbproxy started by mistake fails to bind instead of sharing.
        self.reuse_port = reuse_port
        self.bound: dict[str, _Bound] = {}
        self.handles: dict[str, ListenerHandle] = {}
        # https listener -> its context, and the files it was built from. A changed file set
        # (a renewed certificate changes Tls.digest) builds a new context for new connections;
        # open ones keep theirs.
        self.tls_contexts: dict[str, ssl.SSLContext] = {}
        self._tls_loaded: dict[str, tuple[Tls, bool]] = {}  # the files, and http2 (ALPN)

    def _build_tls(self, snap: Snapshot) -> dict[str, tuple[tuple[Tls, bool], ssl.SSLContext]]:
        """The contexts ``snap`` needs that are not loaded yet; BindError if one fails."""
        built: dict[str, tuple[tuple[Tls, bool], ssl.SSLContext]] = {}
        for i, lst in enumerate(snap.config.listeners):
            if lst.tls is None or self._tls_loaded.get(lst.name) == (lst.tls, lst.http2):
                continue
            try:
                context = tls.load(lst.tls, lst.http2).context
            except tls.TlsError as exc:
                raise BindError(f"listeners[{i}].tls: {exc}") from None
            built[lst.name] = ((lst.tls, lst.http2), context)
        return built

    async def apply(self, snap: Snapshot, hold: bool = False) -> None:
        """Make the open sockets match ``snap``; raise BindError and change nothing on failure.
        With ``hold`` new sockets listen but accept nothing until ``accept``."""
        self.commit(await self.open(snap), accept=not hold)

    async def open(self, snap: Snapshot) -> Opening:
        """Build the TLS contexts and open the sockets ``snap`` adds, held (listening, not
        accepting); raise BindError and change nothing on failure. Nothing else changes
        until ``commit`` (or ``cancel``)."""
        contexts = self._build_tls(snap)
        opened: dict[str, _Bound] = {}
        moved: dict[str, str] = {}  # listener -> the listener whose socket it takes over
        for i, lst in enumerate(snap.config.listeners):
            old = self.bound.get(lst.name)
            if old is not None and old.address == lst.bind:
                continue
            heir = self._vacated(lst.bind, snap)
            if heir is not None:
                # A renamed listener keeps its socket: binding the address twice would fail,
                # and closing it first would refuse connections for a moment.
                moved[lst.name] = heir
                continue
            handle = self.handles.get(lst.name) or ListenerHandle(snap.listeners[lst.name])
            try:
                opened[lst.name] = await self._open(lst.bind, handle, hold=True)
            except OSError as exc:
                for b in opened.values():
                    b.server.close()
                raise BindError(
                    f"listeners[{i}].bind: cannot listen on {lst.bind}: {exc.strerror or exc}"
                ) from None
            except BaseException:  # cancelled (a stop signal while starting): none left open
                for b in opened.values():
                    b.server.close()
                raise
        return Opening(snap, contexts, opened, moved)

    @staticmethod
    def cancel(opening: Opening) -> None:
        for b in opening.opened.values():
            b.server.close()

    def commit(self, opening: Opening, accept: bool = True) -> None:
        """Point the listeners at ``opening``'s snapshot, take over moved sockets, stop the
        ones no longer wanted, and (with ``accept``) start accepting on the new ones."""
        snap, contexts, opened, moved = (
            opening.snap,
            opening.contexts,
            opening.opened,
            opening.moved,
        )
        for name, (files, context) in contexts.items():
            self.tls_contexts[name] = context
            self._tls_loaded[name] = files
            log.info("listener %s: certificate %s loaded", name, files[0].cert)
        for name in list(self.tls_contexts):
            if name not in snap.listeners or snap.listeners[name].config.tls is None:
                del self.tls_contexts[name]
                del self._tls_loaded[name]
        taken = {name: self.bound.pop(heir) for name, heir in moved.items()}
        for name, b in opened.items():
            self.handles.setdefault(name, b.handle)
        for name, b in taken.items():
            b.handle = self.handles.setdefault(name, ListenerHandle(snap.listeners[name]))
            log.info("listener %s takes over the socket on %s", name, b.address)
        for name, runtime in snap.listeners.items():
            self.handles[name].runtime = runtime
        for name, b in list(self.bound.items()):
            if name not in snap.listeners or name in opened or name in taken:
                b.server.close()
                del self.bound[name]
                log.info("listener %s stopped accepting on %s", name, b.address)
        for name, b in (*opened.items(), *taken.items()):
            self.bound[name] = b
            log.info("listener %s accepting on %s", name, self.address(name))
        for name in list(self.handles):
            if name not in snap.listeners:
                del self.handles[name]
        if accept:
            for b in opened.values():
                b.server.accept()

    def _vacated(self, address: Address, snap: Snapshot) -> str | None:
        """The listener bound to ``address`` that ``snap`` no longer has there, if any."""
        if address.port == 0:
            return None  # port 0 is a new port each time, never the same socket
        for name, b in self.bound.items():
            if b.address == address:
                keeper = snap.listeners.get(name)
                if keeper is None or keeper.config.bind != address:
                    return name
        return None

    async def _open(self, address: Address, handle: ListenerHandle, hold: bool) -> _Bound:
        loop = asyncio.get_running_loop()
        bound = _Bound(address, handle)
        infos = await loop.getaddrinfo(
            address.host or None,
            address.port,
            family=socket.AF_INET6 if ":" in address.host else socket.AF_UNSPEC,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    # As asyncio and uvloop do: [::] takes IPv6 only; IPv4 has its own socket.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        bound.server = Acceptor(self, bound, sockets, hold)
        return bound

    def accept(self) -> None:
        """Start accepting on every socket opened held."""
        for b in self.bound.values():
            b.server.accept()

    def address(self, name: str) -> Address:
        """The address actually bound (port 0 in the config becomes the kernel's choice)."""
        b = self.bound[name]
        host, port = b.server.sockets[0].getsockname()[:2]
        return Address(host, port)

    def stop_accepting(self) -> None:
        for name, b in self.bound.items():
            b.server.close()
            log.info("listener %s stopped accepting", name)
        self.bound.clear()


async def probe_binds(new: Snapshot, old: Snapshot | None) -> None:
    """Raise BindError if an address ``new`` adds could not be bound by the workers.

    Binds and closes a socket *without* SO_REUSEPORT: an address ``new`` adds is not held by
    our workers, so it must be free. With SO_REUSEPORT the probe (and then the workers) would
    join the sockets of any process of this user holding it, e.g. a second lbproxy started by
    mistake, and share its connections. Addresses the workers hold already are not probed.
    """
    held = {lst.bind for lst in old.config.listeners} if old is not None else set()
    for i, lst in enumerate(new.config.listeners):
        if lst.bind.port == 0:
            # Each worker would bind a port of its own: nothing would be shared (cli.py
            # refuses it at start; this refuses it at reload).
            raise BindError(f"listeners[{i}].bind: port 0 cannot be shared by workers; name a port")
        if lst.bind in held:
            continue
        family = socket.AF_INET6 if ":" in lst.bind.host else socket.AF_INET
        try:
            infos = socket.getaddrinfo(
                lst.bind.host, lst.bind.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )
            with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(infos[0][4])
        except OSError as exc:
            raise BindError(
                f"listeners[{i}].bind: cannot listen on {lst.bind}: {exc.strerror or exc}"
            ) from None


def raise_fd_limit() -> None:
    """Each proxied WebSocket costs two descriptors: take all the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
