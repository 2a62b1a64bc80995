"""The admin listener: /metrics, /status, the status page, /healthz, POST /-/reload and the
runtime server API (GET /-/servers, PUT /-/servers/{group}/{host:port},
POST /-/servers/{group}/{host:port}/shed).

Owns the aiohttp application on ``admin.bind`` (never on a proxied listener), plain or with
``admin.tls``. It only reads the proxy's state and asks ``Proxy.reload`` /
``ServerControl.set_server_state``; the numbers come from ``metrics``, rendered for /metrics by
``metric_families``. Every request first passes ``admin_guard`` (Host, Origin, content type,
the bearer token).
"""

from __future__ import annotations

import json
import logging
import ssl
import time
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .. import __version__, buildinfo
from ..config.model import Address
from ..config.top import Admin, parse_server_change, parse_shed
from ..core.metrics import Registry, merge_registries
from ..core.rebalance import Load, within
from ..core.slow_start import SCALE, progress
from ..core.snapshot import ServerState
from ..proxy import tls
from . import admin_guard
from .history import RESOLUTIONS, Sampler
from .metric_families import Collector
from .status_page import render_status_page

if TYPE_CHECKING:
    from .app import Proxy

log = logging.getLogger("lbproxy")


def server_view(
    s: ServerState,
    checked: bool,
    reg: Registry,
    active: dict[str, int] | None,
    who: tuple[str, float] | None = None,
) -> dict[str, Any]:
    """One server's runtime state, as /-/servers and /status show it; ``who``: the instance
    that set its override and when."""
    st = reg.servers.get(s.id, s.stats)
    override: dict[str, Any] | None = None
    o = s.override
    if o is not None:
        override = {
            k: v for k, v in (("admin_state", o.admin_state), ("weight", o.weight)) if v is not None
        }
        if override and who is not None:
            override["set_by"], override["set_at"] = who
    return {
        "id": s.id,
        "group": s.group,
        "address": s.label,
        "discovered": s.discovered,
        "state": s.health.state.value if checked else "up",
        "admin_state": s.admin_state,
        "draining": s.draining,
        "removed": s.removed,
        "weight": s.weight,
        "config_weight": s.config_weight,
        "effective_weight": s.effective / SCALE,
        # Slow start: how far the ramp is (0..1), None when the server is not ramping.
        "slow_start": (
            None
            if s.ramp_since is None
            else round(progress(s.ramp_since, s.ramp_window, time.monotonic()), 3)
        ),
        "override": override or None,
        "active_connections": active.get(s.id, 0) if active is not None else s.active,
        "fleet_connections": s.fleet_active,  # through the other instances (cluster)
        "websockets_active": sum(st.ws_active.values()),
    }


def status(
    proxy: Proxy,
    reg: Registry | None = None,
    active: dict[str, int] | None = None,
    workers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything the status page shows, as JSON-ready data.

    With workers, ``reg`` is the sum of their stats and ``active`` their open connections per
    server id; alone, both come from this process.
    """
    snap = proxy.holder.current
    cfg = snap.config
    if reg is None:
        reg = proxy.registry
    listeners = []
    for lst in cfg.listeners:
        ls = reg.listener(lst.name)
        tunnels = sum(ss.ws_active.get(lst.name, 0) for ss in reg.servers.values())
        bound = proxy.listeners.bound.get(lst.name)
        listeners.append(
            {
                "name": lst.name,
                "bind": str(proxy.listeners.address(lst.name)) if bound else str(lst.bind),
                "protocol": lst.protocol,
                "server_group": lst.server_group,
                "connections_active": ls.connections_active,
                "connections_total": ls.connections_total,
                "websockets_active": tunnels,
                "requests_total": sum(ls.requests.values()),
                "idle_timeout": lst.timeouts.idle,
                "request_timeout": lst.timeouts.request,
                "connect_timeout": lst.timeouts.connect,
            }
        )
    groups = []
    for g in snap.groups.values():
        servers = []
        members = list(g.servers) + [
            s for s in proxy.servers.removed_servers() if s.group == g.name
        ]
        for s in members:
            st = reg.servers.get(s.id, s.stats)
            h = s.health
            requests = sum(
                n
                for ls in reg.listeners.values()
                for (gn, sl, _), n in ls.requests.items()
                if gn == g.name and sl == s.label
            )
            servers.append(
                {
                    **server_view(s, g.checks, reg, active, proxy.servers.who(s.id)),
                    "checked": g.checks,
                    "last_check": h.last_reason or None,
                    "last_check_latency": h.last_latency,
                    "last_check_age": (
                        None if h.last_check_at is None else time.monotonic() - h.last_check_at
                    ),
                    "last_change_reason": getattr(h, "last_change_reason", "") or None,
                    "websockets_total": sum(st.ws_total.values()),
                    "websockets_drained": st.ws_drained,
                    "websockets_rebalanced": st.ws_rebalanced,
                    "requests_total": requests,
                    "upstream_errors": dict(st.errors),
                    "health_checks": dict(st.health_checks),
                }
            )
        # Tunnels being moved: a shed or a rebalance round here, or (the supervisor, whose
        # workers move theirs) a group with rebalance whose spread is out of tolerance.
        cfg_rb = g.config.rebalance
        balanced = None
        if cfg_rb is not None:
            spread = [
                Load(s.id, sum(reg.servers.get(s.id, s.stats).ws_active.values()), s.effective)
                for s in g.available()
            ]
            balanced = within(spread, cfg_rb.tolerance)
        rebalance = {
            "enabled": cfg_rb is not None,
            "tolerance": cfg_rb.tolerance if cfg_rb is not None else None,
            "within_tolerance": balanced,
            "in_progress": proxy.servers.mover.in_progress(g.name) or balanced is False,
        }
        groups.append(
            {
                "name": g.name,
                "scheduler": g.config.scheduler,
                "slow_start": g.config.slow_start,
                "rebalance": rebalance,
                "health_check": g.checks,
                "servers_up": sum(1 for x in servers if x["state"] == "up" and not x["removed"]),
                "servers": servers,
            }
        )
    when, ok, message = proxy.last_reload
    return {
        "version": __version__,
        "build": buildinfo.kind(),
        "pid": _pid(),
        "config": {"path": proxy.config_path, "sha256": cfg.digest or None},
        "last_reload": {"time": when, "success": ok, "message": message},
        "listeners": listeners,
        "server_groups": groups,
        "workers": workers or [],
        "cluster": proxy.fleet.view() if proxy.fleet is not None else None,
        "time": time.time(),
    }


def _pid() -> int:
    import os

    return os.getpid()


class Workers(Protocol):
    """The supervisor's view of its workers, for /metrics and /status."""

    async def gather(self) -> tuple[list[Registry], dict[str, int]]:
        """Every live worker's stats, and open connections per server id summed over them."""
        ...

    def describe(self) -> list[dict[str, Any]]: ...

    async def shed(
        self, sid: str, fraction: float | None, count: int | None, over: float
    ) -> int: ...


class AdminServer:
    def __init__(
        self,
        proxy: Proxy,
        workers: Workers | None = None,
        resolutions: tuple[tuple[float, int], ...] = RESOLUTIONS,
    ) -> None:
        """``resolutions``: the history's (interval seconds, points), finest first."""
        self.proxy = proxy
        self.workers = workers
        # The history samples what /status shows: the supervisor's sum under --workers.
        self.history = Sampler(proxy, self._active, proxy.events, resolutions)
        self.prom = CollectorRegistry(auto_describe=False)
        self.prom.register(Collector(proxy.registry))
        self.app = web.Application(
            middlewares=[admin_guard.middleware(lambda: proxy.holder.current.config.admin)]
        )
        self.app.router.add_get("/", self.page)
        self.app.router.add_get("/status", self.status)
        self.app.router.add_get("/status/history", self.history_json)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_post("/-/reload", self.reload)
        self.app.router.add_get("/-/servers", self.servers)
        self.app.router.add_put("/-/servers/{group}/{server}", self.put_server)
        self.app.router.add_post("/-/servers/{group}/{server}/shed", self.shed)
        self.app.router.add_get("/-/cluster", self.cluster)
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        self.address: Address | None = None
        self.bind: Address | None = None  # admin.bind as configured (port 0 as written)

    async def start(self) -> None:
        admin = self.proxy.holder.current.config.admin
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        self.site = self._site(admin.bind, _context(admin))
        await self.site.start()
        self.bind = admin.bind
        self.address = _bound(self.site)
        self.history.start()

    @property
    def url(self) -> str:
        """The admin's base URL (http or https, the address it listens on)."""
        scheme = "https" if self.proxy.holder.current.config.admin.tls is not None else "http"
        return f"{scheme}://{self.address}"

    def _site(self, bind: Address, context: ssl.SSLContext | None) -> web.TCPSite:
        assert self.runner is not None
        return web.TCPSite(
            self.runner, bind.host, bind.port, reuse_address=True, ssl_context=context
        )

    async def prepare(self, admin: Admin) -> PendingBind | Relisten:
        """Listen as ``admin`` says (a new bind, or new TLS); the reload then commits or
        cancels. Raises OSError when the new bind cannot be listened on, ValueError when the
        TLS files cannot be used. The same bind cannot listen twice: it is listened on again
        at the commit (a moment without the admin)."""
        context = _context(admin)
        if admin.bind == self.bind and admin.bind.port != 0:
            return Relisten(self, admin.bind, context)
        site = self._site(admin.bind, context)
        await site.start()
        return PendingBind(self, site, admin.bind)

    async def close_listener(self) -> None:
        """Stop accepting admin connections (first step of shutdown)."""
        if self.site is not None:
            await self.site.stop()
            self.site = None

    async def close(self) -> None:
        await self.history.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(self, request: web.Request) -> web.Response:
        if self.workers is None:
            body = generate_latest(self.prom)
        else:
            # This process's registry carries health checks, backend_up and reloads; the
            # workers' carry the traffic. The collector sums them.
            regs, _ = await self.workers.gather()
            prom = CollectorRegistry(auto_describe=False)
            prom.register(Collector([self.proxy.registry, *regs]))
            body = generate_latest(prom)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status(self) -> dict[str, Any]:
        if self.workers is None:
            return status(self.proxy)
        regs, active = await self.workers.gather()
        merged = merge_registries([self.proxy.registry, *regs])
        return status(self.proxy, merged, active, self.workers.describe())

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(await self._status())

    async def history_json(self, request: web.Request) -> web.Response:
        return web.json_response(self.history.view())

    async def page(self, request: web.Request) -> web.Response:
        text = render_status_page(await self._status(), self.history.view(finest_only=True))
        return web.Response(text=text, content_type="text/html")

    async def _active(self) -> tuple[Registry, dict[str, int] | None]:
        if self.workers is None:
            return self.proxy.registry, None
        regs, active = await self.workers.gather()
        return merge_registries([self.proxy.registry, *regs]), active

    async def servers(self, request: web.Request) -> web.Response:
        reg, active = await self._active()
        out: list[dict[str, Any]] = []
        for g in self.proxy.holder.current.groups.values():
            out.extend(
                server_view(s, g.checks, reg, active, self.proxy.servers.who(s.id))
                for s in g.servers
            )
        return web.json_response(out)

    async def cluster(self, request: web.Request) -> web.Response:
        """The fleet: every live instance (``cluster``); 404 without one."""
        fleet = self.proxy.fleet
        if fleet is None:
            return _error(404, "no cluster: this instance is not part of a fleet (see cluster:)")
        return web.json_response(fleet.view())

    async def put_server(self, request: web.Request) -> web.Response:
        group, address = request.match_info["group"], request.match_info["server"]
        g = self.proxy.holder.current.groups.get(group)
        if g is None:
            return _error(404, f"no server group {group!r}")
        sid = f"{group}/{address}"
        if sid not in g.by_id:
            return _error(404, f"no server {address!r} in group {group!r}")
        try:
            body = json.loads(await request.read() or b"null")
        except ValueError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        problems, admin_state, weight = _server_change(body)
        if problems:
            return _error(400, *problems)
        server = self.proxy.servers.set_server_state(sid, admin_state, weight)
        reg, active = await self._active()
        who = self.proxy.servers.who(sid)
        return web.json_response(server_view(server, g.checks, reg, active, who))

    async def shed(self, request: web.Request) -> web.Response:
        """Close a share of one server's WebSockets, spread over a window (see README)."""
        group, address = request.match_info["group"], request.match_info["server"]
        g = self.proxy.holder.current.groups.get(group)
        if g is None:
            return _error(404, f"no server group {group!r}")
        sid = f"{group}/{address}"
        server = g.by_id.get(sid)
        if server is None:
            return _error(404, f"no server {address!r} in group {group!r}")
        try:
            body = json.loads(await request.read() or b"null")
        except ValueError as exc:
            return _error(400, f"the body is not JSON: {exc}")
        problems, req = parse_shed(body)
        if problems or req is None:
            return _error(400, *problems)
        # In a fleet whose Redis answers, every instance sheds its part (a count split by
        # the tunnels each holds there): the others once told, this one its own at once.
        # Not told (Redis down or slow): the whole shed here, as without a fleet.
        link, count, told = self.proxy.fleet, req.count, False
        parts: dict[str, int] | None = None  # with a count told the fleet: each one's part
        if link is not None and link.up:
            own = None if self.workers is not None else sum(server.stats.ws_active.values())
            shed = link.sheds.plan(sid, req.fraction, req.count, req.over, own)
            told = await link.sheds.tell(shed)
            if told:
                count = link.sheds.local(shed)
                parts = shed.parts if req.count is not None else None
        scheduled = 0
        if count is None or count > 0:
            if self.workers is not None:
                scheduled = await self.workers.shed(sid, req.fraction, count, req.over)
            else:
                scheduled = self.proxy.servers.shed(server, req.fraction, count, req.over)
        asked = {"fraction": req.fraction} if req.count is None else {"count": req.count}
        answer: dict[str, Any] = {
            "result": "ok",
            "server": sid,
            **asked,
            "scheduled": scheduled,
            "over": req.over,
            "fleet": told,
        }
        if parts is not None:
            answer["parts"] = parts
        return web.json_response(answer)

    async def reload(self, request: web.Request) -> web.Response:
        body = await request.read()
        if body.strip() and _json(body) != {}:
            return _error(400, "POST /-/reload takes no parameters: send no body, or {}")
        result = await self.proxy.reload("admin")
        if result.ok:
            return web.json_response(
                {"result": "ok", "changed": result.changed, "summary": result.message}
            )
        return web.json_response({"result": "error", "errors": list(result.problems)}, status=400)


def _error(status: int, *errors: str) -> web.Response:
    return web.json_response({"result": "error", "errors": list(errors)}, status=status)


def _server_change(body: object) -> tuple[list[str], str | None, int | None]:
    """Validate a PUT /-/servers body against its declaration: (problems, admin_state, weight)."""
    problems, change = parse_server_change(body)
    if change is None:
        return problems, None, None
    return problems, change.admin_state, change.weight


def _json(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _context(admin: Admin) -> ssl.SSLContext | None:
    """The admin's TLS context (its files were checked when the config was loaded)."""
    return None if admin.tls is None else tls.load(admin.tls).context


def _bound(site: web.TCPSite) -> Address:
    server: Any = site._server  # an asyncio or uvloop Server: both have .sockets
    host, port = server.sockets[0].getsockname()[:2]
    return Address(host, port)


class PendingBind:
    """A new admin socket opened by a reload: ``commit`` moves to it (the old one stops
    accepting; connections already open finish), ``cancel`` closes it again."""

    def __init__(self, admin: AdminServer, site: web.TCPSite, bind: Address) -> None:
        self.admin = admin
        self.site = site
        self.bind = bind

    async def commit(self) -> None:
        admin = self.admin
        old, admin.site = admin.site, self.site
        admin.address = _bound(self.site)
        admin.bind = self.bind
        if old is not None:
            await old.stop()

    async def cancel(self) -> None:
        await self.site.stop()


class Relisten:
    """New TLS on the same admin bind: at the commit the socket is closed and opened again
    with the new context (connections already open finish on the old one)."""

    def __init__(self, admin: AdminServer, bind: Address, context: ssl.SSLContext | None) -> None:
        self.admin = admin
        self.bind = bind
        self.context = context

    async def commit(self) -> None:
        admin = self.admin
        if admin.site is not None:
            await admin.site.stop()
        site = admin._site(self.bind, self.context)
        try:
            await site.start()
        except OSError as exc:
            admin.site = None
            log.error("admin: cannot listen on %s again: %s", self.bind, exc.strerror or exc)
            return
        admin.site = site
        admin.address = _bound(site)

    async def cancel(self) -> None:
        pass
