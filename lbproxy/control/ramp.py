"""Slow start as the process carries it out: the ramps in progress and their timer.

Owns when a server's ramp begins and the one timer that moves every ramping server's
``effective`` weight along (``core.slow_start`` computes it). A ramp begins when a server
joins its group (a reload, DNS discovery or the runtime API added it to a running process:
not at start, as in HAProxy, since every server is new then) or comes back UP after being
DOWN, in a group with ``slow_start`` above 0. It lives on the server's state, which outlives
snapshots, so a reload that keeps the server does not restart it. The schedulers read
``effective`` on every pick; updating it a few dozen times per window costs nothing per
request (no clock read in the data path).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..core import metrics
from ..core.slow_start import SCALE, effective_weight
from ..core.snapshot import Holder, ServerState

log = logging.getLogger("lbproxy")

# Steps per window, and the bounds on the time between two: a finer ramp buys nothing.
STEPS = 50
TICK_MIN = 0.02
TICK_MAX = 1.0


class Ramps:
    """The servers ramping up, keyed by id; ``tick`` moves them along."""

    def __init__(self, holder: Holder, registry: metrics.Registry) -> None:
        self.holder = holder
        self.registry = registry
        self.ramping: dict[str, ServerState] = {}
        self.timer: asyncio.TimerHandle | None = None

    def begin(self, server: ServerState, window: float, why: str) -> None:
        """Start ``server``'s ramp over ``window`` seconds (nothing when 0)."""
        if window <= 0:
            return
        now = time.monotonic()
        server.ramp_since = now
        server.ramp_window = window
        server.effective = effective_weight(server.weight, now, window, now)
        self.ramping[server.id] = server
        log.info("server %s: slow start over %gs (%s)", server.id, window, why)
        self._publish(server)
        self._arm()

    def tick(self, now: float | None = None) -> None:
        """Recompute every ramping server's effective weight; finished ramps end."""
        self.timer = None
        if now is None:
            now = time.monotonic()
        groups = self.holder.current.groups
        for sid, s in list(self.ramping.items()):
            g = groups.get(s.group)
            if g is None or g.by_id.get(sid) is not s:
                # Removed by a reload while ramping: its series went with it (publish_all).
                del self.ramping[sid]
                continue
            eff = effective_weight(s.weight, s.ramp_since, s.ramp_window, now)
            if s.ramp_since is None or eff >= s.weight * SCALE:
                s.ramp_since = None
                del self.ramping[sid]
                eff = s.weight * SCALE
            s.effective = eff
            self._publish(s)
        self._arm()

    def _arm(self) -> None:
        if not self.ramping or self.timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # built outside a loop (tests of the bookkeeping): ticked by hand
            return
        window = min(s.ramp_window for s in self.ramping.values())
        self.timer = loop.call_later(min(max(window / STEPS, TICK_MIN), TICK_MAX), self.tick)

    def _publish(self, s: ServerState) -> None:
        self.registry.backend_weight[s.id] = (s.group, s.label, s.effective / SCALE)

    def publish_all(self) -> None:
        """``lbproxy_backend_effective_weight`` for every current server (after a reload or a
        weight change), none for servers gone."""
        out = self.registry.backend_weight
        current = {s.id: s for g in self.holder.current.groups.values() for s in g.servers}
        for sid in list(out):
            if sid not in current:
                del out[sid]
        for s in current.values():
            self._publish(s)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
