"""Draining WebSockets off a server: the proxy closes its tunnels itself, spread over a window.

Owns one timer per draining server whose group has a ``drain_timeout``. The tunnels open when
the drain begins are closed one by one at evenly spaced moments across the window (the k-th
of n at ``window * (k + 0.5) / n``), never all at once, so thousands of clients do not
reconnect in the same second. Each close is ``Tunnel.go_away``: a close frame with the
group's ``drain_close_code`` to both sides at a frame boundary, then the close handshake. A
tunnel that ends on its own before its turn is simply skipped. At the end of the window any
tunnel still open (one that arrived after the drain began) goes too.

Which servers drain, and when, is decided elsewhere (``snapshot.RuntimeState``: removed,
weight 0, admin state drain); this module only carries it out, and stops when a server is
made ready again.
"""

from __future__ import annotations

import asyncio
import logging

from ..core.metrics import ListenerStats
from ..core.snapshot import ServerState
from ..proxy.tunnel import Tunnel, open_tunnels

log = logging.getLogger("lbproxy.control.drain")


class _Job:
    __slots__ = ("code", "due", "loop", "owner", "server", "step", "timer", "tunnels", "window")

    def __init__(self, owner: Drainer, server: ServerState, window: float, code: int) -> None:
        self.owner = owner
        self.server = server
        self.window = window
        self.code = code
        self.loop = asyncio.get_running_loop()
        # Oldest first: the longest-lived sessions have had the most of their server.
        self.tunnels: list[Tunnel] = sorted(
            open_tunnels(owner.listeners, server), key=lambda t: t.started
        )
        self.step = 0
        self.due = self.loop.time()  # the drain's start; each close is due relative to it
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        log.info(
            "draining %s: closing %d WebSockets over %gs",
            self.server.id,
            len(self.tunnels),
            self.window,
        )
        self._arm()

    def _arm(self) -> None:
        n = len(self.tunnels)
        if self.step < n:
            when = self.due + self.window * (self.step + 0.5) / n
        else:
            when = self.due + self.window
        self.timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.timer = None
        if self.step < len(self.tunnels):
            self._close(self.tunnels[self.step])
            self.step += 1
            self._arm()
            return
        for t in open_tunnels(self.owner.listeners, self.server):  # came after the drain began
            self._close(t)
        self.owner.finished(self)

    def _close(self, tunnel: Tunnel) -> None:
        if tunnel.closed or tunnel.ending is not None:
            return
        self.server.stats.ws_drained += 1
        tunnel.go_away(self.code, "drain")

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Drainer:
    """The drains in progress, one per server id."""

    def __init__(self, listeners: dict[str, ListenerStats]) -> None:
        self.listeners = listeners  # the registry's: every open tunnel is in one's ``live``
        self._jobs: dict[str, _Job] = {}

    def start(self, server: ServerState, window: float, code: int) -> None:
        """Close ``server``'s tunnels over ``window`` seconds (nothing to do when 0)."""
        if window <= 0 or server.id in self._jobs or not open_tunnels(self.listeners, server):
            return
        job = self._jobs[server.id] = _Job(self, server, window, code)
        job.start()

    def prune(self) -> None:
        """Stop the drains of servers that are no longer draining (made ready again)."""
        for sid, job in list(self._jobs.items()):
            if not job.server.draining:
                log.info("drain of %s stopped: the server takes traffic again", sid)
                job.cancel()
                del self._jobs[sid]

    def finished(self, job: _Job) -> None:
        if self._jobs.get(job.server.id) is job:
            del self._jobs[job.server.id]

    def active(self, server_id: str) -> bool:
        return server_id in self._jobs

    def close(self) -> None:
        for job in self._jobs.values():
            job.cancel()
        self._jobs.clear()
