"""This process as a member of the fleet (``cluster:``): joining, leaving or moving when the
config says so, and the record it publishes about itself.

Owns ``FleetMember``: ``configure`` (at start and on a reload that changes ``cluster``) closes
the link to the old fleet's Redis and opens one to the new (``cluster.FleetLink``, which owns
the connection and the exchanges); ``describe`` makes this instance's record
(``core.fleet.Instance``: its listeners, totals, requests per second, open requests and
tunnels per server), read by the link about twice a second; ``close`` leaves. ``redis`` is
imported only when a cluster is configured.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config.top import Cluster
    from ..core.fleet import Instance
    from ..core.metrics import Registry
    from ..core.snapshot import Holder, RuntimeState
    from ..proxy.context import Context
    from ..proxy.listener import Listeners
    from .cluster import FleetLink
    from .server_control import ServerControl


class FleetMember:
    def __init__(
        self,
        *,
        registry: Registry,
        state: RuntimeState,
        holder: Holder,
        servers: ServerControl,
        ctx: Context,
        listeners: Listeners,
        publish: bool,
        writes: bool,
    ) -> None:
        self.registry = registry
        self.state = state
        self.holder = holder
        self.servers = servers
        self.ctx = ctx
        self.listeners = listeners
        # With workers the supervisor (``publish=False``) applies and writes the overrides and
        # shows the fleet; each worker (``writes=False``) is a member of it (``<name>.<pid>``),
        # publishing its counts and reconciling its limits.
        self.publish = publish
        self.writes = writes
        self.link: FleetLink | None = None  # with ``cluster``: the link to the fleet's Redis
        self.started = time.time()
        self._rate: tuple[float, int] = (time.monotonic(), 0)  # for the published requests/s

    async def configure(self, cfg: Cluster | None, closing: Callable[[], bool]) -> None:
        """Join (or leave, or move to) the fleet ``cfg`` names; not once ``closing()``."""
        await self.close()
        if cfg is not None and not closing():
            from .cluster import FleetLink  # redis is imported only with a cluster

            self.link = FleetLink(
                cfg,
                self.servers,
                self.describe,
                self.ctx.edges,
                self.holder,
                publish=self.publish,
                writes=self.writes,
                suffix="" if self.writes else f".{os.getpid()}",
            )
            await self.link.start()

    async def close(self) -> None:
        if self.link is not None:
            link, self.link = self.link, None
            await link.close()

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
