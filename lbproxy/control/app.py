"""The running proxy: wires the pure core to the I/O owners and runs their one lifecycle.

Owns ``Proxy``: start (build the first snapshot, bind, warm servers, accept, start checks and
admin), ``reload`` (load -> validate -> build -> warm new servers -> bind -> swap, all or
nothing) and ``close``, the single ordered shutdown path: stop accepting,
let HTTP requests in flight finish, give WebSocket tunnels up to ``shutdown_timeout``, send
the ones left a close frame (1001) both ways and give their close handshake a moment, cut
what remains, then stop the background owners.

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
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..config.model import WS_CLOSE_HANDSHAKE_TIMEOUT, ConfigError
from ..core import metrics
from ..core.dns import with_discovered
from ..core.health import Event, Transition
from ..core.history import EventLog
from ..core.snapshot import Changes, Holder, RuntimeState, ServerState, Snapshot
from ..proxy.access_log import AccessLog
from ..proxy.client_socket import ClientSocket
from ..proxy.context import Context
from ..proxy.listener import BindError, Listeners, Opening, probe_binds
from ..proxy.tunnel import IdleSweeper, Tunnel
from ..wire.wsframes import GOING_AWAY
from .checker import Checker
from .discovery import Discovery, resolve_names
from .loading import insecure_warning, loads_config, read_config_file
from .server_control import ServerControl

if TYPE_CHECKING:
    # Annotations only (no dataclass here holds them, whose compiled form would look the
    # names up at import).
    from ..config.groups import Discovery as DiscoverySpec
    from ..config.groups import Server
    from ..config.top import Admin, Cluster, Config
    from ..core.fleet import Instance
    from .cluster import FleetLink

log = logging.getLogger("lbproxy")


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
        config_path: str | None = None,
        role: Role = Role(),
        discovered: dict[str, tuple[DiscoverySpec, tuple[Server, ...]]] | None = None,
    ) -> None:
        self.role = role
        self.config_path = config_path
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
        self.listeners = Listeners(self.ctx, reuse_port=role.reuse_port)
        self.checker = Checker(self.servers.transition, self.registry)
        self.reload_lock = asyncio.Lock()
        self.last_reload: tuple[float, bool, str] = (time.time(), True, "started")
        self._sweeper: asyncio.Task[None] | None = None
        self.idle_tunnels = IdleSweeper(self.registry.listeners)  # one timer, every tunnel
        self._closing = False
        self.admin: AdminListener | None = None  # set by whoever starts one; moved on reload
        self.fleet: FleetLink | None = None  # with ``cluster``: the link to the fleet's Redis
        self.started = time.time()
        self._rate: tuple[float, int] = (time.monotonic(), 0)  # for the published requests/s

    @property
    def snapshot(self) -> Snapshot:
        return self.holder.current

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
        await self._configure_fleet(snap.config.cluster)
        if self.role.serve:
            self.listeners.accept()
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
            self.idle_tunnels.start()
            self.servers.mover.start()

    async def reload(self, trigger: str) -> ReloadResult:
        """Load the config file again and swap it in, or change nothing and say why."""
        async with self.reload_lock:
            path = self.config_path
            assert path is not None
            try:
                raw = read_config_file(path)
                config = loads_config(raw, path)
            except ConfigError as exc:
                return self._reload_failed(trigger, exc.problems)
            warning = insecure_warning(config.admin)
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
            await self._configure_fleet(config.cluster)
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

    # ------------------------------------------------------------------ the fleet
    async def _configure_fleet(self, cfg: Cluster | None) -> None:
        """Join (or leave, or move to) the fleet ``cfg`` names."""
        if self.fleet is not None:
            old, self.fleet = self.fleet, None
            await old.close()
        if cfg is not None and not self._closing:
            from .cluster import FleetLink  # redis is imported only with a cluster

            # With workers each one is a member of the fleet (``<name>.<pid>``), publishing
            # its counts and reconciling its limits; the supervisor applies and writes the
            # overrides and shows the fleet.
            worker = not self.role.check
            self.fleet = FleetLink(
                cfg,
                self.servers,
                self.describe,
                self.ctx.edges,
                self.holder,
                publish=self.role.serve,
                writes=self.role.check,
                suffix=f".{os.getpid()}" if worker else "",
            )
            await self.fleet.start()

    def describe(self, name: str, now: float) -> Instance:
        """This instance's record for the fleet."""
        from .. import __version__, buildinfo
        from ..core.fleet import Instance

        reg = self.registry
        requests = sum(sum(ls.requests.values()) for ls in reg.listeners.values())
        then, before = self._rate
        mono = time.monotonic()
        rps = (requests - before) / (mono - then) if mono > then else 0.0
        self._rate = (mono, requests)
        snap = self.holder.current
        return Instance(
            name=name,
            address=",".join(
                str(self.listeners.address(n)) if n in self.listeners.bound else str(lst.bind)
                for n, lst in ((lst.name, lst) for lst in snap.config.listeners)
            ),
            version=__version__,
            build=buildinfo.kind(),
            started=self.started,
            config=snap.config.digest,
            connections=sum(ls.connections_active for ls in reg.listeners.values()),
            tunnels=sum(sum(ss.ws_active.values()) for ss in reg.servers.values()),
            rps=max(0.0, rps),
            at=now,
            servers={sid: s.active for sid, s in self.state.servers.items() if s.active},
            websockets={
                sid: n
                for sid, s in self.state.servers.items()
                if (n := sum(s.stats.ws_active.values()))
            },
        )

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

    async def _sweep(self) -> None:
        """Close expired idle upstream connections; forget drained removed servers."""
        while True:
            snap = self.holder.current
            period = min((g.keepalive_timeout for g in snap.config.server_groups), default=1.0)
            await asyncio.sleep(max(period / 2, 0.05))
            now = asyncio.get_running_loop().time()
            for g in self.holder.current.groups.values():
                for s in g.servers:
                    s.pool.expire(now, g.config.keepalive_timeout)
                if g.sticky is not None:
                    # Lookups already ignore expired pins; this returns their memory.
                    g.pins.sids.expire(now)
                    g.pins.cookies.expire(now)
            self.servers.forget_idle_removed()

    # ------------------------------------------------------------------ shutdown
    def connections(self) -> list[ClientSocket | Tunnel]:
        out: list[ClientSocket | Tunnel] = []
        for ls in self.registry.listeners.values():
            out.extend(ls.live)  # type: ignore[arg-type]
        return out

    async def close(self, timeout: float | None = None) -> None:
        """The one ordered shutdown path (idempotent); ``timeout`` overrides shutdown_timeout."""
        if self._closing:
            return
        self._closing = True
        if timeout is None:
            timeout = self.holder.current.config.shutdown_timeout
        self.listeners.stop_accepting()
        await self.discovery.close()  # no server set changes while connections finish
        self.ctx.draining = True
        for c in self.connections():
            if isinstance(c, ClientSocket):
                c.shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # Poll rather than wire a completion event through every connection: shutdown is
        # rare, and a 50 ms granularity is far below any timeout a user sets.
        while self.connections() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.servers.close()
        left = self.connections()
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
        await self.stop_background()

    async def stop_background(self) -> None:
        if self.fleet is not None:
            fleet, self.fleet = self.fleet, None
            await fleet.close()
        self.idle_tunnels.close()
        self.servers.close()
        self.ctx.edges.close()  # the bandwidth shapers' timers
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        await self.checker.close()
        await self.discovery.close()
        for s in self.state.servers.values():
            s.pool.close()
        self.access.close()
