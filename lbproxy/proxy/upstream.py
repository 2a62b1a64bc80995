"""Connections to backends: the upstream Protocol and connecting (the keep-alive pool each
server keeps of them is ``core.pool``).

Owns:
- ``UpstreamConnection``: a Protocol that hands every event to the client-side handler
  currently using it (``handler``), or, while it sits idle in a pool, closes on anything
  the backend sends (an idle keep-alive connection has nothing legitimate to say);
- ``open_to``: a new connection to a server as its group asks (``preface_and_key``: the
  PROXY header it starts with and the pool key a reused one must have);
- ``Connecting``: a new plain connection (no PROXY header, no TLS: the common case) opened
  without a task, in the loop's callbacks;
- ``connect``: a TCP connect bounded by the listener's connect timeout, to a server's
  resolved addresses (IP literals: no name lookup per connect), tried in order; with the
  group's ``proxy_protocol``, its header written first, on the bare socket (before TLS, as
  HAProxy's ``send-proxy`` does); with the group's ``tls``, the TLS handshake (the server's
  certificate verified) within the same timeout. A TLS connection gives its session back
  to its context when it closes (``upstream_tls.BackendContext.remember``), so the next new
  connection to that server resumes it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from ..config.model import Address
from ..core.pool import Idle
from ..wire import proxy_protocol
from . import upstream_tls

if TYPE_CHECKING:
    from ..config.groups import BackendTls, ServerGroup
    from ..core.snapshot import ServerState
    from .exchange_base import ExchangeBase

Addresses = tuple[tuple[str, int] | None, tuple[str, int] | None]


class Client(Protocol):
    """The client connection a PROXY header speaks of (``exchange_base.Downstream``)."""

    def addresses(self) -> Addresses: ...


class UpstreamConnection(asyncio.Protocol, Idle):  # Idle: its pool reads it natively
    __slots__ = (
        "closed",
        "handler",
        "idle_since",
        "key",
        "reused",
        "tls",
        "tls_server",
        "transport",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        # The exchange using it, told of the backend's bytes, EOF, loss and flow control (its
        # ``upstream_*`` methods). Typed as the native class, not a protocol: its calls stay
        # native under mypyc, where a protocol's go through Python's method lookup.
        self.handler: ExchangeBase | None = None
        self.reused = False  # True once taken from a pool: a reset then means "stale", not "dead"
        self.closed = False
        self.idle_since = 0.0
        self.key = ""  # the pool's: what it was opened with beyond the server (core.pool)
        # TLS: the context it was made with and the server's key there (its session is kept
        # for the next connection when this one closes).
        self.tls: upstream_tls.BackendContext | None = None
        self.tls_server = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        h = self.handler
        if h is not None:
            h.upstream_data(data)
        else:
            self.close()

    def eof_received(self) -> bool | None:
        h = self.handler
        if h is not None:
            h.upstream_eof()
        else:
            self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._keep_session()
        self.closed = True
        h = self.handler
        self.handler = None
        if h is not None:
            h.upstream_lost(exc)

    def pause_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_pause()

    def resume_writing(self) -> None:
        if self.handler is not None:
            self.handler.upstream_resume()

    def close(self) -> None:
        self.handler = None
        if not self.closed:
            self._keep_session()
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        self.handler = None
        if not self.closed:
            self._keep_session()
            self.closed = True
            self.transport.abort()

    def _keep_session(self) -> None:
        ctx = self.tls
        if ctx is not None:
            self.tls = None
            ctx.remember(self.tls_server, self.transport.get_extra_info("ssl_object"))


# What ``next`` gives back when the stepped coroutine has returned.
_DONE = object()

# The result of a connect: the connection, or why there is none (OSError, TimeoutError).
Done = Callable[["UpstreamConnection | None", "BaseException | None"], None]


class Connecting:
    """A plain TCP connect to ``addresses`` (a server's ``connect_to``), each in turn, all
    within ``timeout``, as ``connect`` does but without a task: uvloop's ``create_connection``
    coroutine stepped through by hand (as the listener does with accepted sockets: each
    future it waits on steps it on when done), and a timer that cancels that wait at the
    timeout. ``done`` is called once, from a loop callback, with the connection or the last
    error (TimeoutError past ``timeout``), unless ``cancel`` came first. Measured per
    connect against a task with its timeout scope: about 25 µs less (bench/CONNECT.md)."""

    __slots__ = (
        "addresses",
        "done",
        "i",
        "loop",
        "made",
        "over",
        "starting",
        "steps",
        "timed_out",
        "timer",
        "waiting",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        addresses: Sequence[Address],
        timeout: float,
        done: Done,
    ) -> None:
        self.loop = loop
        self.addresses = addresses
        self.done = done
        self.i = 0
        # The create_connection coroutine being stepped (``next`` with a default: its end is
        # then no StopIteration caught here, which costs a compiled function a traceback),
        # and the protocol it made (its result, which ``next`` does not give).
        self.steps: Iterator[Any] | None = None
        self.made: UpstreamConnection | None = None
        self.waiting: asyncio.Future[Any] | None = None
        self.over = False
        self.timed_out = False
        self.timer = loop.call_later(timeout, self._timed_out)
        # While the constructor runs, a result (a socket that cannot even be made) is given
        # at the next turn: the caller has not kept this object yet.
        self.starting = True
        self._next()
        self.starting = False

    def _next(self) -> None:
        address = self.addresses[self.i]
        coro = self.loop.create_connection(self._protocol, address.host, address.port)
        self.steps = coro.__await__()
        self._step()

    def _protocol(self) -> UpstreamConnection:
        self.made = conn = UpstreamConnection()
        return conn

    def _step(self, _: object = None) -> None:
        """Go on (``_``: the future waited on, when it is the one calling)."""
        steps = self.steps
        if steps is None:
            return
        self.waiting = None
        try:
            waiting: Any = next(steps, _DONE)
        except OSError as exc:
            self.steps = None
            self.i += 1
            if not self.over and self.i < len(self.addresses):
                self._next()  # the next address, within the same timeout
            else:
                self._finish(None, exc)
            return
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # cancelled: at the timeout, or by ``cancel``
            self.steps = None
            self._finish(None, TimeoutError() if self.timed_out else exc)
            return
        if waiting is _DONE:
            self.steps = None
            self._finish(self.made, None)
        elif waiting is not None:  # a future: go on when it is done
            self.waiting = waiting
            waiting.add_done_callback(self._step)
            if self.timed_out or self.over:  # it came due while no wait was there to cancel
                waiting.cancel()
        else:  # a bare yield: go on at the next turn of the loop
            self.loop.call_soon(self._step)

    def _timed_out(self) -> None:
        self.timed_out = True
        waiting = self.waiting
        if waiting is not None:
            waiting.cancel()  # the coroutine closes its socket and raises CancelledError

    def _finish(self, conn: UpstreamConnection | None, exc: BaseException | None) -> None:
        if self.over:
            if conn is not None:
                conn.close()  # cancelled while its transport was being made
            return
        self.over = True
        self.timer.cancel()
        if self.starting:
            self.loop.call_soon(self.done, conn, exc)
        else:
            self.done(conn, exc)

    def cancel(self) -> None:
        """No result wanted any more: the connect is abandoned (its socket closed)."""
        if self.over:
            return
        self.over = True
        self.timer.cancel()
        waiting = self.waiting
        if waiting is not None:
            waiting.cancel()


async def connect(
    addresses: Sequence[Address],
    timeout: float,
    tls: upstream_tls.BackendContext | None = None,
    server_name: str | None = None,
    preface: bytes = b"",
    server: str = "",
) -> UpstreamConnection:
    """Open a connection to the first of ``addresses`` that takes it, all within ``timeout``:
    ``preface`` (a PROXY protocol header) written first, then with ``tls`` a handshake that
    checks the certificate names ``server_name``; raises OSError (the last address's;
    ``ssl.SSLError`` for a failed handshake) or TimeoutError. ``server`` names the server
    for TLS session resumption (the caller's task has said so: ``upstream_tls.for_server``)."""
    loop = asyncio.get_running_loop()
    last = len(addresses) - 1
    async with asyncio.timeout(timeout):
        for i, address in enumerate(addresses):
            try:
                if preface:
                    sock = await _connected(loop, address, preface)
                    _, proto = await loop.create_connection(
                        UpstreamConnection,
                        sock=sock,
                        ssl=tls,
                        server_hostname=server_name if tls is not None else None,
                    )
                elif tls is not None:
                    _, proto = await loop.create_connection(
                        UpstreamConnection,
                        address.host,
                        address.port,
                        ssl=tls,
                        server_hostname=server_name,
                    )
                else:
                    _, proto = await loop.create_connection(
                        UpstreamConnection, address.host, address.port
                    )
            except ssl.SSLError:
                raise  # the server answered: its certificate is the same at any address
            except OSError:
                if i == last:
                    raise
                continue
            # uvloop sets TCP_NODELAY on every TCP transport itself: nothing to tune here.
            if tls is not None:
                proto.tls = tls
                proto.tls_server = server
            return proto
    raise OSError("no address to connect to")


async def _connected(
    loop: asyncio.AbstractEventLoop, address: Address, preface: bytes
) -> socket.socket:
    """A socket connected to ``address`` with ``preface`` sent (a PROXY header: far below
    any socket buffer, so one send takes it whole)."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, (address.host, address.port))
        await loop.sock_sendall(sock, preface)
    except BaseException:
        sock.close()
        raise
    return sock


def preface_and_key(cfg: ServerGroup, client: Client) -> tuple[bytes, str]:
    """The PROXY header a new connection for the group ``cfg`` starts with (b"": none; made
    from the ``client``'s addresses), and the pool key a reused one must have: the group's
    TLS settings and that very header ("" for a group with neither)."""
    version = cfg.proxy_protocol
    if cfg.tls is None and version is None:
        return b"", ""
    preface = b""
    if version is not None:
        source, dest = client.addresses()
        build = proxy_protocol.build_v2 if version == "v2" else proxy_protocol.build_v1
        preface = build(source, dest)
    return preface, f"{hash(cfg.tls)}:{preface.hex()}"


async def open_to(
    server: ServerState, tls: BackendTls | None, timeout: float, preface: bytes
) -> UpstreamConnection:
    """A new connection to ``server``: ``preface`` first, then with ``tls`` the handshake.
    Raises as ``connect`` does."""
    if tls is None:
        return await connect(server.connect_to, timeout, preface=preface)
    upstream_tls.for_server(server.label)  # this task's handshakes: the server's
    return await connect(
        server.connect_to,
        timeout,
        upstream_tls.context(tls),
        tls.server_name or server.address.host,
        preface,
        server.label,
    )
