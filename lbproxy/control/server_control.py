"""The runtime state of the backend servers, as the I/O layer acts on it.

Owns ``ServerControl``: everything done to servers between and around reloads, apart from
building snapshots (``snapshot.RuntimeState``) and checking them (``checker``):
- health as the rest of the process sees it: transitions logged and reflected in
  ``lbproxy_backend_up`` / ``lbproxy_backend_state``, a worker taking the supervisor's view,
  which servers a new snapshot must warm first;
- the runtime API's overrides (admin state, weight) and the drains they and reloads begin
  (``drain.Drainer``);
- when a server's slow start begins (``ramp.Ramps``: it joined, came back UP or stopped
  draining) and the WebSockets moved between servers (``rebalance.Mover``);
- removed servers whose connections are still open: kept (draining) until their last one
  ends, then forgotten with their metric series.
"""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Callable

from ..core import metrics
from ..core.fleet import Entry
from ..core.health import ServerHealth, State, Transition
from ..core.history import EventLog
from ..core.snapshot import Changes, Holder, RuntimeState, ServerState, Snapshot
from .checker import Probe, probe
from .drain import Drainer
from .ramp import Ramps
from .rebalance import Mover, websockets

log = logging.getLogger("lbproxy")


class ServerControl:
    def __init__(
        self,
        state: RuntimeState,
        registry: metrics.Registry,
        holder: Holder,
        checks: bool,
        events: EventLog,
    ) -> None:
        self.state = state
        self.registry = registry
        self.holder = holder
        self.checks = checks  # this process runs the health checks (logs transitions)
        self.events = events
        self.drainer = Drainer(registry.listeners)
        self.ramps = Ramps(holder, registry)
        self.mover = Mover(holder, registry.listeners, events)
        self.on_health_change: Callable[[], None] | None = None  # the supervisor's broadcast
        # The supervisor's hand-over of a runtime override to every worker: (id, state, weight)
        self.on_override: Callable[[str, str | None, int | None], None] | None = None
        # Who set each override and when (server id -> (instance name, Unix time)), shown by
        # /-/servers and /status; ``me`` is this instance's name (the fleet's, with cluster).
        self.me = socket.gethostname()
        self.set_by: dict[str, tuple[str, float]] = {}
        # The fleet link (control.cluster), told of every override with its result
        self.on_local_change: Callable[[str, Entry], None] | None = None

    # ------------------------------------------------------------------ health
    def transition(self, server: ServerState, t: Transition) -> None:
        level = logging.INFO if t.new.value == "up" else logging.WARNING
        if not self.checks:
            # A worker's own mark after a passive failure: the supervisor logs the transition.
            level = logging.DEBUG
        log.log(
            level,
            "server %s is %s (was %s): %s",
            server.id,
            t.new.value.upper(),
            t.old.value,
            t.reason,
        )
        if self.checks:
            self.events.record(
                "health",
                f"{server.id} is {t.new.value.upper()} (was {t.old.value}): {t.reason}",
                server.group,
                server.id,
            )
        if t.old is State.DOWN and t.new is State.UP:
            self.slow_start(server, "back UP")
        if server.id in self.state.servers:
            self.registry.backend_up[server.id] = (
                server.group,
                server.label,
                1 if server.health.available else 0,
            )
            self.registry.backend_state[server.id] = (
                server.group,
                server.label,
                server.state_name,
            )
        if self.on_health_change is not None:
            self.on_health_change()

    def set_health(self, states: dict[str, str]) -> None:
        """A worker takes the supervisor's view of every server's health (id -> state)."""
        for sid, value in states.items():
            server = self.state.servers.get(sid)
            if server is not None:
                new = State(value)
                if server.health.state is State.DOWN and new is State.UP:
                    self.slow_start(server, "back UP")
                server.health.state = new
        self.sync(self.holder.current)

    @staticmethod
    def take_health(snap: Snapshot, states: dict[str, str]) -> None:
        """Health from the supervisor for ``snap``'s servers, before it is swapped in."""
        for g in snap.groups.values():
            for s in g.servers:
                value = states.get(s.id)
                if value is not None:
                    s.health.state = State(value)

    def health_map(self) -> dict[str, str]:
        return {sid: s.health.state.value for sid, s in self.state.servers.items()}

    @staticmethod
    def to_warm(old: Snapshot | None, snap: Snapshot) -> list[tuple[ServerState, Probe]]:
        """What must be checked before ``snap`` goes live: in every checked group, the servers
        new to it, or all of them when its checks were off (or the group is new).

        A group whose checks were off gets a fresh health record for each server: what
        passive failures left there while nothing checked is no reason to wait for
        healthy_threshold now (the warm-up check decides, as for a new server)."""
        out: list[tuple[ServerState, Probe]] = []
        for name, g in snap.groups.items():
            if not g.checks:
                continue
            before = old.groups.get(name) if old is not None else None
            known = before.by_id if before is not None and before.checks else None
            for s in g.servers:
                if known is None and s.health.state is not State.UNKNOWN:
                    s.health = ServerHealth()
                if known is None or s.id not in known:
                    out.append((s, probe(g.config)))
        return out

    def sync(self, snap: Snapshot) -> None:
        """``lbproxy_backend_up``, ``lbproxy_backend_state`` and the discovered ids, for
        ``snap``'s servers and the removed ones still open."""
        up = self.registry.backend_up
        states = self.registry.backend_state
        for g in snap.groups.values():
            for s in g.servers:
                ok = s.health.available if g.checks else True
                up[s.id] = (s.group, s.label, 1 if ok else 0)
                states[s.id] = (
                    s.group,
                    s.label,
                    "up" if not g.checks and not s.draining else s.state_name,
                )
        for sid in list(up):
            if sid not in self.state.servers:
                del up[sid]
        for sid in list(states):
            if sid not in self.state.servers:
                gone = self.state.retired.get(sid)
                if gone is None:
                    del states[sid]
                else:  # removed, its tunnels still open
                    states[sid] = (gone.group, gone.label, "draining")
        self.registry.discovered = {
            s.id for g in snap.groups.values() for s in g.servers if s.discovered
        }

    # ------------------------------------------------------------------ slow start
    def slow_start(self, server: ServerState, why: str) -> None:
        """Begin ``server``'s ramp if its group has a ``slow_start`` window."""
        group = self.holder.current.groups.get(server.group)
        if group is not None and server.id in group.by_id:
            self.ramps.begin(server, group.config.slow_start, why)

    def joined(self, servers: tuple[ServerState, ...]) -> None:
        """``servers`` joined their groups in a running process (reload, DNS discovery)."""
        for s in servers:
            self.slow_start(s, "joined")
        self.ramps.publish_all()

    # ------------------------------------------------------------------ overrides and drains
    def begin_drains(self, servers: list[ServerState], old: Snapshot) -> None:
        """``servers`` just began draining: idle pooled connections go now (busy ones after
        their response), and with a drain_timeout their tunnels are closed over it. The
        group's settings in force decide (the old snapshot's, if the group itself left)."""
        current = self.holder.current
        for s in servers:
            s.pool.close()
            if self.checks:  # the process that decides (the supervisor, under --workers)
                self.events.record("drain", f"{s.id} begins draining", s.group, s.id)
            group = current.groups.get(s.group) or old.groups.get(s.group)
            if group is not None:
                cfg = group.config
                self.drainer.start(s, cfg.drain_timeout, cfg.drain_close_code)
        self.drainer.prune()

    def set_server_state(
        self,
        sid: str,
        admin_state: str | None = None,
        weight: int | None = None,
        by: str | None = None,
        at: float | None = None,
    ) -> ServerState:
        """The runtime API: override a server's admin state and/or weight (kept across
        reloads while the server stays in the config). Raises KeyError for an unknown id.
        ``by``/``at``: who set it and when, when not this instance now (the fleet's)."""
        was_draining = self.state.servers[sid].draining
        server, began = self.state.set_override(sid, admin_state, weight)
        if was_draining and not server.draining and not server.removed:
            self.slow_start(server, "ready again")
        self.ramps.publish_all()
        who, when = by or self.me, time.time() if at is None else at
        self.set_by[sid] = (who, when)
        log.info(
            "server %s: admin_state %s, weight %d%s",
            sid,
            server.admin_state,
            server.weight,
            " (draining)" if server.draining else "",
        )
        self.events.record(
            "api",
            f"PUT {sid}: admin_state {server.admin_state}, weight {server.weight}",
            server.group,
            sid,
        )
        snap = self.holder.current
        self.begin_drains([server] if began else [], snap)
        self.sync(snap)
        if self.on_override is not None:
            self.on_override(sid, admin_state, weight)
        o = server.override
        if self.on_local_change is not None and o is not None:
            self.on_local_change(sid, Entry(o.admin_state, o.weight, who, when))
        return server

    def shed(
        self, server: ServerState, fraction: float | None, count: int | None, over: float
    ) -> int:
        """Close ``count`` (or ``fraction``, rounded up) of ``server``'s open WebSockets over
        ``over`` seconds; the number scheduled (0 when there are none, or no group)."""
        group = self.holder.current.groups.get(server.group)
        if group is None:
            return 0
        if count is None:
            count = math.ceil((fraction or 0.0) * websockets(server))
        return self.mover.shed(group, server, count, over)

    def removed_servers(self) -> list[ServerState]:
        """Servers a reload removed whose last connections are still open (draining)."""
        return list(self.state.retired.values())

    def overrides(self) -> dict[str, dict[str, object]]:
        """The runtime overrides in force, for workers and /status (id -> what was set)."""
        return {
            sid: {"admin_state": o.admin_state, "weight": o.weight}
            for sid, o in self.state.overrides.items()
        }

    def who(self, sid: str) -> tuple[str, float] | None:
        """Who set ``sid``'s override in force and when, if one is."""
        return self.set_by.get(sid) if sid in self.state.overrides else None

    def retire(self, changes: Changes) -> None:
        """Removed servers: idle pooled connections go now; series go with the last connection."""
        for s in changes.removed_servers:
            s.pool.close()
        self.forget_idle_removed()

    def forget_idle_removed(self) -> None:
        retired = self.state.retired
        for sid, s in list(retired.items()):
            if s.active <= 0 and s.stats.idle:
                del retired[sid]
                # Requests in flight at the reload pooled their connections on finishing.
                s.pool.close()
                if sid not in self.state.servers:
                    self.registry.forget_server(sid)

    def close(self) -> None:
        self.drainer.close()
        self.ramps.close()
        self.mover.close()
