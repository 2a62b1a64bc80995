"""The end of the connections at shutdown (``app.Proxy.close`` runs it once, after the
listeners stop accepting): owns ``end_connections``. HTTP requests in flight finish, WebSocket
tunnels get up to ``shutdown_timeout``; the tunnels left are sent a close frame (1001) both
ways and given ``WS_CLOSE_HANDSHAKE_TIMEOUT`` for the close handshake; what remains is cut."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config.model import WS_CLOSE_HANDSHAKE_TIMEOUT
from ..proxy.client_socket import ClientSocket
from ..proxy.tunnel import Tunnel
from ..wire.wsframes import GOING_AWAY

if TYPE_CHECKING:
    from ..core.metrics import Registry
    from ..proxy.context import Context

log = logging.getLogger("lbproxy")


def connections(registry: Registry) -> list[ClientSocket | Tunnel]:
    """Every open client connection and WebSocket tunnel of every listener."""
    out: list[ClientSocket | Tunnel] = []
    for ls in registry.listeners.values():
        out.extend(ls.live)  # type: ignore[arg-type]
    return out


async def end_connections(
    registry: Registry, ctx: Context, timeout: float, stop_servers: Callable[[], None]
) -> None:
    """Let the connections finish within ``timeout``, then close or cut the rest;
    ``stop_servers`` (the drains and timers of ``ServerControl``) runs once the wait is over."""
    ctx.draining = True
    for c in connections(registry):
        if isinstance(c, ClientSocket):
            c.shutdown()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    # Poll rather than wire a completion event through every connection: shutdown is
    # rare, and a 50 ms granularity is far below any timeout a user sets.
    while connections(registry) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    stop_servers()
    left = connections(registry)
    if left:
        log.info("shutdown: closing %d connections still open", len(left))
    tunnels = [c for c in left if isinstance(c, Tunnel)]
    # WebSockets end with a close frame (1001) both ways, so clients see a clean close;
    # before the other connections are cut, as a WebSocket over HTTP/2 (RFC 8441) is a
    # stream of one of them.
    for t in tunnels:
        t.go_away(GOING_AWAY, "shutdown")
    deadline = loop.time() + WS_CLOSE_HANDSHAKE_TIMEOUT
    while any(not t.closed for t in tunnels) and loop.time() < deadline:
        await asyncio.sleep(0.05)
    for c in left:
        if not isinstance(c, Tunnel):
            c.transport.abort()
            c.connection_lost(None)
    for t in tunnels:
        t.shutdown()  # no answer in time (or still mid-frame): cut
