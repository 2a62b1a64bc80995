"""The parts of an exchange every other part of it sees: the front end's interface
(``Downstream``), the accounting (``record``), and
``ExchangeBase``, one request's own fields and its state (``exchange_state``), with the methods
its ``Dispatch`` and ``Response`` call on it. ``exchange.Exchange`` is the one subclass; the
base exists so that ``dispatch`` and ``response`` can name the exchange they work for without
importing ``exchange`` (which imports them): a native base class keeps those calls and field
reads as fast as on the exchange itself (a Protocol would not, under mypyc).

Only the exchange writes its fields: Dispatch and Response call its methods (``write``,
``start_response``, ``handed_over``, ``retrying``...), which move its state as they go.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from typing import TYPE_CHECKING, Final, Protocol

from ..wire.http1 import BODY_LENGTH, BODY_NONE, RequestHead, ResponseHead
from .exchange_state import (
    END,
    RECEIVING,
    RESPONSE_START,
    RETRY,
    WAITING,
    advance,
    is_over,
    request_complete,
)

if TYPE_CHECKING:
    from ..config.listeners import Listener
    from ..config.model import Forwarding
    from ..core.snapshot import GroupRuntime, ListenerRuntime, ServerState
    from ..core.sticky import Affinity
    from .context import Context
    from .edge import Slot
    from .shaping import Bandwidth

log = logging.getLogger("lbproxy.http")
_clock = time.perf_counter

# connect() failures that are the proxy's own shortage, not the backend's.
OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
REPLAY_LIMIT: Final = 65536  # bytes of an idempotent request body kept for a retry
BUFFER_LIMIT: Final = 65536  # client bytes buffered ahead (pipelining, body before connect)

# Why the exchange takes no more request body (a bit each; reading resumes when none is left).
# Flow control, not the exchange's state: any of these can hold in most states.
P_UPSTREAM_FULL: Final = 1  # the backend is not reading the body as fast as the client sends
P_WAITING: Final = 2  # connecting, or body bytes piling up before a connection is there


class Downstream(Protocol):
    """The client side of an exchange, as the exchange sees it (one per front end).

    Writes are counted by the exchange for its access-log line; the front end counts its own.
    The front ends name it as a base (``ClientConnection``, ``http2_stream.Stream``): mypyc
    then calls them natively (a protocol's calls are Python method lookups otherwise).
    """

    client_ip: str
    client_addr: str
    protocol: str  # what the client speaks, as metrics and the access log name it: "HTTP/2"
    last: float  # loop time of the last activity (upstream bytes keep the client side alive)
    chunked_ok: bool  # whether a chunked response body may go out with its framing
    cert_headers: tuple[bytes, ...]  # X-Client-Cert-* of a verified client certificate
    slot: Slot | None  # its place in connections_per_client (a tunnel takes it over)
    shapers: Bandwidth | None  # the listener's bandwidth cap (backend reads spend too)
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

    def addresses(self) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        """The client's address and the one it connected to (for a PROXY header)."""
        ...


def no_extensions(config: Listener) -> bool:
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


class ExchangeBase:
    """One request's own fields and state, and what its Dispatch and Response call on it.
    The methods that need the Dispatch or the Response are ``exchange.Exchange``'s (declared
    here, they raise)."""

    __slots__ = (
        "affinity",
        "bytes_in",
        "bytes_out",
        "ctx",
        "down",
        "group",
        "loop",
        "lr",
        "paused",
        "req",
        "sent_at",
        "state",
        "t_headers",
        "t_sent",
        "t_start",
        "upgrade",
    )

    def __init__(
        self,
        ctx: Context,
        lr: ListenerRuntime,
        req: RequestHead,
        down: Downstream,
        kind: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.ctx = ctx
        self.lr = lr
        # Handed down by the connection: asyncio.get_running_loop() costs a getpid system
        # call per call (it checks for a fork), i.e. one per request.
        self.loop = loop
        self.down = down
        self.req = req
        complete = kind == BODY_NONE or (kind == BODY_LENGTH and req.content_length == 0)
        self.state = WAITING if complete else RECEIVING  # see exchange_state
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
        self.paused = 0  # the P_* reasons the client's body is not read
        self.affinity: Affinity | None = None  # the session's pin, if sticky (Exchange's)

    # ------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        """Answered, failed, cut, handed over, or the client went away."""
        return is_over(self.state)

    @property
    def req_done(self) -> bool:
        """The client's request is all in (no body, or all of it)."""
        return request_complete(self.state)

    def move(self, event: int) -> None:
        """Take ``event`` (``exchange_state``): the one way the state changes."""
        self.state = advance(self.state, event)

    def retrying(self) -> None:
        """The request goes to a server again: nothing of it is there yet."""
        self.move(RETRY)

    # ------------------------------------------------------------------ toward the client
    def write(self, data: bytes) -> None:
        """Response bytes to the client (an interim response, or body bytes), counted."""
        self.bytes_out += len(data)
        self.down.write(data)

    def head_time(self) -> float:
        """The backend's response head came: time since the request was sent (kept for the
        access log; the caller observes it in the server's histogram)."""
        self.t_headers = t = _clock() - self.t_sent
        return t

    def start_response(
        self, head: ResponseHead, extra: tuple[bytes, ...], kind: int, ended: bool
    ) -> None:
        """The response head to the client (``Downstream.send_head``): no retry from here."""
        self.move(RESPONSE_START)
        self.bytes_out += self.down.send_head(head, extra, kind, ended)

    def handed_over(self, head: bytes) -> None:
        """101: the exchange ends here, the tunnel carries on (it logs its own line)."""
        self.bytes_out += len(head)
        self.move(END)
        self.account(101, access_line=False)

    def answer(self, status: int, reason: str, extra: tuple[tuple[str, str], ...] = ()) -> None:
        """The proxy's own short response; the front end closes after it."""
        if self.done:
            return
        self.move(END)
        if status >= 500:
            log.info("%s: %d: %s", self.down.client_addr, status, reason)
        self.bytes_out += self.down.send_error(status, reason, extra)
        self.account(status)

    # ------------------------------------------------------------------ request side
    def sent(self) -> None:
        """The whole request is with the server: request_timeout counts from here."""
        self.t_sent = _clock()
        self.sent_at = now = self.loop.time()
        self.down.wake_at(now + self.lr.request_timeout)

    def pause(self, bit: int) -> None:
        """Take no more request body, for reason ``bit`` (``P_*``)."""
        if not self.paused:
            self.down.pause_reading()
        self.paused |= bit

    def resume(self, bit: int) -> None:
        if self.paused & bit:
            self.paused &= ~bit
            if not self.paused:
                self.down.resume_reading()

    # ------------------------------------------------------------------ exchange.Exchange's
    def connected(self, body_sent: bool) -> None:
        """The request head (and ``body_sent``: body bytes held for it) went to a server."""
        raise NotImplementedError

    def uncap(self) -> None:
        """The bandwidth cap's debt is paid (``Dispatch.spend``)."""
        raise NotImplementedError

    def finish(self, reuse: bool = True) -> None:
        """The response is complete."""
        raise NotImplementedError

    def bad_gateway(self, reason: str, kind: str = "protocol") -> None:
        raise NotImplementedError

    def cut(self) -> None:
        raise NotImplementedError

    def account(self, status: int, access_line: bool = True) -> None:
        raise NotImplementedError

    def start_tunnel(
        self,
        server: ServerState,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        client_pending: bytes,
        backend_pending: bytes,
    ) -> None:
        """101: the tunnel between the client's and ``server``'s connections, started with
        the bytes each side sent beyond the handshake."""
        raise NotImplementedError

    # UpstreamConnection.handler: the backend connection in use reports here.
    def upstream_data(self, data: bytes) -> None:
        raise NotImplementedError

    def upstream_eof(self) -> None:
        raise NotImplementedError

    def upstream_lost(self, exc: Exception | None) -> None:
        raise NotImplementedError

    def upstream_pause(self) -> None:
        raise NotImplementedError

    def upstream_resume(self) -> None:
        raise NotImplementedError


def describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
