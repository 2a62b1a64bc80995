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
"""

from __future__ import annotations

from collections import OrderedDict

from ..wire.cidrs import Cidrs

MAX_KEY = 64  # longest X-Forwarded-For entry used as a key (an IPv6 address is at most 45)


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


class RateTable:
    """Token buckets by client key, bounded to the most recently seen clients."""

    __slots__ = ("buckets", "evicted")

    def __init__(self) -> None:
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.evicted = 0  # clients forgotten to make room

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
                b.tokens = min(float(burst), b.tokens + elapsed * rate)
                b.stamp = now
        if b.tokens >= 1.0:
            b.tokens -= 1.0
            return 0.0
        return (1.0 - b.tokens) / rate


class ConnectionCounts:
    """Open connections by client key; a key is present only while it has one open."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> bool:
        """Count a new connection from ``key``; False (nothing counted) past ``limit``."""
        n = self.open.get(key, 0)
        if n >= limit:
            return False
        self.open[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self.open.get(key, 0) - 1
        if n > 0:
            self.open[key] = n
        else:
            self.open.pop(key, None)
