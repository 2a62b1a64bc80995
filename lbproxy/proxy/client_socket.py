"""What both front ends (HTTP/1.1 ``client``, HTTP/2 ``http2``) do with an accepted client
socket, whatever the protocol on it: ``ClientSocket``, their shared base, and
``ListenerHandle``, the listener runtime a connection reads.

``ClientSocket`` is counted in the listener's stats while open, pauses reading for a set of
reasons (bits: its own is ``P_BANDWIDTH``, the listener's bandwidth cap), has one timer, writes
(a response head held back goes out with the next bytes in one writev), closes, and lingers
after an answer; it is admitted under the listener's per-client limits, carries the
X-Client-Cert-* lines of a verified client certificate, and reads CLB's optional forwarding
lines from its addresses (``forwarding_lines``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Final

from ..config.model import LINGER_TIMEOUT
from ..wire import headers
from . import tls

if TYPE_CHECKING:
    from ..config.model import Forwarding
    from ..core.snapshot import ListenerRuntime
    from ..wire.proxy_protocol import ProxyHeader
    from .context import Context
    from .edge import Slot
    from .shaping import Bandwidth

log = logging.getLogger("lbproxy.http")
_clock = time.perf_counter

P_BANDWIDTH: Final = 4  # a bit of ``ClientSocket.paused``: the listener's bandwidth cap (shaping)
# A front end's phase: reading a request head, in a request, closed (or lingering).
HEAD, ACTIVE, CLOSED = 0, 1, 2


class ListenerHandle:
    """A listener's current runtime; replaced on reload, kept as-is if the listener is removed."""

    __slots__ = ("runtime",)

    def __init__(self, runtime: ListenerRuntime) -> None:
        self.runtime = runtime


class ClientSocket(asyncio.Protocol):
    """What a front end does with its client socket, whatever the protocol on it: counted in
    the listener's stats while open, reading paused for a set of reasons (bits), one timer
    (``_on_timer``, the front end's), writes (a response head held back goes out with the
    next bytes in one writev), closing, and lingering after an answer; admitted under the
    listener's per-client limits (``slot``), read through its bandwidth cap (``shapers``),
    the X-Client-Cert-* lines of a verified client certificate (``cert_headers``)."""

    def __init__(
        self,
        ctx: Context,
        handle: ListenerHandle,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.ctx = ctx
        self.handle = handle
        self.lr = handle.runtime
        # The listener hands its loop down: asyncio.get_running_loop() costs a getpid
        # system call each time.
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        # The client: the socket's peer, or the one a PROXY protocol header named (read by
        # the listener before this protocol was made: ``proxied``). The one source of the
        # client address for everything that uses it (forwarding headers, limits, ``sh``,
        # logs, the PROXY header sent on to backends).
        self.proxied: ProxyHeader | None = None
        self.client_ip = "-"
        self.client_port = 0
        self.client_addr = "-"
        self.phase = HEAD
        self.paused = 0
        self.client_eof = False
        self.head_out: bytes | None = None  # a response head waiting for its first body bytes
        self.bytes_in = 0
        self.bytes_out = 0
        self.last = self.loop.time()  # the protocol is made at the accept: its time
        self.timer: asyncio.TimerHandle | None = None
        self.timer_when = 0.0
        self.cert_headers: tuple[bytes, ...] = ()  # a verified client certificate (mutual TLS)
        self.slot: Slot | None = None  # counted against connections_per_client
        self.shapers: Bandwidth | None = None  # the listener's bandwidth cap, if any
        self.write_paused = False  # the client's write buffer is full

    def accepted_at(self, when: float) -> None:
        """Count this connection's time from ``when``, its accept: a TLS connection's front
        end is made once the handshake is done, and the handshake counts too."""
        self.last = when

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Counted and open, unless over ``connections_per_client`` (then closed at once,
        counted as refused; ``phase`` says so)."""
        self.transport = transport  # type: ignore[assignment]
        proxied = self.proxied
        peer = proxied.source if proxied is not None else transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip = str(peer[0])
            self.client_port = int(peer[1])
            self.client_addr = (
                f"[{peer[0]}]:{peer[1]}" if ":" in self.client_ip else f"{peer[0]}:{peer[1]}"
            )
        config = self.lr.config
        if config.tls is not None and config.tls.client_auth is not None:
            self.cert_headers = tls.client_cert_headers(transport.get_extra_info("ssl_object"))
        if config.limits is not None:
            self.slot = self.ctx.edges.admit(self.lr, self.client_ip)
            if self.slot is None:
                self.phase = CLOSED
                transport.close()
                return
        if config.bandwidth:
            self.shapers = self.ctx.edges.bandwidth(self.lr)
        ls = self.lr.stats
        ls.connections_active += 1
        ls.connections_total += 1
        ls.live.add(self)

    def live_bytes(self) -> tuple[int, int]:
        return self.bytes_in, self.bytes_out

    def live_messages(self) -> tuple[str, int, int]:
        return "", 0, 0  # not a tunnel (an upgraded connection's tunnel counts its own)

    def write(self, data: bytes) -> None:
        self.bytes_out += len(data)
        head = self.head_out
        if head is None:
            self.transport.write(data)
        else:
            self.head_out = None
            self.transport.writelines((head, data))

    def flush(self) -> None:
        if self.head_out is not None:
            self.transport.write(self.head_out)
            self.head_out = None

    def wake_at(self, when: float) -> None:
        if when < self.timer_when:
            self._arm(when)

    def local_host(self) -> bytes:
        local = self.transport.get_extra_info("sockname")
        name = str(local[0]) if isinstance(local, tuple) else "localhost"
        return (f"[{name}]" if ":" in name else name).encode()

    def addresses(self) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        """The client's address and the one it connected to (a PROXY header's, when one came
        first), for the PROXY header sent on to a backend."""
        proxied = self.proxied
        if proxied is not None:
            return proxied.source, proxied.dest
        local = self.transport.get_extra_info("sockname")
        client = (self.client_ip, self.client_port) if self.client_addr != "-" else None
        dest = (str(local[0]), int(local[1])) if isinstance(local, tuple) else None
        return client, dest

    def forwarding_lines(self, fwd: Forwarding) -> tuple[bytes, ...]:
        """CLB's optional forwarding lines (``fwd.extra``), read from this connection's
        addresses (the header rules are ``headers``')."""
        transport = self.transport
        local = transport.get_extra_info("sockname")
        local_ok = isinstance(local, tuple)
        return headers.forwarding_lines(
            port=int(local[1]) if fwd.port and local_ok else None,
            client_port=(
                self.client_port if fwd.client_srcport and self.client_addr != "-" else None
            ),
            slb_ip=str(local[0]) if fwd.slb_ip and local_ok else None,
            slb_id=fwd.slb_id,
        )

    def _spend_in(self, n: int) -> None:
        """``n`` bytes read from the client, against the listener's bandwidth cap."""
        shapers = self.shapers
        if shapers is not None and shapers.inbound.spend(n, self._bw_resume_client):
            self._pause(P_BANDWIDTH)

    def _bw_resume_client(self) -> None:
        self._resume(P_BANDWIDTH)

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
        if self.phase == CLOSED and self.timer is None:
            return
        self.phase = CLOSED
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

    def _pause(self, bit: int) -> None:
        if not self.paused and self.phase != CLOSED:
            self.transport.pause_reading()
        self.paused |= bit

    def _resume(self, bit: int) -> None:
        if self.paused & bit:
            self.paused &= ~bit
            if not self.paused and self.phase != CLOSED:
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
        raise NotImplementedError

    def shutdown(self) -> None:
        """Graceful stop: finish what is under way, take nothing new (the front end's)."""
        raise NotImplementedError
