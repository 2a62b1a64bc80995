"""The fleet through Redis: the one owner of the Redis connection (``cluster:`` in the config).

Owns ``FleetLink``: a background task that, about twice a second (and at once after a local
override), in two round trips:
- publishes this instance's record (``core.fleet.Instance``: its totals, its open requests
  and tunnels per server, its config hash) under ``<prefix>instance:<name>`` with an expiry,
  and its name in the ``<prefix>instances`` sorted set (scored by time, old names pruned);
- reads every live instance's record: the fleet view (``view``, for /-/cluster, /status and
  the page) and the other instances' counts per server, set on each ``ServerState`` as
  ``fleet_active`` for ``wlc``, and their open tunnels per server, set on the rebalance's
  ``Mover`` (``peers``) for the fleet-wide plan;
- merges the runtime overrides with the ``<prefix>overrides`` hash (last writer by
  timestamp, ``core.fleet.merge_overrides``): the fleet's newer ones are applied here
  through ``ServerControl``, this instance's newer ones (set while Redis was unreachable,
  or lost by a Redis restart) are written with an atomic compare-and-set script;
- reads the young sheds (``<prefix>sheds``) and performs the ones asked through other
  instances, once each (``fleet_shed.FleetSheds``, which also writes the sheds asked here).

Nothing on the request path waits on Redis: the data path reads ``fleet_active`` and the
override already applied. Every Redis call has a short timeout; a failure marks Redis down
(logged once per outage, ``lbproxy_cluster_redis_up`` 0, ``cluster: degraded``), and the
next try waits a backoff growing to 2 s (the circuit); the other instances' counts are
dropped once older than the expiry, so a long outage leaves each instance on its own counts.
``start`` does a first exchange, bounded, before the listeners accept: a restarted instance
comes up with the fleet's overrides when Redis answers, and serves on its own when not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ..core import fleet
from ..core.fleet import Entry, Instance
from .cluster_limits import RATE_PERIOD, FleetLimits
from .fleet_shed import FleetSheds

if TYPE_CHECKING:  # annotations only: at run time they would deepen the imports
    from ..config.top import Cluster
    from ..core.snapshot import Holder
    from ..proxy.edge import Edges
    from .server_control import ServerControl

log = logging.getLogger("lbproxy")

PERIOD = 0.5  # seconds between exchanges: an override reaches every instance within ~1 s
EXPIRY = 3.0  # a record older than this is a dead instance's: its counts no longer count
FORGET = 60.0  # names unseen this long leave the instances set
TIMEOUT = 0.5  # connect and per-command timeout (the task's, never a request's)
START_BOUND = 2.0  # the first exchange at start waits at most this long
EXCHANGE_BOUND = 3.0  # one exchange (two round trips, the scripts) at most
BACKOFF_MAX = 2.0

# Compare-and-set of one override: written only when newer than what the hash holds.
_CAS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local ok, d = pcall(cjson.decode, cur)
  if ok and type(d) == 'table' and tonumber(d['at']) and tonumber(d['at']) >= tonumber(ARGV[3])
  then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    auth, at, host = rest.rpartition("@")
    if not at:
        return url
    user = auth.split(":", 1)[0]
    return f"{scheme}{sep}{user + ':' if user else ''}***@{host}"


class FleetLink:
    def __init__(
        self,
        cfg: Cluster,
        servers: ServerControl,
        describe: Callable[[str, float], Instance],
        edges: Edges,
        holder: Holder,
        publish: bool = True,
        writes: bool = True,
        suffix: str = "",
    ) -> None:
        self.cfg = cfg
        instance = cfg.name or socket.gethostname()
        self.name = instance + suffix
        # With --workers the supervisor (no traffic) does not publish a record and each
        # worker (no admin API) writes no override: each worker is a member of the fleet.
        self.publish = publish
        self.writes = writes
        self.servers = servers
        self.describe = describe  # this instance's record at a time (the app knows its totals)
        p = cfg.prefix
        self.k_overrides = f"{p}overrides"
        self.k_instances = f"{p}instances"
        self.k_instance = f"{p}instance:"
        self.client: aioredis.Redis = aioredis.from_url(
            cfg.redis,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
            decode_responses=True,
        )
        self.cas = self.client.register_script(_CAS)
        self.limits = FleetLimits(self.client, p, self.name, edges, holder)
        # Sheds: members with tunnels (``publish``) perform the other instances' sheds.
        self.sheds = FleetSheds(
            self.client, p, self.name, instance, servers, lambda: self.instances, publish
        )
        self._limits_task: asyncio.Task[None] | None = None
        self.up = False
        self.outages = 0
        self.commands = 0  # Redis commands sent (for bench/ and the sizing in the README)
        self.last_ok = 0.0  # monotonic time of the last good exchange
        self.instances: list[Instance] = []
        self.local: dict[str, Entry] = {}  # the overrides as this instance knows them
        self._applying = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._down_since: float | None = None
        servers.me = self.name
        if writes:
            servers.on_local_change = self._local_change

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """A first exchange (bounded), then the background task."""
        try:
            await asyncio.wait_for(self.exchange(), START_BOUND)
            self._went_up()
        except (RedisError, OSError, TimeoutError) as exc:
            self._went_down(exc)
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run())
        if self.publish:
            self._limits_task = loop.create_task(self._run_limits())

    async def close(self) -> None:
        self.servers.on_local_change = None
        for task in (self._task, self._limits_task):
            if task is not None:
                task.cancel()
                # Bounded: shutdown must not wait on a Redis client stuck in a call.
                await asyncio.wait([task], timeout=START_BOUND)
        self._task = self._limits_task = None
        # The limit tables go back to scope local (this link no longer reconciles them).
        for lr in self.limits.holder.current.listeners.values():
            edge = self.limits.edges.of(lr.name)
            edge.rates.used = edge.connections.fleet = edge.connections.changed = None
            edge.rates.refuse = False
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            # Leave the fleet view at once rather than after the expiry.
            await asyncio.wait_for(self._leave(), TIMEOUT)
        for s in self.servers.state.servers.values():
            s.fleet_active = 0
        self.servers.mover.peers = {}
        self.servers.registry.cluster = None
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self.client.aclose(), TIMEOUT)

    async def _leave(self) -> None:
        if not self.publish:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(self.k_instance + self.name)
        pipe.zrem(self.k_instances, self.name)
        await pipe.execute()

    async def _run(self) -> None:
        backoff = PERIOD
        while True:
            wait = PERIOD if self.up else backoff
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            outages = self.outages
            try:
                # Each call has its own timeout; this bounds the whole (a connection being
                # opened, a pool waited on): no state of the link can stall it for good.
                await asyncio.wait_for(self.exchange(), EXCHANGE_BOUND)
            except (RedisError, OSError, TimeoutError) as exc:
                self._went_down(exc)
                backoff = min(BACKOFF_MAX, backoff * 2)
                self._expire_counts()
                continue
            except Exception:  # a bug must not end the fleet link for good
                log.exception("cluster: exchange with Redis failed")
                continue
            backoff = PERIOD
            if self.outages != outages:
                # Redis went away while this exchange was under way (the rate batch saw it):
                # an answer from before does not prove it back.
                self._wake.set()
                continue
            self._went_up()

    async def _run_limits(self) -> None:
        """The rate batches, about ten times a second while Redis answers."""
        while True:
            await asyncio.sleep(RATE_PERIOD)
            if not self.up:
                self.limits.degraded()
                continue
            try:
                await asyncio.wait_for(self.limits.rates(), EXCHANGE_BOUND)
            except (RedisError, OSError, TimeoutError) as exc:
                self._went_down(exc)
                self._wake.set()  # the exchange loop retries (and says when it is back)
            except Exception:
                log.exception("cluster: rate batch failed")

    def _publish(self) -> None:
        self.servers.registry.cluster = (len(self.instances), 1 if self.up else 0)

    def _went_up(self) -> None:
        self.last_ok = time.monotonic()
        self._publish()
        if not self.up:
            if self._down_since is not None:
                log.warning(
                    "cluster: Redis is back (%s) after %.1f s; fleet state resynced",
                    redacted(self.cfg.redis),
                    time.monotonic() - self._down_since,
                )
            else:
                log.info(
                    "cluster: joined the fleet as %s via %s", self.name, redacted(self.cfg.redis)
                )
            self.up = True
            self._down_since = None

    def _went_down(self, exc: BaseException) -> None:
        if self.up or self._down_since is None:
            self.outages += 1
            self._down_since = time.monotonic()
            log.warning(
                "cluster: Redis unreachable (%s: %s): serving on local state (cluster: "
                "degraded) until it is back",
                redacted(self.cfg.redis),
                type(exc).__name__ if not str(exc) else exc,
            )
        self.up = False
        self.limits.degraded()  # at once: closed listeners refuse from the next request
        self._publish()

    def _expire_counts(self) -> None:
        if time.monotonic() - self.last_ok > EXPIRY:
            for s in self.servers.state.servers.values():
                s.fleet_active = 0
            self.servers.mover.peers = {}
            self.instances = [i for i in self.instances if i.name == self.name]
            self._publish()

    # ------------------------------------------------------------------ overrides
    def _local_change(self, sid: str, entry: Entry) -> None:
        """An override set through this instance's API: kept, and written at once."""
        if self._applying:
            return
        self.local[sid] = entry
        self._wake.set()

    def _apply(self, entries: dict[str, Entry]) -> None:
        self._applying = True
        try:
            for sid, e in entries.items():
                mine = self.local.get(sid)
                if mine is not None and mine.at > e.at:
                    # Set here while the exchange was waiting on Redis: the newer one holds
                    # (and is written at the next exchange).
                    continue
                self.local[sid] = e
                if sid in self.servers.state.servers:
                    self.servers.set_server_state(sid, e.admin_state, e.weight, by=e.by, at=e.at)
        finally:
            self._applying = False

    # ------------------------------------------------------------------ the exchange
    async def exchange(self) -> None:
        now = time.time()
        me = self.describe(self.name, now)
        pipe = self.client.pipeline(transaction=False)
        if self.publish:
            pipe.set(self.k_instance + self.name, me.dumps(), px=int(EXPIRY * 1000))
            pipe.zadd(self.k_instances, {self.name: now})
            pipe.zremrangebyscore(self.k_instances, "-inf", now - FORGET)
        pipe.zrange(self.k_instances, 0, -1)
        pipe.hgetall(self.k_overrides)
        if self.publish:
            pipe.zrangebyscore(self.sheds.key, *self.sheds.read_from(now))
        res: list[Any] = await pipe.execute()
        self.commands += len(res)
        at = 3 if self.publish else 0
        names: list[str] = res[at]
        raw: dict[str, str] = res[at + 1]
        sheds: list[str] = res[at + 2] if self.publish else []
        records: list[bytes | str | None] = []
        if names:
            records = await self.client.mget([self.k_instance + n for n in names])
            self.commands += 1
        remote = {sid: e for sid, v in raw.items() if (e := Entry.loads(v)) is not None}
        apply, write = fleet.merge_overrides(self.local, remote)
        if not self.writes:
            write = {}
        for sid, e in write.items():  # rare (an override set, or Redis back): one call each
            await self.cas(keys=[self.k_overrides], args=[sid, e.dumps(), repr(e.at)])
            self.commands += 1
        if apply:
            self._apply(apply)
        if self.publish:
            await self.limits.connections()
        live = fleet.live_instances(
            [Instance.loads(r) if r is not None else None for r in records], now, EXPIRY
        )
        if self.publish and not any(i.name == self.name for i in live):
            live = sorted([*live, me], key=lambda i: i.name)
        self.instances = live
        others = fleet.others_counts(live, self.name)
        for sid, s in self.servers.state.servers.items():
            s.fleet_active = others.get(sid, 0)
        self.servers.mover.me = self.name
        self.servers.mover.peers = fleet.others_tunnels(live, self.name)
        if self.publish:
            self.sheds.perform(sheds, now)

    # ------------------------------------------------------------------ the view
    def view(self) -> dict[str, Any]:
        """The fleet as /-/cluster, /status and the page show it."""
        now = time.time()
        odd = fleet.odd_configs(self.instances)
        return {
            "name": self.name,
            "state": "ok" if self.up else "degraded",
            "redis": {"url": redacted(self.cfg.redis), "up": self.up, "outages": self.outages},
            "prefix": self.cfg.prefix,
            "instances": [
                {
                    "name": i.name,
                    "self": i.name == self.name or i.name.startswith(self.name + "."),
                    "address": i.address,
                    "version": i.version,
                    "build": i.build,
                    "uptime": max(0.0, now - i.started),
                    "connections": i.connections,
                    "tunnels": i.tunnels,
                    "requests_per_second": i.rps,
                    "last_seen": max(0.0, now - i.at),
                    "config_sha256": i.config,
                    "config_differs": i.name in odd,
                }
                for i in self.instances
            ],
        }
