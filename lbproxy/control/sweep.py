"""The periodic sweep of what expires between requests: owns ``Sweeper``, one timer (every
half of the shortest ``keepalive_timeout``) that closes idle upstream connections past their
group's keep-alive, returns the memory of expired sticky pins (lookups already ignore them)
and forgets removed servers once drained (``ServerControl.forget_idle_removed``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..core.snapshot import Holder
    from .server_control import ServerControl


class Sweeper:
    def __init__(self, holder: Holder, servers: ServerControl) -> None:
        self.holder = holder
        self.servers = servers
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            snap = self.holder.current
            period = min((g.keepalive_timeout for g in snap.config.server_groups), default=1.0)
            await asyncio.sleep(max(period / 2, 0.05))
            now = asyncio.get_running_loop().time()
            for g in self.holder.current.groups.values():
                for s in g.servers:
                    s.pool.expire(now, g.config.keepalive_timeout)
                if g.sticky is not None:
                    g.pins.sids.expire(now)
                    g.pins.cookies.expire(now)
            self.servers.forget_idle_removed()
