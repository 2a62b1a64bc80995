"""Active health checks: the only I/O that feeds ``health.ServerHealth``.

Owns one check loop per server of every group whose checks are enabled. A server is checked
the moment it appears (at start, or when a reload adds it), so a proxy started in front of
live backends serves within one check round trip; after that first check the loops spread
themselves evenly over the interval instead of firing in a burst. A check that hangs is cut
at the configured timeout. Checks never touch the data path: they run as their own tasks
and only flip a state the data path reads.

A reload hands over the new snapshot with ``apply``: loops of servers that persist keep
running with the new check settings (and keep their health), loops of removed servers stop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Callable

from . import metrics
from .config import Address, HealthCheck
from .health import Event, Transition, codes_match
from .snapshot import ServerState, Snapshot

log = logging.getLogger("lbproxy.checker")

MAX_STATUS_LINE = 4096  # bytes; a longer first line is not an HTTP status line


class CheckFailed(Exception):
    """A check did not pass; the message is the reason shown in logs and on the status page."""


class CheckSkipped(Exception):
    """The proxy itself could not check (out of descriptors or memory): no result at all, so
    a local shortage never takes healthy servers down."""


_OUT_OF_RESOURCES = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))


async def run_check(server: ServerState, hc: HealthCheck) -> str:
    """One check of ``server``; returns the success reason or raises CheckFailed."""
    port = hc.port or server.address.port
    try:
        async with asyncio.timeout(hc.timeout):
            reader, writer = await asyncio.open_connection(
                server.address.host, port, limit=MAX_STATUS_LINE
            )
            try:
                if hc.protocol == "tcp":
                    return "connected"
                host = hc.host or (
                    server.label
                    if port == server.address.port
                    else str(Address(server.address.host, port))  # brackets IPv6
                )
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
    except ConnectionResetError:
        raise CheckFailed("reset") from None
    except ValueError:  # the stream's limit: a status line longer than MAX_STATUS_LINE
        raise CheckFailed("not an HTTP response (status line too long)") from None
    except OSError as exc:
        if exc.errno in _OUT_OF_RESOURCES:
            raise CheckSkipped((exc.strerror or str(exc)).lower()) from None
        raise CheckFailed((exc.strerror or str(exc)).lower()) from None
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise CheckFailed("not an HTTP response" if line else "closed without a response")
    status = int(parts[1])
    text = f"{status} {parts[2].decode('latin-1').strip()}" if len(parts) > 2 else str(status)
    if not codes_match(status, hc.expected_codes):
        raise CheckFailed(f"unexpected status {text}")
    return text


class Checker:
    def __init__(
        self,
        on_transition: Callable[[ServerState, Transition], None],
        registry: metrics.Registry,
    ) -> None:
        self._on_transition = on_transition
        self._registry = registry
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._settings: dict[str, HealthCheck] = {}
        self._closed = False

    def apply(self, snap: Snapshot) -> None:
        """Check exactly the servers of ``snap`` whose group has checks enabled."""
        if self._closed:
            return
        wanted: dict[str, tuple[ServerState, HealthCheck, int, int]] = {}
        for g in snap.groups.values():
            if not g.checks:
                continue
            n = len(g.servers)
            for i, s in enumerate(g.servers):
                wanted[s.id] = (s, g.config.health_check, i, n)
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
                self._tasks[sid] = loop.create_task(self._loop(s, i, n), name=f"check {sid}")

    async def _loop(self, server: ServerState, index: int, count: int) -> None:
        first = True
        while True:
            hc = self._settings[server.id]
            started = time.monotonic()
            try:
                reason = await run_check(server, hc)
                ok = True
            except CheckFailed as exc:
                reason = str(exc)
                ok = False
            except CheckSkipped as exc:
                log.warning("health check of %s skipped: %s", server.id, exc)
                await asyncio.sleep(hc.interval)
                continue
            except Exception as exc:  # a bug here must not stop checking the server
                log.exception("health check of %s crashed", server.id)
                reason, ok = f"internal error: {exc}", False
            now = time.monotonic()
            self._record(server, hc, ok, reason, now, now - started)
            delay = hc.interval
            if first:
                # Spread the loops over the interval from here on: no bursts of checks.
                delay += hc.interval * index / max(count, 1)
                first = False
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
