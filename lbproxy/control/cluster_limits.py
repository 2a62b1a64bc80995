"""Fleet-wide client limits (``listeners[].limits.scope: cluster``): the batches to Redis.

Owns ``FleetLimits``, driven by ``cluster.FleetLink`` (its Redis connection, its up/down):
- ``rates`` (about ten times a second): for each cluster-scope listener with
  ``requests_per_second``, the tokens taken per client since the last batch
  (``RateTable.batch``) go to Redis in one call of an atomic script that refills each
  client's fleet bucket (the arithmetic of ``client_limits.refill``, on Redis's clock) and
  takes them; each local bucket is then set to what the fleet's holds (``reconcile``);
- ``connections`` (with each exchange, about twice a second): this instance's open
  connections per client (those open or changed here) go to a hash per client, each
  instance's field stamped and dropped once older than the expiry, and the script returns
  the other instances' sum, which ``ConnectionCounts.acquire`` adds to its own, and the
  clients at their limit across the fleet (a sorted set kept by the same script), so a client
  full elsewhere is refused here too though nothing of it is open here.

Nothing here is awaited by a request. While Redis is unreachable the batches are dropped
(the local tables decide alone: ``on_cluster_failure: open``, the tokens taken meanwhile
counted in ``lbproxy_cluster_limit_fallbacks_total``) or, with ``closed``,
``RateTable.refuse`` makes the listener answer 429 (counted by the data path).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # annotations only: at run time they would deepen the imports
    import redis.asyncio as aioredis

    from ..core.snapshot import Holder
    from ..proxy.edge import Edges

log = logging.getLogger("lbproxy")

RATE_PERIOD: Final = 0.1  # seconds between rate batches
CONN_EXPIRY_MS: Final = 3000  # an instance's connection count older than this no longer counts

_RATES: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, ttl = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for i = 5, #ARGV, 2 do
  local k = ARGV[1] .. ARGV[i]
  local v = redis.call('HMGET', k, 'tokens', 'stamp')
  local tokens, stamp = tonumber(v[1]), tonumber(v[2])
  if tokens == nil or stamp == nil then tokens = burst; stamp = now end
  local elapsed = now - stamp
  if elapsed > 0 then tokens = math.min(burst, tokens + elapsed * rate) end
  tokens = math.max(-burst, tokens - tonumber(ARGV[i + 1]))
  redis.call('HSET', k, 'tokens', tostring(tokens), 'stamp', tostring(now))
  redis.call('PEXPIRE', k, ttl)
  out[#out + 1] = tostring(tokens)
end
return out
"""

_CONNS: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, expiry, limit, full = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local out = {}
for i = 6, #ARGV, 2 do
  local k = ARGV[1] .. ARGV[i]
  local n = tonumber(ARGV[i + 1])
  if n > 0 then redis.call('HSET', k, me, n .. ':' .. now) else redis.call('HDEL', k, me) end
  local all = redis.call('HGETALL', k)
  local others = 0
  for j = 1, #all, 2 do
    if all[j] ~= me then
      local c, at = string.match(all[j + 1], '^(%d+):(%d+)$')
      if c and now - tonumber(at) <= expiry then
        others = others + tonumber(c)
      else
        redis.call('HDEL', k, all[j])
      end
    end
  end
  redis.call('PEXPIRE', k, expiry)
  if others + n >= limit then
    redis.call('ZADD', full, now, ARGV[i])
  else
    redis.call('ZREM', full, ARGV[i])
  end
  out[#out + 1] = others
end
redis.call('ZREMRANGEBYSCORE', full, '-inf', now - expiry)
redis.call('PEXPIRE', full, expiry)
return {out, redis.call('ZRANGE', full, 0, -1)}
"""


class FleetLimits:
    def __init__(
        self, client: aioredis.Redis, prefix: str, name: str, edges: Edges, holder: Holder
    ) -> None:
        self.prefix = prefix
        self.name = name
        self.edges = edges
        self.holder = holder
        self.rates_script = client.register_script(_RATES)
        self.conns_script = client.register_script(_CONNS)
        self.commands = 0

    def listeners(self) -> list[Any]:
        """The cluster-scope listeners now; every listener's tables are set to its scope."""
        out = []
        for lr in self.holder.current.listeners.values():
            limits = lr.config.limits
            edge = self.edges.of(lr.name)
            cluster = limits is not None and limits.scope == "cluster"
            if cluster:
                if edge.rates.used is None:
                    edge.rates.used = {}
                if edge.connections.fleet is None:
                    edge.connections.fleet = {}
                    edge.connections.changed = set(edge.connections.open)
                out.append(lr)
            else:
                edge.rates.used = None
                edge.rates.refuse = False
                edge.connections.fleet = None
                edge.connections.changed = None
        return out

    def degraded(self) -> None:
        """Redis is unreachable: ``closed`` listeners refuse, ``open`` ones count their
        local decisions; the batches are dropped (nothing owed when it is back)."""
        for lr in self.listeners():
            limits = lr.config.limits
            edge = self.edges.of(lr.name)
            edge.rates.refuse = limits.on_cluster_failure == "closed"
            taken = sum(edge.rates.batch().values())
            if taken and limits.on_cluster_failure == "open":
                lr.stats.cluster_fallbacks["open"] += taken
            if edge.connections.fleet:
                edge.connections.fleet.clear()

    async def rates(self) -> None:
        loop = asyncio.get_running_loop()
        for lr in self.listeners():
            limits = lr.config.limits
            rates = self.edges.of(lr.name).rates
            rates.refuse = False
            if not limits.requests_per_second:
                continue
            batch = rates.batch()
            if not batch:
                continue
            args: list[Any] = [
                f"{self.prefix}rl:{lr.name}:",
                repr(limits.requests_per_second),
                limits.burst,
                int(1000 * (limits.burst / limits.requests_per_second + 1.0)),
            ]
            for key, n in batch.items():
                args += [key, n]
            # On an error the batch is lost: what was taken here counts only here.
            left = await self.rates_script(args=args)
            self.commands += 1
            now = loop.time()
            for key, tokens in zip(batch, left, strict=True):
                rates.reconcile(key, float(tokens), now)

    async def connections(self) -> None:
        for lr in self.listeners():
            limits = lr.config.limits
            if not limits.connections_per_client:
                continue
            limit = limits.connections_per_client
            counts = self.edges.of(lr.name).connections
            changed, counts.changed = counts.changed or set(), set()
            order = list(changed | set(counts.open))
            base = f"{self.prefix}cc:{lr.name}:"
            args: list[Any] = [base, self.name, CONN_EXPIRY_MS, limit, f"{base}full"]
            for key in order:
                args += [key, counts.open.get(key, 0)]
            others, full = await self.conns_script(args=args)
            self.commands += 1
            fleet = {k: int(n) for k, n in zip(order, others, strict=True) if int(n) > 0}
            # A client at its limit through other instances and with nothing open here: its
            # count there is not fetched (only the clients open here are), but it is full.
            # A client sent in this batch has its exact count from the others above: "full"
            # may be this instance's own connections (one closed here, one opened again).
            sent = set(order)
            for k in full:
                if k not in sent:
                    fleet.setdefault(k, limit)
            counts.fleet = fleet
