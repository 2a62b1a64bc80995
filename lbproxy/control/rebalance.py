"""Moving WebSockets between servers: the rebalance after a scale-out, and shedding by hand.

Owns the timer that looks at every group with ``rebalance`` once per ``PERIOD`` and the
closes it schedules, and the sheds asked for through the runtime API. Which servers give up
how many tunnels is decided by ``core.rebalance``; this module picks the tunnels and closes
them, each as a drain does (``Tunnel.go_away``: a close frame toward each side at a frame
boundary, then the close handshake), spread evenly in time, counted in
``lbproxy_websockets_rebalanced_total`` and logged with ``close_reason=rebalance``.

A move closes toward the client first (``client_first``): what the client sends until its
close frame still reaches the server, which then gets a masked 1001 in its place; so no
message a client sent before its close frame is lost.

Which tunnels: the ones idle longest (the least activity lost), never one in the middle of a
message either way (``Tunnel.midway``; it is passed over for the next). A round's closes
stop as soon as the group's spread is within tolerance again. While tunnels are moved off a
server it is *relieved* (``ServerState.relieved_until``, loop time): an upgrade its insert
cookie pins there is placed anew (``dispatch``) so the cookie does not send it back.

Under ``--workers`` every worker moves its own tunnels (it sees only those), each with its
share of ``rate`` (``share``: the number of workers).

In a fleet (``cluster``) the spread and the plan are the fleet's: ``control.cluster`` sets
``peers`` (the other instances' open tunnels per server, about twice a second) and each
instance closes only its part of each server's excess (``core.rebalance.portion``), at its
own rate as above. Without peers (no cluster, Redis down) it is this instance's alone.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from ..core.history import EventLog
from ..core.metrics import ListenerStats
from ..core.rebalance import Load, fleet_loads, idlest_last, plan, portion, within
from ..core.snapshot import GroupRuntime, Holder, ServerState
from ..proxy.tunnel import Tunnel, open_tunnels

log = logging.getLogger("lbproxy")

PERIOD = 1.0  # seconds between two looks at the groups (and the span of one round's closes)
# How long a server stays relieved after its last scheduled close: its clients' reconnects.
RELIEF_GRACE = 5.0


def websockets(server: ServerState) -> int:
    return sum(server.stats.ws_active.values())


def loads(group: GroupRuntime) -> list[Load]:
    """The servers of ``group`` that take new tunnels, with their open tunnels."""
    return [Load(s.id, websockets(s), s.effective) for s in group.available()]


def _still_open(leaving: dict[str, list[Tunnel]], sid: str) -> int:
    """How many of the tunnels told to leave ``sid`` are still open (the closed ones dropped)."""
    told = leaving.get(sid)
    if not told:
        return 0
    told[:] = [t for t in told if not t.closed]
    if not told:
        del leaving[sid]
    return len(told)


class _Job:
    """Closes planned in one go: the k-th of n at ``window * (k + 0.5) / n``; each takes the
    first tunnel of its server's queue (idle longest first) that is open and not midway."""

    def __init__(
        self,
        owner: Mover,
        order: list[ServerState],
        window: float,
        code: int,
        done: Callable[[], bool] | None,
    ) -> None:
        self.owner = owner
        self.order = order  # the server each close is taken from, in turn
        self.window = window
        self.code = code
        self.done = done  # stop early when it says so (the spread is within tolerance)
        self.loop = asyncio.get_running_loop()
        self.start = self.loop.time()
        self.queues: dict[str, list[Tunnel]] = {}
        for s in order:
            if s.id not in self.queues:
                self.queues[s.id] = idlest_last(open_tunnels(owner.listeners, s))
                s.relieved_until = max(s.relieved_until, self.start + window + RELIEF_GRACE)
        self.step = 0
        self.moved = 0
        self.timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        n = len(self.order)
        if self.step >= n:
            self.owner.finished(self)
            return
        when = self.start + self.window * (self.step + 0.5) / n
        self.timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.timer = None
        try:
            if self.done is not None and self.done():
                self.owner.finished(self)
                return
            self._close_next()
        except Exception:
            # A timer callback: an exception here would leave the job registered and the
            # group's rebalance stopped for good. This round ends; the next look plans anew.
            log.exception("rebalance: a round stopped on an error")
            self.owner.finished(self)
            return
        self.arm()

    def _close_next(self) -> None:
        server = self.order[self.step]
        self.step += 1
        queue = self.queues[server.id]
        while queue:
            t = queue.pop()
            if t.closed or t.ending is not None or t.midway():
                continue
            server.stats.ws_rebalanced += 1
            self.moved += 1
            t.go_away(self.code, "rebalance", client_first=True)
            # Open until its client answers (up to WS_CLOSE_FRAME_WAIT): not load to plan on.
            self.owner.leaving.setdefault(server.id, []).append(t)
            break

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Mover:
    """The rebalance rounds of every group and the sheds in progress."""

    def __init__(
        self, holder: Holder, listeners: dict[str, ListenerStats], events: EventLog
    ) -> None:
        self.holder = holder
        self.events = events  # the history's event log: each round and shed begun
        self.listeners = listeners  # the registry's: every open tunnel is in one's ``live``
        self.share = 1  # processes moving tunnels at once (--workers): each takes rate/share
        self.timer: asyncio.TimerHandle | None = None
        self.rounds: dict[str, _Job] = {}  # group -> its rebalance round in progress
        self.sheds: list[_Job] = []
        self.moving: dict[str, int] = {}  # group -> tunnels the last round set out to move
        # server id -> tunnels told to go and maybe still open: their client has not answered
        # the close frame yet (up to WS_CLOSE_FRAME_WAIT on a slow network) nor reconnected.
        # They still count where they were, so no round is planned for their group until they
        # have gone: it would move the same excess again.
        self.leaving: dict[str, list[Tunnel]] = {}
        # The fleet (set by ``control.cluster``): this instance's name in it, and the other
        # instances' open tunnels (instance -> server id -> tunnels); empty: on its own.
        self.me = ""
        self.peers: dict[str, dict[str, int]] = {}

    def start(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(PERIOD, self._look)

    def _look(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(PERIOD, self._look)
        for sid in list(self.leaving):  # the closed ones out, of removed servers too
            _still_open(self.leaving, sid)
        for g in self.holder.current.groups.values():
            if (
                g.config.rebalance is not None
                and g.name not in self.rounds
                and not any(sid in self.leaving for sid in g.by_id)
            ):
                self.round(g)

    def round(self, g: GroupRuntime) -> int:
        """Plan and begin one round for ``g``; the number of closes planned."""
        cfg = g.config.rebalance
        assert cfg is not None
        budget = max(1, math.floor(cfg.rate * PERIOD / self.share))
        moves = self._plan(g, cfg.tolerance, budget)
        self.moving[g.name] = sum(moves.values())
        if not moves:
            return 0
        # Interleaved, so that every over-loaded server gives up its part across the round.
        order: list[ServerState] = []
        left = dict(moves)
        while left:
            for sid in list(left):
                order.append(g.by_id[sid])
                left[sid] -= 1
                if not left[sid]:
                    del left[sid]
        text = (
            f"rebalance {g.name}: moving {len(order)} WebSockets ("
            + ", ".join(f"{sid}: {n}" for sid, n in sorted(moves.items()))
            + ")"
        )
        log.info("%s", text)
        self.events.record("rebalance", text, g.name)
        tolerance = cfg.tolerance

        def balanced() -> bool:
            return within(self._loads(g), tolerance)

        job = self.rounds[g.name] = _Job(self, order, PERIOD, cfg.close_code, balanced)
        job.arm()
        return len(order)

    def _loads(self, g: GroupRuntime) -> list[Load]:
        """The group's loads: the fleet's when there are peers, else this instance's."""
        mine = loads(g)
        return fleet_loads(mine, self.peers) if self.peers else mine

    def _plan(self, g: GroupRuntime, tolerance: float, budget: int) -> dict[str, int]:
        mine = loads(g)
        if not self.peers:
            return plan(mine, tolerance, budget)
        peers = self.peers
        fleet = fleet_loads(mine, peers)
        # The fleet's whole excess (no budget: each instance caps its own part below).
        moves = plan(fleet, tolerance, sum(x.tunnels for x in fleet))
        return portion(moves, {x.id: x.tunnels for x in mine}, peers, self.me, budget)

    def shed(self, g: GroupRuntime, server: ServerState, count: int, over: float) -> int:
        """Close ``count`` of ``server``'s tunnels spread over ``over`` seconds (at most as many
        as are open); the number scheduled."""
        n = min(count, len(open_tunnels(self.listeners, server)))
        if n <= 0:
            return 0
        cfg = g.config.rebalance
        code = cfg.close_code if cfg is not None else 1012
        text = f"shedding {n} WebSockets of {server.id} over {over:g}s"
        log.info("%s", text)
        self.events.record("rebalance", text, g.name, server.id)
        job = _Job(self, [server] * n, over, code, None)
        self.sheds.append(job)
        job.arm()
        return n

    def finished(self, job: _Job) -> None:
        job.cancel()
        for name, j in list(self.rounds.items()):
            if j is job:
                del self.rounds[name]
        if job in self.sheds:
            self.sheds.remove(job)

    def in_progress(self, group: str) -> bool:
        return group in self.rounds or any(
            j.order and j.order[0].group == group for j in self.sheds
        )

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for job in [*self.rounds.values(), *self.sheds]:
            job.cancel()
        self.rounds.clear()
        self.sheds.clear()
