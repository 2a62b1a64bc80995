"""Active health checks: the only I/O that feeds ``health.ServerHealth``.

Owns one check loop per server of every group whose checks are enabled, and the warm-up
checks. A check is one of three kinds (``health_check.protocol``): ``http`` (a request, an
expected status), ``tcp`` (a connect), ``websocket`` (a real upgrade: 101 with the right
``Sec-WebSocket-Accept``, then a clean close). A check speaks to the server as requests do
(``Probe``): over TLS with the group's ``tls`` (a failed handshake fails the check and is
counted in the server's ``tls_failures``), after a PROXY header with its
``proxy_protocol`` (v2 ``LOCAL``, v1 ``UNKNOWN``: the check is the proxy's own). A check
that hangs is cut at the configured timeout. Checks never touch the data path: they run as
their own tasks and only flip a state the data path reads.

Warming (``warm``): before a snapshot goes live, the proxy has the servers that would
otherwise take no traffic for want of a first check (every server at start, servers new to
a group, every server of a group whose checks were just enabled) checked once, all at
once, each bounded by its own check timeout. The loops ``apply`` then starts for them wait
one interval (spread, see below) before their next check instead of checking again at once.

A server not warmed is checked the moment its loop starts; after that first check the loops
spread themselves evenly over the interval instead of firing in a burst. A reload hands over
the new snapshot with ``apply``: loops of servers that persist keep running with the new
check settings (and keep their health), loops of removed servers stop.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import logging
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from ..config.backend import BackendTls, HealthCheck
from ..config.model import Address
from ..core import metrics
from ..core.health import Event, Transition, codes_match
from ..core.snapshot import ServerState, Snapshot
from ..proxy import upstream_tls
from ..wire import proxy_protocol

if TYPE_CHECKING:  # only annotations: importing groups here would deepen the import chain
    from ..config.groups import ServerGroup

log = logging.getLogger("lbproxy.control.checker")

MAX_STATUS_LINE = 4096  # bytes; a longer first line is not an HTTP status line
MAX_HEAD_LINES = 100  # header lines of a websocket check's 101 answer
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
# A masked close frame with code 1000 (normal closure): FIN + opcode 8, MASK + length 2.
WS_CLOSE_CODE = (1000).to_bytes(2, "big")


class CheckFailed(Exception):
    """A check did not pass; the message is the reason shown in logs and on the status page."""


class CheckSkipped(Exception):
    """The proxy itself could not check (out of descriptors or memory): no result at all, so
    a local shortage never takes healthy servers down."""


_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


class Probe(NamedTuple):
    """How a server is checked: its group's health_check, and how the group's connections
    are made (TLS, a PROXY header)."""

    hc: HealthCheck
    tls: BackendTls | None = None
    proxy_protocol: str | None = None


def probe(group: ServerGroup) -> Probe:
    return Probe(group.health_check, group.tls, group.proxy_protocol)


async def run_check(server: ServerState, how: HealthCheck | Probe) -> str:
    """One check of ``server``; returns the success reason or raises CheckFailed."""
    p = how if isinstance(how, Probe) else Probe(how)
    hc = p.hc
    port = hc.port or server.address.port
    try:
        async with asyncio.timeout(hc.timeout):
            reader, writer = await _open(server, port, p)
            try:
                if hc.protocol == "tcp":
                    return "connected"
                host = hc.host or (
                    server.label
                    if port == server.address.port
                    else str(Address(server.address.host, port))  # brackets IPv6
                )
                if hc.protocol == "websocket":
                    return await _websocket(reader, writer, hc.path, host)
                writer.write(
                    f"{hc.method} {hc.path} HTTP/1.1\r\nHost: {host}\r\n"
                    "User-Agent: lbproxy-health-check\r\nAccept: */*\r\n"
                    "Connection: close\r\n\r\n".encode("latin-1")
                )
                line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        raise CheckFailed(f"timeout after {hc.timeout:g}s") from None
    except ConnectionRefusedError:
        raise CheckFailed("refused") from None
    except ConnectionResetError as exc:
        if p.tls is None:
            raise CheckFailed("reset") from None
        # With TLS a reset comes from the handshake (a TCP connect is refused, not reset).
        server.stats.tls_failures[upstream_tls.failure_reason(exc)] += 1
        raise CheckFailed(f"TLS handshake failed: {upstream_tls.describe(exc)}") from None
    except (ssl.SSLError, upstream_tls.TlsError) as exc:
        server.stats.tls_failures[upstream_tls.failure_reason(exc)] += 1
        raise CheckFailed(f"TLS handshake failed: {upstream_tls.describe(exc)}") from None
    except ValueError:  # the stream's limit: a status line longer than MAX_STATUS_LINE
        raise CheckFailed("not an HTTP response (status line too long)") from None
    except OSError as exc:
        if exc.errno in _OUT_OF_RESOURCES:
            raise CheckSkipped((exc.strerror or str(exc)).lower()) from None
        raise CheckFailed((exc.strerror or str(exc)).lower()) from None
    status, text = _status(line)
    if not codes_match(status, hc.expected_codes):
        raise CheckFailed(f"unexpected status {text}")
    return text


async def _open(
    server: ServerState, port: int, p: Probe
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``server`` as the group's requests make them: the PROXY header first
    (before TLS), then the TLS handshake."""
    host = server.address.host
    tls = upstream_tls.context(p.tls) if p.tls is not None else None
    name = (p.tls.server_name or host) if p.tls is not None else None
    if tls is not None:
        upstream_tls.for_server(str(Address(host, port)))
    if p.proxy_protocol is None:
        return await asyncio.open_connection(
            host, port, limit=MAX_STATUS_LINE, ssl=tls, server_hostname=name
        )
    build = proxy_protocol.build_v2 if p.proxy_protocol == "v2" else proxy_protocol.build_v1
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, address)
        await loop.sock_sendall(sock, build(None, None))  # LOCAL / UNKNOWN: our own check
        return await asyncio.open_connection(
            sock=sock, limit=MAX_STATUS_LINE, ssl=tls, server_hostname=name
        )
    except BaseException:
        sock.close()
        raise


def _status(line: bytes) -> tuple[int, str]:
    """The status code of an HTTP status line and its text for logs; CheckFailed if none."""
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise CheckFailed("not an HTTP response" if line else "closed without a response")
    status = int(parts[1])
    text = f"{status} {parts[2].decode('latin-1').strip()}" if len(parts) > 2 else str(status)
    return status, text


def ws_accept(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` a server must answer to ``key`` (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


async def _websocket(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str, host: str
) -> str:
    """Upgrade, check the handshake answer, then close cleanly: a masked close frame (1000),
    and the server's close frame or the end of the connection."""
    key = base64.b64encode(os.urandom(16))
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lbproxy-health-check\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n\r\n".encode("latin-1")
    )
    status, text = _status(await reader.readline())
    if status != 101:
        raise CheckFailed(f"unexpected status {text} (expected 101 to a websocket upgrade)")
    accept: bytes | None = None
    for _ in range(MAX_HEAD_LINES):
        line = await reader.readline()
        if not line.endswith(b"\n"):
            raise CheckFailed("closed in the middle of the 101 response head")
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-accept":
            accept = value.strip()
    else:
        raise CheckFailed(f"101 response head longer than {MAX_HEAD_LINES} lines")
    if accept is None:
        raise CheckFailed("101 without Sec-WebSocket-Accept")
    if accept != ws_accept(key):
        raise CheckFailed("101 with a wrong Sec-WebSocket-Accept")
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(WS_CLOSE_CODE))
    writer.write(b"\x88\x82" + mask + payload)
    # The server ending the connection (even with a reset) after our close frame is a
    # close too: many servers skip the close frame.
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionResetError):
        await _until_close_frame(reader)
    return f"{text}, closed cleanly"


async def _until_close_frame(reader: asyncio.StreamReader) -> None:
    """Read (and drop) frames until the server's close frame; IncompleteReadError at EOF."""
    while True:
        head = await reader.readexactly(2)
        size = head[1] & 0x7F
        if size == 126:
            size = int.from_bytes(await reader.readexactly(2), "big")
        elif size == 127:
            size = int.from_bytes(await reader.readexactly(8), "big")
        if head[1] & 0x80:  # a server must not mask, but skipping the key costs nothing
            await reader.readexactly(4)
        if head[0] & 0x0F == 8:
            return
        while size:  # a frame sent before the server saw our close: skip it in pieces
            size -= len(await reader.readexactly(min(size, 65536)))


class Checker:
    def __init__(
        self,
        on_transition: Callable[[ServerState, Transition], None],
        registry: metrics.Registry,
    ) -> None:
        self._on_transition = on_transition
        self._registry = registry
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._settings: dict[str, Probe] = {}
        self._warmed: dict[str, float] = {}  # server id -> when its warm-up check started
        self._closed = False

    async def warm(self, targets: Sequence[tuple[ServerState, Probe]]) -> None:
        """Check each of ``targets`` once, all at once, and record the results like any
        check's; returns when every one has answered or hit its check timeout. The loop
        ``apply`` starts next for a warmed server waits an interval before checking again."""
        self._warmed.clear()
        if self._closed or not targets:
            return
        await asyncio.gather(*(self._warm_one(s, hc) for s, hc in targets))

    async def _warm_one(self, server: ServerState, hc: Probe) -> None:
        started = time.monotonic()
        result = await self._check(server, hc)
        if result is None:
            return  # skipped: its loop checks it at once instead
        now = time.monotonic()
        self._record(server, hc.hc, *result, now, now - started)
        self._warmed[server.id] = started

    def apply(self, snap: Snapshot) -> None:
        """Check exactly the servers of ``snap`` whose group has checks enabled."""
        if self._closed:
            return
        wanted: dict[str, tuple[ServerState, Probe, int, int]] = {}
        for g in snap.groups.values():
            if not g.checks:
                continue
            n = len(g.servers)
            for i, s in enumerate(g.servers):
                wanted[s.id] = (s, probe(g.config), i, n)
        for sid in list(self._tasks):
            if sid not in wanted:
                self._tasks.pop(sid).cancel()
                self._settings.pop(sid, None)
        loop = asyncio.get_running_loop()
        for sid, (s, hc, i, n) in wanted.items():
            old = self._settings.get(sid)
            self._settings[sid] = hc
            if old is not None and old != hc and sid in self._tasks:
                # New settings apply now, not after the old interval's sleep (1m -> 2s must
                # not wait a minute). The health state is kept; only the loop restarts.
                self._tasks.pop(sid).cancel()
            if sid not in self._tasks:
                warmed = self._warmed.get(sid)
                self._tasks[sid] = loop.create_task(
                    self._loop(s, i, n, warmed), name=f"check {sid}"
                )
        # Warm-ups of a snapshot that never went live (a reload failing after them) are
        # no reason to skip a later first check.
        self._warmed.clear()

    async def _check(self, server: ServerState, hc: Probe) -> tuple[bool, str] | None:
        """One check: (passed, reason), or None when the proxy itself could not check."""
        try:
            return True, await run_check(server, hc)
        except CheckFailed as exc:
            return False, str(exc)
        except CheckSkipped as exc:
            log.warning("health check of %s skipped: %s", server.id, exc)
            return None
        except Exception as exc:  # a bug here must not stop checking the server
            log.exception("health check of %s crashed", server.id)
            return False, f"internal error: {exc}"

    async def _loop(
        self, server: ServerState, index: int, count: int, warmed: float | None
    ) -> None:
        # Spread the loops over the interval after the first check: no bursts of checks.
        spread = self._settings[server.id].hc.interval * index / max(count, 1)
        if warmed is not None:
            # The warm-up was this loop's first check.
            hc = self._settings[server.id].hc
            await asyncio.sleep(max(0.0, warmed + hc.interval + spread - time.monotonic()))
            spread = 0.0
        while True:
            how = self._settings[server.id]
            hc = how.hc
            started = time.monotonic()
            result = await self._check(server, how)
            if result is None:
                await asyncio.sleep(hc.interval)
                continue
            now = time.monotonic()
            self._record(server, hc, *result, now, now - started)
            delay = hc.interval + spread
            spread = 0.0
            await asyncio.sleep(max(0.0, delay - (time.monotonic() - started)))

    def _record(
        self,
        server: ServerState,
        hc: HealthCheck,
        ok: bool,
        reason: str,
        now: float,
        latency: float,
    ) -> None:
        server.stats.health_checks["success" if ok else "failure"] += 1
        t = server.health.observe(
            Event.CHECK_OK if ok else Event.CHECK_FAIL,
            reason,
            now,
            healthy_threshold=hc.healthy_threshold,
            unhealthy_threshold=hc.unhealthy_threshold,
            latency=latency,
        )
        if t is not None:
            self._on_transition(server, t)

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
