"""The runtime built from one Config, and the state that outlives it.

Owns:
- ``RuntimeState``: what must survive a reload, keyed by stable ids — per server
  (``group/address``) its health, open-connection count, upstream pool,
  counters and runtime overrides (admin state, weight); per group its scheduler.
- ``Snapshot``: an immutable view of one validated Config (listeners, groups, their servers)
  pointing into that state. Connections take the current snapshot when they start a request
  and keep it, so a reload never changes what an open connection does.
- ``Holder``: whose ``current`` is replaced in a single assignment on reload.

Building a snapshot touches no sockets: it is plain bookkeeping, cheap enough to do for a
thousand servers well inside the reload budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..config.model import Address
from ..wire.http1 import Limits
from . import balancer, metrics
from .health import ServerHealth, State
from .pool import Pool
from .rules import Router
from .slow_start import SCALE
from .sticky import CookieMap, SidTable, server_token

if TYPE_CHECKING:
    # Annotations only (no class here is a dataclass holding them, whose compiled form would
    # look the names up at import): the declarations are not loaded for the data path's sake.
    from ..config.groups import Server, ServerGroup, StickySession
    from ..config.listeners import Listener
    from ..config.top import Config

ADMIN_STATES = ("ready", "drain")


@dataclass(frozen=True, slots=True)
class Override:
    """What the runtime API changed on one server; None: the config's value holds."""

    admin_state: str | None = None
    weight: int | None = None


def server_id(group: str, server: Server) -> str:
    return f"{group}/{server.address}"


class ServerState:
    """One backend server as seen across reloads: the scheduler's Candidate."""

    __slots__ = (
        "active",
        "address",
        "admin_state",
        "config_weight",
        "connect_to",
        "discovered",
        "draining",
        "effective",
        "fleet_active",
        "group",
        "health",
        "id",
        "label",
        "override",
        "pool",
        "ramp_since",
        "ramp_window",
        "relieved_until",
        "removed",
        "stats",
        "token",
        "token_secret",
        "weight",
    )

    def __init__(
        self, sid: str, group: str, server: Server, registry: metrics.Registry, secret: str = ""
    ) -> None:
        self.id = sid
        self.group = group
        self.address = server.address
        # Where connects go: the address itself, or (a host name) the addresses it resolved
        # to when the config was loaded (``app.Proxy``): no name lookup per connect.
        self.connect_to: tuple[Address, ...] = (server.address,)
        self.label = str(server.address)
        self.config_weight = server.weight  # the file's weight
        self.weight = server.weight  # the one in force (a runtime override wins)
        self.admin_state = "ready"  # "drain" when the runtime API says so
        self.override: Override | None = None  # what the runtime API set, if anything
        self.removed = False  # a reload took it out of its group; open tunnels remain
        # Takes no new requests or tunnels: removed, weight 0 or admin_state drain. Kept as a
        # field (updated by ``refresh``) because the scheduler reads it per request.
        self.draining = server.weight == 0
        # Slow start (``core.slow_start``): the scaled weight the schedulers compare, and the
        # ramp in force (when it began, monotonic clock; None: none) and its window. Kept up
        # to date by ``control.ramp``; a reload that keeps the server keeps its ramp.
        self.effective = server.weight * SCALE
        self.ramp_since: float | None = None
        self.ramp_window = 0.0
        # A rebalance or shed is moving tunnels off it until then (monotonic clock): an
        # upgrade pinned here by an insert cookie is placed anew (``sticky``).
        self.relieved_until = 0.0
        self.active = 0  # open requests and tunnels to this server
        # The same through the other instances of the fleet (``cluster``: what they published,
        # set by control.cluster about twice a second); wlc adds it to ``active``.
        self.fleet_active = 0
        self.health = ServerHealth()
        self.pool = Pool()
        self.stats = registry.server(sid, group, self.label)
        self.discovered = server.discovered  # from DNS: the same address is the same server
        # The insert cookie's value: the server, not its address (re-keyed by ``commit`` when
        # the group's sticky_session.secret changes).
        self.token = server_token(sid, secret)
        self.token_secret = secret  # what ``token`` is keyed with

    def refresh(self, override: Override | None) -> bool:
        """Apply the config weight and ``override``; True if the server just began draining."""
        was = self.draining
        self.override = override
        self.admin_state = (override.admin_state if override else None) or "ready"
        w = override.weight if override is not None else None
        self.weight = self.config_weight if w is None else w
        self.draining = self.removed or self.weight == 0 or self.admin_state == "drain"
        if self.ramp_since is None:
            self.effective = self.weight * SCALE
        else:  # ramping: ``control.ramp`` recomputes it; a lower weight caps it at once
            self.effective = min(self.effective, self.weight * SCALE)
        return self.draining and not was

    @property
    def state_name(self) -> str:
        """One of metrics.BACKEND_STATES: draining over health."""
        return "draining" if self.draining else self.health.state.value

    def __repr__(self) -> str:
        return f"<Server {self.id} {self.health.state.value} active={self.active}>"


class Pins:
    """A group's learned session pins (Socket.IO sids, backend cookies); outlive snapshots."""

    __slots__ = ("cookies", "sids")

    def __init__(self) -> None:
        self.sids = SidTable()
        self.cookies = CookieMap()


class GroupRuntime:
    __slots__ = (
        "by_id",
        "by_token",
        "checks",
        "config",
        "hash_xff",
        "name",
        "pins",
        "scheduler",
        "servers",
        "sticky",
    )

    def __init__(
        self,
        config: ServerGroup,
        servers: tuple[ServerState, ...],
        scheduler: balancer.Scheduler,
        pins: Pins,
    ) -> None:
        self.config = config
        self.name = config.name
        self.servers = servers
        self.scheduler = scheduler
        self.checks = config.health_check.enabled
        self.sticky: StickySession | None = config.sticky
        self.pins = pins
        self.hash_xff = config.hash_key == "x_forwarded_for"
        self.by_id = {s.id: s for s in servers}
        secret = _secret(config)
        # Computed here, not read from the servers: their ``token`` follows a new secret only
        # when this snapshot is committed.
        self.by_token = {
            (s.token if s.token_secret == secret else server_token(s.id, secret)): s
            for s in servers
        }

    def pinnable(self, server: ServerState | None) -> bool:
        """Whether a session pinned to ``server`` may go on there: a draining server (weight
        0, admin drain) keeps its sessions (as HAProxy's drain does) unless the group has a
        drain_timeout, whose point is to move every session off; a down server loses its
        sessions."""
        if server is None:
            return False
        if server.draining and self.config.drain_timeout > 0:
            return False
        return server.health.state is State.UP or not self.checks

    def available(self) -> list[ServerState]:
        if not self.checks:
            return [s for s in self.servers if not s.draining]
        return [s for s in self.servers if s.health.state is State.UP and not s.draining]

    def pick(self, key: str | None, exclude: Sequence[ServerState] = ()) -> ServerState | None:
        """A server for a new request or tunnel, never one in ``exclude`` (already tried)."""
        candidates = self.available()
        if exclude:
            candidates = [s for s in candidates if s not in exclude]
        if not candidates:
            return None
        return self.scheduler.pick(candidates, key)


def _secret(group: ServerGroup) -> str:
    return group.sticky.secret if group.sticky is not None else ""


class ListenerRuntime:
    __slots__ = (
        "client_header_timeout",
        "config",
        "group",
        "groups",
        "limits",
        "name",
        "request_timeout",
        "router",
        "stats",
    )

    def __init__(
        self,
        config: Listener,
        groups: dict[str, GroupRuntime],
        stats: metrics.ListenerStats,
    ) -> None:
        self.config = config
        self.name = config.name
        self.group = groups[config.server_group]  # the default group
        self.groups = groups
        # Listeners without rules skip routing altogether (the common, fast case).
        self.router = Router.for_listener(config) if config.rules else None
        self.stats = stats
        self.limits = Limits(
            config.max_request_line, config.max_header_size, config.max_header_count
        )
        # The two timeouts every request reads, as native floats (the config is a pydantic
        # model: two attribute lookups by name each time).
        self.client_header_timeout = config.timeouts.client_header
        self.request_timeout = config.timeouts.request

    def route(self, host: bytes | None, target: bytes) -> GroupRuntime:
        router = self.router
        if router is None:
            return self.group
        return self.groups[router.route(host, target)]


class Snapshot:
    """One config's runtime: its listeners and groups by name. Never changed once built (a
    reload builds another); a plain class, not a dataclass, so that ``Config`` is an annotation
    only (see the imports)."""

    __slots__ = ("config", "groups", "listeners")

    def __init__(
        self,
        config: Config,
        listeners: dict[str, ListenerRuntime],
        groups: dict[str, GroupRuntime],
    ) -> None:
        self.config = config
        self.listeners = listeners
        self.groups = groups


@dataclass(frozen=True, slots=True)
class Changes:
    """What a new snapshot changes, for the log, the reload answer and the I/O owners."""

    added_servers: tuple[ServerState, ...]
    removed_servers: tuple[ServerState, ...]
    added_listeners: tuple[str, ...]
    removed_listeners: tuple[str, ...]
    changed_listeners: tuple[str, ...]
    changed_groups: tuple[str, ...]

    def summary(self) -> str:
        parts = []
        for label, items in (
            ("listeners added", self.added_listeners),
            ("listeners removed", self.removed_listeners),
            ("listeners changed", self.changed_listeners),
            ("groups changed", self.changed_groups),
            ("servers added", tuple(s.id for s in self.added_servers)),
            ("servers removed", tuple(s.id for s in self.removed_servers)),
        ):
            if items:
                parts.append(f"{label}: {', '.join(items)}")
        return "; ".join(parts) or "no listener or server changes"


class RuntimeState:
    """Everything keyed by stable id that a reload must carry over."""

    def __init__(self, registry: metrics.Registry) -> None:
        self.registry = registry
        self.servers: dict[str, ServerState] = {}
        self.schedulers: dict[str, balancer.Scheduler] = {}
        self.pins: dict[str, Pins] = {}
        self.overrides: dict[str, Override] = {}  # server id -> what the runtime API set
        # Servers a reload removed while connections to them were open: they drain, and a
        # reload that brings one back revives the same state (its tunnels, counters, pool).
        self.retired: dict[str, ServerState] = {}

    def build(self, config: Config) -> tuple[Snapshot, Changes]:
        """A snapshot of ``config`` reusing the state of servers that persist.

        Does not modify ``self``'s view of which servers exist until ``commit`` — a reload
        that fails later (say, a bind that cannot be opened) leaves everything as it was.
        """
        servers: dict[str, ServerState] = {}
        added: list[ServerState] = []
        groups: dict[str, GroupRuntime] = {}
        schedulers: dict[str, balancer.Scheduler] = {}
        for g in config.server_groups:
            members = []
            for srv in g.servers:
                sid = server_id(g.name, srv)
                st = self.servers.get(sid)
                if st is None:
                    st = self.retired.get(sid) or ServerState(
                        sid, g.name, srv, self.registry, _secret(g)
                    )
                    added.append(st)
                servers[sid] = st
                members.append(st)
            sched = balancer.make_scheduler(g.scheduler, self.schedulers.get(g.name))
            schedulers[g.name] = sched
            group_pins = self.pins.get(g.name) or Pins()
            groups[g.name] = GroupRuntime(g, tuple(members), sched, group_pins)
        listeners = {
            lst.name: ListenerRuntime(lst, groups, self.registry.listener(lst.name))
            for lst in config.listeners
        }
        snap = Snapshot(config, listeners, groups)
        self._pending = (servers, schedulers, config, {n: g.pins for n, g in groups.items()})
        return snap, self._changes(snap, added, servers)

    def _changes(
        self, snap: Snapshot, added: list[ServerState], servers: dict[str, ServerState]
    ) -> Changes:
        old = getattr(self, "_config", None)
        old_listeners = {lst.name: lst for lst in old.listeners} if old else {}
        old_groups = {g.name: g for g in old.server_groups} if old else {}
        new_listeners = {lst.name: lst for lst in snap.config.listeners}
        return Changes(
            added_servers=tuple(added),
            removed_servers=tuple(s for sid, s in self.servers.items() if sid not in servers),
            added_listeners=tuple(n for n in new_listeners if n not in old_listeners),
            removed_listeners=tuple(n for n in old_listeners if n not in new_listeners),
            changed_listeners=tuple(
                n
                for n, lst in new_listeners.items()
                if n in old_listeners and old_listeners[n] != lst
            ),
            changed_groups=tuple(
                g.name
                for g in snap.config.server_groups
                if g.name in old_groups and old_groups[g.name] != g
            ),
        )

    def commit(self, snap: Snapshot) -> list[ServerState]:
        """Make ``snap``'s servers the known ones (weights follow the new config, overrides
        of servers that stay are kept, those of servers that left are dropped). Returns the
        servers that begin draining with it: removed ones and those whose weight became 0."""
        servers, schedulers, config, pins = self._pending
        assert config is snap.config
        self.overrides = {sid: o for sid, o in self.overrides.items() if sid in servers}
        started: list[ServerState] = []
        for g in config.server_groups:
            secret = _secret(g)
            for srv in g.servers:
                st = servers[server_id(g.name, srv)]
                st.config_weight = srv.weight
                st.removed = False
                st.discovered = srv.discovered
                if st.token_secret != secret:
                    st.token = server_token(st.id, secret)
                    st.token_secret = secret
                if st.refresh(self.overrides.get(st.id)) and st.id in self.servers:
                    started.append(st)
        for sid, st in self.servers.items():
            if sid not in servers:
                st.removed = True
                self.retired[sid] = st
                if st.refresh(None):
                    started.append(st)
        for sid in servers:
            self.retired.pop(sid, None)
        self.servers = servers
        self.schedulers = schedulers
        self.pins = pins
        self._config = config
        return started

    def set_override(
        self, sid: str, admin_state: str | None = None, weight: int | None = None
    ) -> tuple[ServerState, bool]:
        """Change a server's runtime state (a None argument leaves that part as it is).
        Returns the server and whether it just began draining. Raises KeyError."""
        st = self.servers[sid]
        old = self.overrides.get(sid, Override())
        new = Override(
            admin_state if admin_state is not None else old.admin_state,
            weight if weight is not None else old.weight,
        )
        self.overrides[sid] = new
        return st, st.refresh(new)


class Holder:
    """The current snapshot. Replaced whole, in one assignment, by the reloader."""

    __slots__ = ("current",)

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot
