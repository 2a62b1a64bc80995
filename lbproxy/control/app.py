"""The running proxy: wires the pure core to the I/O owners and runs their one lifecycle.

Owns ``Proxy``: start (build the first snapshot, bind, warm servers, accept, start checks and
admin), ``reload`` (load -> validate -> build -> warm new servers -> bind -> swap, all or
nothing) and ``close``, the single ordered shutdown path: stop accepting,
let HTTP requests in flight finish, give WebSocket tunnels up to ``shutdown_timeout``, send
the ones left a close frame (1001) both ways and give their close handshake a moment, cut
what remains (``shutdown.end_connections``), then stop the background owners (among them
``fleet_member.FleetMember``, this process in the fleet, and ``sweep.Sweeper``).

A set of servers found by DNS discovery (``discovery.py``) takes the reload path: the
snapshot is rebuilt from the file's config plus every discovered set (``dnsstate``) and
swapped, so servers that stay keep their state and new or removed ones are handled exactly
as a reload handles them; it is logged but not counted as a config reload. What is done to
servers between reloads (health as seen here, runtime overrides, drains, removed servers
still open) is ``servers.ServerControl``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..config.model import ConfigError
from ..core import metrics
from ..core.dns import with_discovered
from ..core.health import Event, Transition
from ..core.history import EventLog
from ..core.snapshot import Changes, Holder, RuntimeState, ServerState, Snapshot
from ..proxy.acceptor import Fronts
from ..proxy.access_log import AccessLog
from ..proxy.client import ClientConnection
from ..proxy.client_socket import ClientSocket
from ..proxy.context import Context
from ..proxy.http2 import Http2Connection
from ..proxy.listener import BindError, Listeners, Opening, probe_binds
from ..proxy.tunnel import IdleSweeper, Tunnel
from .checker import Checker
from .discovery import Discovery, resolve_names
from .fleet_member import FleetMember
from .server_control import ServerControl
from .shutdown import connections, end_connections
from .sweep import Sweeper

if TYPE_CHECKING:
    # Annotations only (no dataclass here holds them, whose compiled form would look the
    # names up at import).
    from ..config.servers import Discovery as DiscoverySpec
    from ..config.servers import Server
    from ..config.top import Admin, Config
    from .cluster import FleetLink

log = logging.getLogger("lbproxy")


class ConfigSource(Protocol):
    """Where a reload reads the config (``loading.ConfigFile``; given by whoever starts the
    proxy, so that this module imports neither the loader nor the schema at run time)."""

    path: str

    def read(self) -> tuple[bytes, Config]: ...


class PendingBind(Protocol):
    """A second admin socket opened by a reload, until the reload commits or cancels."""

    async def commit(self) -> None: ...
    async def cancel(self) -> None: ...


class AdminListener(Protocol):
    """The admin server (admin.AdminServer, which sits above this module), as a reload that
    moves ``admin.bind`` sees it."""

    async def prepare(self, admin: Admin) -> PendingBind: ...


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    changed: bool
    message: str  # the summary of what changed, or every problem found
    problems: tuple[str, ...] = ()


class PassiveHealth:
    """Passive failures feed the same state machine as active checks, and are logged once.

    In a worker process ``report`` also tells the supervisor, which owns the health state
    every worker sees; the local mark keeps this worker off the server until it hears back.
    """

    def __init__(
        self,
        on_transition: Callable[[ServerState, Transition], None],
        report: Callable[[ServerState, str], None] | None = None,
    ) -> None:
        self._on_transition = on_transition
        self.report = report

    def passive_failure(self, server: ServerState, reason: str) -> None:
        if self.report is not None:
            self.report(server, reason)
        t = server.health.observe(
            Event.PASSIVE_FAIL,
            reason,
            time.monotonic(),
            healthy_threshold=1,
            unhealthy_threshold=1,
        )
        if t is not None:
            self._on_transition(server, t)


def certificates(config: Config) -> dict[tuple[str, str], float]:
    """Every certificate of ``config`` and its expiry: (listener, file) -> notAfter."""
    out: dict[tuple[str, str], float] = {}
    named = [(lst.name, lst.tls) for lst in config.listeners]
    for name, t in [*named, ("admin.tls", config.admin.tls)]:
        if t is not None:
            for c, when in zip(t.certificates, t.not_after, strict=False):
                out[(name, c.cert)] = when
    return out


@dataclass(frozen=True, slots=True)
class Role:
    """What this process does: alone it does everything; with workers the supervisor
    checks health and serves admin (``serve=False``) and each worker serves traffic
    (``check=False``, listeners shared with SO_REUSEPORT)."""

    serve: bool = True
    check: bool = True
    reuse_port: bool = False


class Proxy:
    def __init__(
        self,
        config: Config,
        source: ConfigSource | None = None,
        role: Role = Role(),
        discovered: dict[str, tuple[DiscoverySpec, tuple[Server, ...]]] | None = None,
    ) -> None:
        self.role = role
        self.source = source  # None: nothing to reload from (a worker, a test)
        self.config_path = source.path if source is not None else None
        self.config_raw: bytes | None = None  # the bytes of the config in force, when known
        self.on_applied: Callable[[bytes], None] | None = None
        self.on_discovered: Callable[[], None] | None = None  # the supervisor's hand-over
        self.registry = metrics.Registry()
        # What happened, with its time, for /status/history (health, reloads, drains, the
        # runtime API, DNS; the supervisor adds worker restarts): one recorder per process.
        self.events = EventLog(time.time)
        self.state = RuntimeState(self.registry)
        # The config as the file says it; snapshots are built from it plus ``discovered``.
        self.file_config = config
        self.discovered = dict(discovered or {})
        self.discovery = Discovery(self._found, self.registry)
        self._counting = True  # False while applying a discovered set: it is not a reload
        config = with_discovered(config, self.discovered)
        snap, _ = self.state.build(config)
        self.state.commit(snap)
        self.holder = Holder(snap)
        self.registry.certificates = certificates(config)
        self.servers = ServerControl(
            self.state, self.registry, self.holder, role.check, self.events
        )
        self.access = AccessLog(config.access_log)
        self.ctx = Context(self.registry, self.access, PassiveHealth(self.servers.transition))
        fronts = Fronts(http1=ClientConnection, http2=Http2Connection)
        self.listeners = Listeners(self.ctx, fronts, reuse_port=role.reuse_port)
        self.checker = Checker(self.servers.transition, self.registry)
        self.reload_lock = asyncio.Lock()
        self.last_reload: tuple[float, bool, str] = (time.time(), True, "started")
        self.sweeper = Sweeper(self.holder, self.servers)  # idle upstream connections, pins
        self.idle_tunnels = IdleSweeper(self.registry.listeners)  # one timer, every tunnel
        self._closing = False
        self.admin: AdminListener | None = None  # set by whoever starts one; moved on reload
        # With ``cluster``: this process in the fleet (joins, leaves, its published record).
        self.member = FleetMember(
            registry=self.registry,
            state=self.state,
            holder=self.holder,
            servers=self.servers,
            ctx=self.ctx,
            listeners=self.listeners,
            publish=role.serve,
            writes=role.check,
        )

    @property
    def snapshot(self) -> Snapshot:
        return self.holder.current

    @property
    def fleet(self) -> FleetLink | None:
        """The link to the fleet's Redis, with ``cluster`` (for the admin API)."""
        return self.member.link

    def closing(self) -> bool:
        # A method, not the attribute, after an await: mypy narrows ``self._closing`` to
        # False from an earlier check, and mypyc would compile the test away.
        return self._closing

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind (a bind error fails at once), warm every checked server (each bounded by its
        check timeout; clients meanwhile wait in the listen backlog), then accept: no request
        is answered 503 for want of a first check. A server down at start fails its warm-up
        check and is DOWN; its first good check later brings it UP (health.py)."""
        snap = self.holder.current
        await resolve_names(self.state.servers.values())
        self.access.start()
        try:
            if self.role.serve:
                await self.listeners.apply(snap, hold=True)
            else:
                await probe_binds(snap, None)  # the workers bind; enough to know they can
        except BindError:
            self.access.close()
            raise
        if self.role.check:
            await self.checker.warm(self.servers.to_warm(None, snap))
        self.servers.sync(snap)
        self.servers.ramps.publish_all()
        if self.role.check:
            self.checker.apply(snap)
            self.discovery.apply(snap.config, self.discovered)
        # The fleet's overrides before the first client is accepted (bounded: Redis down is
        # served through on local state).
        await self.member.configure(snap.config.cluster, self.closing)
        if self.role.serve:
            self.listeners.accept()
            self.sweeper.start()
            self.idle_tunnels.start()
            self.servers.mover.start()

    async def reload(self, trigger: str) -> ReloadResult:
        """Load the config file again and swap it in, or change nothing and say why."""
        async with self.reload_lock:
            assert self.source is not None
            try:
                raw, config = self.source.read()
            except ConfigError as exc:
                return self._reload_failed(trigger, exc.problems)
            warning = config.admin.insecure_warning()
            if warning is not None and self.admin is not None:
                log.warning("%s", warning)  # at every reload, as at the start
            result = await self.apply_config(config, trigger)
            if result.ok and result.changed:
                self.config_raw = raw
                if self.on_applied is not None:
                    self.on_applied(raw)  # the supervisor hands the same bytes to every worker
            return result

    async def apply_config(
        self, config: Config, trigger: str, health: dict[str, str] | None = None
    ) -> ReloadResult:
        """Swap ``config`` in, or change nothing and say why. ``health`` (a worker's, from
        the supervisor, which warmed the new servers) is taken before the swap."""
        if self._closing:
            # Applying now would open listeners again (and start checks) mid-shutdown.
            problem = "shutting down: reload ignored"
            log.warning("reload (%s): %s", trigger, problem)
            return ReloadResult(False, False, problem, (problem,))
        file_config, config = config, with_discovered(config, self.discovered)
        old = self.holder.current
        if config == old.config:
            self.file_config = file_config
            log.info("reload (%s): configuration unchanged, nothing to do", trigger)
            self._reload_counted(True, "configuration unchanged")
            return ReloadResult(True, False, "configuration unchanged")
        log_problem = self.access.problem(config.access_log)
        if log_problem is not None:
            return self._reload_failed(trigger, [log_problem])
        snap, changes = self.state.build(config)
        # Each step below is prepared and registered for undoing; the swap commits them all
        # at once (``pop_all``). A failure, a shutdown meanwhile or an exception unwinds the
        # steps prepared so far in reverse order, leaving everything as it was.
        async with contextlib.AsyncExitStack() as undo:
            undo.callback(self._discard, changes)
            await resolve_names(s for g in snap.groups.values() for s in g.servers)
            admin_move: PendingBind | None = None
            new_admin, old_admin = config.admin, old.config.admin
            if self.admin is not None and (
                new_admin.bind != old_admin.bind or new_admin.tls != old_admin.tls
            ):
                try:
                    admin_move = await self.admin.prepare(new_admin)
                except OSError as exc:
                    reason = exc.strerror or str(exc)
                    problem = f"admin.bind: cannot listen on {new_admin.bind}: {reason}"
                    return self._reload_failed(trigger, [problem])
                except ValueError as exc:  # a TLS file changed since it was checked
                    return self._reload_failed(trigger, [f"admin.tls: {exc}"])
                undo.push_async_callback(admin_move.cancel)
            opening: Opening | None = None
            try:
                if self.role.serve:
                    opening = await self.listeners.open(snap)  # held: nothing accepted yet
                    undo.callback(self.listeners.cancel, opening)
                else:
                    await probe_binds(snap, old)  # the workers bind; enough to know they can
            except BindError as exc:
                return self._reload_failed(trigger, [str(exc)])
            if self.role.check:
                # After the binds (a bind error fails fast), before the swap.
                await self.checker.warm(self.servers.to_warm(old, snap))
            if self.closing():  # close() ran during the warm-up
                return ReloadResult(False, False, "shutting down: reload ignored")
            undo.pop_all()  # from here on the new configuration is committed
        if health:
            self.servers.take_health(snap, health)
        if admin_move is not None:
            await admin_move.commit()
            scheme = "https" if config.admin.tls is not None else "http"
            log.info("admin now on %s://%s/", scheme, config.admin.bind)
        if opening is not None:
            self.listeners.commit(opening)
        draining = self.state.commit(snap)
        self.holder.current = snap  # the swap: new connections and requests see it from here
        self.file_config = file_config
        self.access.configure(config.access_log)
        self.registry.certificates = certificates(config)
        self.servers.retire(changes)
        self.servers.begin_drains(draining, old)
        self.servers.joined(changes.added_servers)
        self.servers.sync(snap)
        if self.role.check:
            self.checker.apply(snap)
            self.discovery.apply(config, self.discovered)
        if config.cluster != old.config.cluster:
            await self.member.configure(config.cluster, self.closing)
        summary = changes.summary()
        log.info("reload (%s): applied: %s", trigger, summary)
        self._reload_counted(True, summary)
        if self._counting:
            self.events.record("reload", f"reload ({trigger}) applied: {summary}")
        return ReloadResult(True, True, summary)

    def _discard(self, changes: Changes) -> None:
        """A snapshot never swapped in leaves no metric series of what only it added."""
        for s in changes.added_servers:
            if s.id not in self.state.retired:  # a removed one still open shares its series
                self.registry.forget_server(s.id)
        for name in changes.added_listeners:
            ls = self.registry.listeners.get(name)
            if ls is not None and not ls.live and ls.connections_total == 0:
                del self.registry.listeners[name]

    def _reload_failed(self, trigger: str, problems: list[str]) -> ReloadResult:
        log.error(
            "reload (%s) failed, keeping the running configuration:\n  %s",
            trigger,
            "\n  ".join(problems),
        )
        self._reload_counted(False, "; ".join(problems))
        if self._counting:
            self.events.record("reload", f"reload ({trigger}) FAILED: {'; '.join(problems)}")
        return ReloadResult(False, False, "\n".join(problems), tuple(problems))

    async def _found(self, group: str, spec: DiscoverySpec, servers: tuple[Server, ...]) -> None:
        """Discovery found a new set for ``group``: rebuild and swap as a reload does (servers
        that stay keep their state; new ones are checked before they take traffic; removed
        ones finish what they carry), without counting it as a config reload."""
        async with self.reload_lock:
            self.discovered[group] = (spec, servers)
            found = ", ".join(str(s.address) for s in servers) or "none"
            self.events.record("dns", f"{group}: DNS found {found}", group)
            await self.apply_discovered(f"dns: {group}")
        if self.on_discovered is not None:
            self.on_discovered()

    async def apply_discovered(self, trigger: str) -> ReloadResult:
        """Build from the file's config and ``self.discovered`` as it is now, and swap."""
        self._counting = False
        try:
            return await self.apply_config(self.file_config, trigger)
        finally:
            self._counting = True

    def _reload_counted(self, ok: bool, message: str = "") -> None:
        if not self._counting:
            return
        r = self.registry.reloads
        if ok:
            r.success += 1
        else:
            r.failure += 1
        r.last_success = 1 if ok else 0
        r.last_timestamp = time.time()
        self.last_reload = (r.last_timestamp, ok, message)

    # ------------------------------------------------------------------ shutdown
    def connections(self) -> list[ClientSocket | Tunnel]:
        return connections(self.registry)

    async def close(self, timeout: float | None = None) -> None:
        """The one ordered shutdown path (idempotent); ``timeout`` overrides shutdown_timeout."""
        if self._closing:
            return
        self._closing = True
        if timeout is None:
            timeout = self.holder.current.config.shutdown_timeout
        self.listeners.stop_accepting()
        await self.discovery.close()  # no server set changes while connections finish
        await end_connections(self.registry, self.ctx, timeout, self.servers.close)
        await self.stop_background()

    async def stop_background(self) -> None:
        await self.member.close()
        self.idle_tunnels.close()
        self.servers.close()
        self.ctx.edges.close()  # the bandwidth shapers' timers
        await self.sweeper.close()
        await self.checker.close()
        await self.discovery.close()
        for s in self.state.servers.values():
            s.pool.close()
        self.access.close()
