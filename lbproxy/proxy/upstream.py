"""Connections to backends: the upstream Protocol and connecting (the keep-alive pool each
server keeps of them is ``core.pool``).

Owns:
- ``UpstreamConnection``: a Protocol that hands every event to the client-side handler
  currently using it (``handler``), or, while it sits idle in a pool, closes on anything
  the backend sends (an idle keep-alive connection has nothing legitimate to say);
- ``connect``: a TCP connect bounded by the listener's connect timeout, to a server's
  resolved addresses (IP literals: no name lookup per connect), tried in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from ..config.model import Address


class Handler(Protocol):
    """What an upstream connection reports to the client side using it."""

    def upstream_data(self, data: bytes) -> None: ...
    def upstream_eof(self) -> None: ...
    def upstream_lost(self, exc: Exception | None) -> None: ...
    def upstream_pause(self) -> None: ...
    def upstream_resume(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = ("closed", "handler", "idle_since", "reused", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.handler: Handler | None = None
        self.reused = False  # True once taken from a pool: a reset then means "stale", not "dead"
        self.closed = False
        self.idle_since = 0.0

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
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        self.handler = None
        if not self.closed:
            self.closed = True
            self.transport.abort()


async def connect(addresses: Sequence[Address], timeout: float) -> UpstreamConnection:
    """Open a TCP connection to the first of ``addresses`` that takes it, all within
    ``timeout``; raises OSError (the last address's) or TimeoutError."""
    loop = asyncio.get_running_loop()
    last = len(addresses) - 1
    async with asyncio.timeout(timeout):
        for i, address in enumerate(addresses):
            try:
                _, proto = await loop.create_connection(
                    UpstreamConnection, address.host, address.port
                )
            except OSError:
                if i == last:
                    raise
                continue
            # uvloop sets TCP_NODELAY on every TCP transport itself: nothing to tune here.
            return proto
    raise OSError("no address to connect to")
