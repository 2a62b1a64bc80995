"""The runtime built from one Config, and the state that outlives it.

Owns:
- ``State``: what must survive a reload, keyed by stable ids — per server (``group/address``)
  its health, open-connection count, upstream pool and counters; per group its scheduler.
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

from . import balancer, metrics
from .config import Address, Config, Listener, Server, ServerGroup, StickySession
from .health import ServerHealth, State
from .http1 import Limits
from .rules import Router
from .sticky import CookieMap, SidTable, server_token
from .upstream import Pool


def server_id(group: str, server: Server) -> str:
    return f"{group}/{server.address}"


class ServerState:
    """One backend server as seen across reloads: the scheduler's Candidate."""

    __slots__ = (
        "active",
        "address",
        "connect_to",
        "discovered",
        "group",
        "health",
        "id",
        "label",
        "pool",
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
        self.weight = server.weight
        self.active = 0  # open requests and tunnels to this server
        self.health = ServerHealth()
        self.pool = Pool()
        self.stats = registry.server(sid, group, self.label)
        self.discovered = server.discovered  # from DNS: the same address is the same server
        # The insert cookie's value: the server, not its address (re-keyed by ``commit`` when
        # the group's sticky_session.secret changes).
        self.token = server_token(sid, secret)
        self.token_secret = secret  # what ``token`` is keyed with

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
        """Whether a session pinned to ``server`` may go on there: weight 0 drains only new
        sessions (as HAProxy does); a down server loses its sessions."""
        if server is None:
            return False
        return server.health.state is State.UP or not self.checks

    def available(self) -> list[ServerState]:
        if not self.checks:
            return [s for s in self.servers if s.weight > 0]
        return [s for s in self.servers if s.health.state is State.UP and s.weight > 0]

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
    __slots__ = ("config", "group", "groups", "limits", "name", "router", "stats")

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

    def route(self, host: bytes | None, target: bytes) -> GroupRuntime:
        router = self.router
        if router is None:
            return self.group
        return self.groups[router.route(host, target)]


@dataclass(frozen=True, slots=True)
class Snapshot:
    config: Config
    listeners: dict[str, ListenerRuntime]
    groups: dict[str, GroupRuntime]


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
                    st = ServerState(sid, g.name, srv, self.registry, _secret(g))
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

    def commit(self, snap: Snapshot) -> None:
        """Make ``snap``'s servers the known ones (weights follow the new config)."""
        servers, schedulers, config, pins = self._pending
        assert config is snap.config
        for g in config.server_groups:
            secret = _secret(g)
            for srv in g.servers:
                st = servers[server_id(g.name, srv)]
                st.weight = srv.weight
                st.discovered = srv.discovered
                if st.token_secret != secret:
                    st.token = server_token(st.id, secret)
                    st.token_secret = secret
        self.servers = servers
        self.schedulers = schedulers
        self.pins = pins
        self._config = config


class Holder:
    """The current snapshot. Replaced whole, in one assignment, by the reloader."""

    __slots__ = ("current",)

    def __init__(self, snapshot: Snapshot) -> None:
        self.current = snapshot
