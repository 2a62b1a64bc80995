"""The admin listener: /metrics, /status, the status page, /healthz and POST /-/reload.

Owns the aiohttp application on ``admin.bind`` (never on a proxied listener). It only reads
the proxy's state and asks ``Proxy.reload``; the numbers come from ``metrics``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from . import __version__
from .config import Address
from .metrics import Collector
from .status_page import render_status_page

if TYPE_CHECKING:
    from .app import Proxy


def status(proxy: Proxy) -> dict[str, Any]:
    """Everything the status page shows, as JSON-ready data."""
    snap = proxy.holder.current
    cfg = snap.config
    reg = proxy.registry
    listeners = []
    for lst in cfg.listeners:
        ls = reg.listener(lst.name)
        tunnels = sum(1 for c in ls.live if type(c).__name__ == "Tunnel")
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
        for s in g.servers:
            h = s.health
            state = h.state.value if g.checks else "up"
            requests = sum(
                n
                for ls in reg.listeners.values()
                for (gn, sl, _), n in ls.requests.items()
                if gn == g.name and sl == s.label
            )
            servers.append(
                {
                    "id": s.id,
                    "address": s.label,
                    "weight": s.weight,
                    "state": state,
                    "checked": g.checks,
                    "last_check": h.last_reason or None,
                    "last_check_latency": h.last_latency,
                    "last_check_age": (
                        None if h.last_check_at is None else time.monotonic() - h.last_check_at
                    ),
                    "last_change_reason": getattr(h, "last_change_reason", "") or None,
                    "active_connections": s.active,
                    "websockets_active": sum(s.stats.ws_active.values()),
                    "websockets_total": sum(s.stats.ws_total.values()),
                    "requests_total": requests,
                    "upstream_errors": dict(s.stats.errors),
                    "health_checks": dict(s.stats.health_checks),
                }
            )
        groups.append(
            {
                "name": g.name,
                "scheduler": g.config.scheduler,
                "health_check": g.checks,
                "servers_up": sum(1 for x in servers if x["state"] == "up"),
                "servers": servers,
            }
        )
    when, ok, message = proxy.last_reload
    return {
        "version": __version__,
        "pid": _pid(),
        "config": {"path": proxy.config_path, "sha256": cfg.digest or None},
        "last_reload": {"time": when, "success": ok, "message": message},
        "listeners": listeners,
        "server_groups": groups,
        "time": time.time(),
    }


def _pid() -> int:
    import os

    return os.getpid()


class AdminServer:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.prom = CollectorRegistry(auto_describe=False)
        self.prom.register(Collector(proxy.registry))
        self.app = web.Application()
        self.app.router.add_get("/", self.page)
        self.app.router.add_get("/status", self.status)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_post("/-/reload", self.reload)
        self.runner: web.AppRunner | None = None
        self.site: web.TCPSite | None = None
        self.address: Address | None = None

    async def start(self) -> None:
        bind = self.proxy.holder.current.config.admin.bind
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        self.site = web.TCPSite(self.runner, bind.host, bind.port, reuse_address=True)
        await self.site.start()
        server: Any = self.site._server  # an asyncio or uvloop Server: both have .sockets
        host, port = server.sockets[0].getsockname()[:2]
        self.address = Address(host, port)

    async def close_listener(self) -> None:
        """Stop accepting admin connections (first step of shutdown)."""
        if self.site is not None:
            await self.site.stop()
            self.site = None

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.prom)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(status(self.proxy))

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=render_status_page(status(self.proxy)), content_type="text/html")

    async def reload(self, request: web.Request) -> web.Response:
        result = await self.proxy.reload("admin")
        if result.ok:
            return web.json_response(
                {"result": "ok", "changed": result.changed, "summary": result.message}
            )
        return web.json_response({"result": "error", "errors": list(result.problems)}, status=400)
