"""Sheds across the fleet (``cluster:``): a shed asked for through one instance reaches every
live instance within about a second, and each sheds its part of its own tunnels.

Owns ``FleetSheds`` and the ``<prefix>sheds`` sorted set (short-lived records scored by the
time asked, ``core.fleet.Shed``):
- ``plan`` (the instance asked, through its admin API): the record, with a ``count`` split
  over the live instances by the tunnels each holds on the server (``core.fleet.shed_parts``,
  the rebalance's arithmetic; this instance's own count live, the others' as published);
  ``local`` is this instance's part, which the caller sheds at once, as without a fleet;
- ``tell``: the record written (one bounded round trip, old records pruned); False when
  Redis does not answer: the shed then applied locally only;
- ``perform`` (each member's exchange, ``control.cluster``, reads the young records): the
  sheds not yet performed (by id), not older than ``MAX_AGE`` and not asked through this
  instance, each performed once through ``ServerControl.shed``. The first read of a link only
  notes what is there: an instance that comes later never replays an old shed.

Under ``--workers`` the supervisor plans and tells (its workers shed the local part through
its fan-out) and each worker, a member of the fleet, performs the other instances' sheds.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from ..core.fleet import Instance, Shed, due_sheds, member_of, shed_parts

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from .server_control import ServerControl

log = logging.getLogger("lbproxy")

MAX_AGE = 5.0  # a shed older than this (seconds) is never performed: it has been, or is stale
FORGET = 60.0  # records older than this leave the set (pruned on each write)
TIMEOUT = 0.5  # the write's bound: the admin call never waits longer on Redis


class FleetSheds:
    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        name: str,
        instance: str,
        servers: ServerControl,
        instances: Callable[[], list[Instance]],
        performs: bool,
    ) -> None:
        self.client = client
        self.key = f"{prefix}sheds"
        self.name = name  # this member's name (``<instance>.<pid>`` for a worker)
        self.instance = instance  # the instance it belongs to (the name asks are made under)
        self.servers = servers
        self.instances = instances  # the live instances as the last exchange read them
        self.performs = performs  # a member with tunnels (not a supervisor)
        self.seen: dict[str, float] = {}  # id -> asked at: performed, or there when it came
        self.primed = False

    # ------------------------------------------------------------------ asked here
    def plan(
        self, sid: str, fraction: float | None, count: int | None, over: float, own: int | None
    ) -> Shed:
        """The record for a shed asked here. ``own``: this instance's open tunnels on ``sid``
        (None under --workers: its workers' published counts are used)."""
        held: dict[str, int] = {}
        for i in self.instances():
            if member_of(i.name, self.instance) and own is not None:
                continue
            n = i.websockets.get(sid, 0)
            if n > 0:
                held[i.name] = n
        if own:
            held[self.instance] = own
        parts = shed_parts(count, held) if count is not None else {}
        shed = Shed(
            id=uuid.uuid4().hex,
            by=self.instance,
            at=time.time(),
            server=sid,
            fraction=fraction,
            count=count,
            over=over,
            held=held,
            parts=parts,
        )
        self.seen[shed.id] = shed.at
        return shed

    def local(self, shed: Shed) -> int | None:
        """This instance's part of a count (all its members'); None for a fraction."""
        if shed.count is None:
            return None
        return sum(n for name, n in shed.parts.items() if member_of(name, self.instance))

    async def tell(self, shed: Shed) -> bool:
        """Write the record for the fleet; False when Redis does not answer in time."""
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(self.key, {shed.dumps(): shed.at})
            pipe.zremrangebyscore(self.key, "-inf", shed.at - FORGET)
            await asyncio.wait_for(pipe.execute(), TIMEOUT)
        except (RedisError, OSError, TimeoutError) as exc:  # the shed stands, locally
            log.warning(
                "cluster: shed of %s applied here only: Redis did not take it (%s)",
                shed.server,
                type(exc).__name__ if not str(exc) else exc,
            )
            return False
        return True

    # ------------------------------------------------------------------ asked elsewhere
    def read_from(self, now: float) -> tuple[float, str]:
        """The score range an exchange reads (the young records)."""
        return now - MAX_AGE, "+inf"

    def perform(self, raw: list[str], now: float) -> None:
        """Perform the due sheds among the records read (once each)."""
        records = [r for v in raw if (r := Shed.loads(v)) is not None]
        for old in [k for k, at in self.seen.items() if now - at > 2 * MAX_AGE]:
            del self.seen[old]
        if not self.primed:
            self.primed = True
            for r in records:
                self.seen[r.id] = r.at
            return
        for r in due_sheds(records, self.seen, self.name, now, MAX_AGE):
            self.seen[r.id] = r.at
            if self.performs:
                self._perform(r)

    def _perform(self, r: Shed) -> None:
        server = self.servers.state.servers.get(r.server)
        if server is None:
            return  # not in this instance's config (a different config): nothing to shed
        count = r.parts.get(self.name, 0) if r.count is not None else None
        if count == 0:
            return  # this member held none of it when asked
        n = self.servers.shed(server, r.fraction, count, r.over)
        log.info("cluster: shed of %s asked through %s: %d WebSockets here", r.server, r.by, n)
