"""Per-client limits of a listener, as decisions over plain data (no sockets, no clock).

Owns three decisions; the caller passes ``now`` (any monotonic seconds) and the listener's
current ``ClientLimits``, so a reload's new numbers apply to the very next request:

- ``client_key``: which address a client is: the peer's own address, except when the peer is
  a trusted proxy (``Cidrs``): then the nearest X-Forwarded-For address that is not itself a trusted
  proxy (read from the right, where each trusted hop appended the address it saw). A client
  behind the trusted proxy cannot pick its key by sending an X-Forwarded-For of its own, for
  the hops it invents sit left of the one its proxy appended. If every address is trusted,
  the leftmost is the client.
- ``RateTable``: a token bucket per client (``burst`` tokens, refilled at
  ``requests_per_second``; a request takes one, and finding less than one it is refused with
  the seconds until one is back). At most ``table_size`` clients are remembered: the least
  recently seen is forgotten first, so a flood of made-up addresses cannot grow memory. A
  forgotten client comes back with a full bucket, which costs an attacker more than it gains
  (it must send ``table_size`` requests from other addresses to refill one).
- ``ConnectionCounts``: open connections per client, an entry only while one is open (so the
  table is bounded by the open connections themselves).

With ``scope: cluster`` both tables count across the fleet without a request waiting on
Redis: the decisions stay local, and ``control.cluster`` reconciles them in batches:
- ``RateTable.used`` collects the tokens taken per client since the last batch; the batch is
  applied to the fleet's bucket of each client in Redis by one atomic script (the same
  arithmetic as ``refill``: ``min(burst, tokens + elapsed * rate)``, then minus what was
  taken, down to ``-burst`` at most), and ``reconcile`` sets the local bucket to what the
  fleet's holds, minus what was taken here meanwhile. Between batches each instance refills
  at the full rate, so the fleet may pass up to (instances - 1) x rate x batch period more
  than the rate; the debt the next batch brings back takes it out again.
- ``ConnectionCounts.fleet`` holds the other instances' open connections per client (for the
  clients open here), added to this instance's own in ``acquire``.
- ``refuse`` (``on_cluster_failure: closed`` while Redis is unreachable) refuses every
  request; with ``open`` the tables simply go on alone.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Final

from ..wire.cidrs import Cidrs

MAX_KEY: Final = 64  # longest X-Forwarded-For entry used as a key (an IPv6 address is at most 45)


def client_key(xff: list[bytes], trusted: Cidrs, peer: str) -> str:
    """The address a request from a trusted proxy ``peer`` is counted against. ``xff``: every
    X-Forwarded-For field value of the request, in order; none: the peer itself."""
    hops = [h.strip() for value in xff for h in value.split(b",")]
    hops = [h for h in hops if h]
    if not hops:
        return peer
    for hop in reversed(hops):
        text = hop[:MAX_KEY].decode("latin-1")
        if not trusted.matches(text):
            return text
    return hops[0][:MAX_KEY].decode("latin-1")


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


def refill(tokens: float, elapsed: float, rate: float, burst: int) -> float:
    """A bucket's tokens ``elapsed`` seconds later (the script in Redis does the same)."""
    if elapsed <= 0:
        return tokens
    return min(float(burst), tokens + elapsed * rate)


class RateTable:
    """Token buckets by client key, bounded to the most recently seen clients."""

    __slots__ = ("buckets", "evicted", "refuse", "used")

    def __init__(self) -> None:
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.evicted = 0  # clients forgotten to make room
        # scope cluster: tokens taken per client since the last batch (None: scope local)
        self.used: dict[str, int] | None = None
        self.refuse = False  # scope cluster, on_cluster_failure closed, Redis unreachable

    def batch(self) -> dict[str, int]:
        """The tokens taken per client since the last batch; counting starts again."""
        out = self.used or {}
        self.used = {}
        return out

    def reconcile(self, key: str, fleet_tokens: float, now: float) -> None:
        """The fleet's bucket of ``key`` holds ``fleet_tokens`` (after the batch): the local
        bucket takes it, minus what was taken here since the batch left."""
        b = self.buckets.get(key)
        if b is None:
            return
        since = self.used.get(key, 0) if self.used is not None else 0
        b.tokens = fleet_tokens - since
        b.stamp = now

    def __len__(self) -> int:
        return len(self.buckets)

    def take(self, key: str, now: float, rate: float, burst: int, size: int) -> float:
        """A request from ``key`` at ``now``: 0.0 when it may go (a token is taken), else the
        seconds until the bucket holds a whole token again (nothing is taken)."""
        buckets = self.buckets
        b = buckets.get(key)
        if b is None:
            while len(buckets) >= size:
                buckets.popitem(last=False)
                self.evicted += 1
            b = buckets[key] = _Bucket(float(burst), now)
        else:
            buckets.move_to_end(key)
            elapsed = now - b.stamp
            if elapsed > 0:
                b.tokens = refill(b.tokens, elapsed, rate, burst)
                b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            used = self.used
            if used is not None:
                used[key] = used.get(key, 0) + 1
            return 0.0
        return (1.0 - b.tokens) / rate


class ConnectionCounts:
    """Open connections by client key; a key is present only while it has one open."""

    __slots__ = ("changed", "fleet", "open")

    def __init__(self) -> None:
        self.open: dict[str, int] = {}
        # scope cluster: the other instances' open connections per client, and the clients
        # whose count changed here since the last batch (None: scope local)
        self.fleet: dict[str, int] | None = None
        self.changed: set[str] | None = None

    def acquire(self, key: str, limit: int) -> bool:
        """Count a new connection from ``key``; False (nothing counted) past ``limit``."""
        n = self.open.get(key, 0)
        fleet = self.fleet
        if n + (fleet.get(key, 0) if fleet is not None else 0) >= limit:
            return False
        self.open[key] = n + 1
        if self.changed is not None:
            self.changed.add(key)
        return True

    def release(self, key: str) -> None:
        n = self.open.get(key, 0) - 1
        if n > 0:
            self.open[key] = n
        else:
            self.open.pop(key, None)
        if self.changed is not None:
            self.changed.add(key)
