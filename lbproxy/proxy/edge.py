"""The client connection's edge policies (issue 16): the thin I/O around their pure cores.

Owns the state of a listener's edge policies that outlives config snapshots (``Edges``, one
per process, keyed by listener name) and the calls a client connection makes into it:
- per-client connection and request-rate limits (``admit``, ``retry_after``, ``Slot``; the
  decisions are ``client_limits.py``'s);
- the listener bandwidth cap (``bandwidth``: the listener's ``shaping.Bandwidth``, its two
  shapers).
gzip needs no state across responses: the exchange's response calls ``gzip_filter`` directly.

The client connection (``client_socket.ClientSocket``: admit, bandwidth) and the exchange
(``exchange.Exchange``: retry_after) call in here from one place per concern, so their own
code stays about HTTP; a tunnel takes its client's ``Slot`` over and gives it back when it
closes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..core.client_limits import ConnectionCounts, RateTable, client_key
from .shaping import Bandwidth

if TYPE_CHECKING:
    from ..core.snapshot import ListenerRuntime


class Slot:
    """A client connection of a listener with ``limits``: whether its peer is a trusted proxy
    (decided once), and its place in ``connections_per_client``, given back once."""

    __slots__ = ("counts", "key", "trusted")

    def __init__(self, counts: ConnectionCounts | None, key: str, trusted: bool) -> None:
        self.counts = counts
        self.key = key
        self.trusted = trusted

    def release(self) -> None:
        if self.counts is not None:
            self.counts.release(self.key)
            self.counts = None


class ListenerEdge:
    """A listener's per-client state: it outlives snapshots, so a reload neither forgets a
    client's bucket nor loses count of the connections opened before it."""

    __slots__ = ("connections", "rates", "shapers")

    def __init__(self) -> None:
        self.connections = ConnectionCounts()
        self.rates = RateTable()
        self.shapers: Bandwidth | None = None


class Edges:
    """Every listener's edge state in this process, by listener name."""

    def __init__(self) -> None:
        self.listeners: dict[str, ListenerEdge] = {}

    def of(self, name: str) -> ListenerEdge:
        e = self.listeners.get(name)
        if e is None:
            e = self.listeners[name] = ListenerEdge()
        return e

    def bandwidth(self, lr: ListenerRuntime) -> Bandwidth | None:
        """The shapers a new connection of a listener with ``bandwidth`` reads through (a
        reload's new rate applies to every connection of the listener at once)."""
        rate = lr.config.bandwidth
        if not rate:
            return None
        e = self.of(lr.name)
        if e.shapers is None:
            e.shapers = Bandwidth(rate)
        elif e.shapers.inbound.bucket.rate != rate:
            e.shapers.set_rate(rate)
        return e.shapers

    def close(self) -> None:
        """Stop the shapers' timers (at shutdown)."""
        for e in self.listeners.values():
            if e.shapers is not None:
                e.shapers.close()

    def admit(self, lr: ListenerRuntime, ip: str) -> Slot | None:
        """A new connection from ``ip`` on a listener with ``limits``: its Slot, or None when
        the client has ``connections_per_client`` open already (refused, and counted). A
        trusted proxy's connections carry many clients: they are not counted."""
        cfg = lr.config
        limits = cfg.limits
        assert limits is not None
        trusted = cfg.trusted_proxies is not None and cfg.trusted_proxies.matches(ip)
        if not limits.connections_per_client or trusted:
            return Slot(None, ip, trusted)
        counts = self.of(lr.name).connections
        if not counts.acquire(ip, limits.connections_per_client):
            lr.stats.connections_refused["connections_per_client"] += 1
            return None
        return Slot(counts, ip, trusted)

    def retry_after(
        self,
        lr: ListenerRuntime,
        slot: Slot | None,
        ip: str,
        fields: list[tuple[bytes, bytes]],
        now: float,
    ) -> str | None:
        """A request (or WebSocket upgrade) starting: None when it may go, else the
        Retry-After value (whole seconds) of its 429. ``slot`` is None on a connection
        opened before a reload turned ``limits`` on."""
        cfg = lr.config
        limits = cfg.limits
        assert limits is not None
        rate = limits.requests_per_second
        if not rate:
            return None
        rates = self.of(lr.name).rates
        if rates.refuse:  # scope cluster, on_cluster_failure closed, Redis unreachable
            lr.stats.cluster_fallbacks["closed"] += 1
            return "1"
        trusted = cfg.trusted_proxies
        key = ip
        if trusted is not None and (slot.trusted if slot is not None else trusted.matches(ip)):
            xff = [v for n, v in fields if n.lower() == b"x-forwarded-for"]
            key = client_key(xff, trusted, ip)
        wait = rates.take(key, now, rate, limits.burst, limits.table_size)
        if not wait:
            return None
        return str(max(1, math.ceil(wait)))
