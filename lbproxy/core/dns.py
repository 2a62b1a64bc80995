"""DNS service discovery decisions: plain functions and a per-group tracker, no sockets.

Owns what ``discovery.py`` (the I/O: lookups on a timer) decides with each answer:
- ``next_interval``: when to look again. The records' TTL, bounded by the group's
  ``interval`` above and ``MIN_DISCOVERY_INTERVAL`` below: never more than once a second;
- ``srv_weights`` / ``srv_servers`` / ``address_servers``: an answer -> the group's servers,
  ``ip:port`` each, marked discovered. SRV: only the records of the lowest priority value
  (the others are backups, RFC 2782), weights mapped onto 1..100 relative to the largest;
- ``Tracker``: the last known set of one group and its outage. A lookup that fails or times
  out keeps the set (logged once per outage); empty answers (no such name, no records) keep
  it too until they have gone on for ``DISCOVERY_EMPTY_INTERVALS`` intervals, then the group
  empties: the name really lost its records;
- ``with_discovered``: a config from the file plus the discovered servers, the one input of a
  snapshot build (so a changed set takes exactly the path of a reload).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..config.model import DISCOVERY_EMPTY_INTERVALS, MIN_DISCOVERY_INTERVAL, Address
from ..config.servers import Discovery, Server

if TYPE_CHECKING:
    from ..config.top import Config

RESULTS = ("ok", "nxdomain", "timeout", "error")

# group name -> (the discovery settings the servers were found with, the servers)
Discovered = Mapping[str, tuple[Discovery, tuple[Server, ...]]]


@dataclass(frozen=True, slots=True)
class Answer:
    """One lookup's outcome. ``result`` is one of RESULTS: ``nxdomain`` also covers a name
    without records of the type asked (an empty answer); ``servers`` only with ``ok``."""

    result: str
    servers: tuple[Server, ...] = ()
    ttl: float | None = None  # the smallest TTL of the records used
    detail: str = ""  # what went wrong, for the log


@dataclass(frozen=True, slots=True)
class SrvRecord:
    priority: int
    weight: int
    port: int
    target: str  # lower case, no trailing dot


@dataclass(frozen=True, slots=True)
class Step:
    """What to do after an answer: swap in ``servers`` (None: keep what is there), log
    ``message`` (None: nothing new to say) at ``warning`` level or info, look again in
    ``delay`` seconds."""

    servers: tuple[Server, ...] | None
    delay: float
    message: str | None = None
    warning: bool = False


def next_interval(interval: float, ttl: float | None) -> float:
    if ttl is None:
        return interval
    return max(MIN_DISCOVERY_INTERVAL, min(interval, ttl))


def address_servers(ips: Iterable[str], port: int, weight: int) -> tuple[Server, ...]:
    return tuple(Server(Address(ip, port), weight, discovered=True) for ip in sorted(set(ips)))


def srv_weights(weights: Sequence[int]) -> list[int]:
    """SRV weights (0..65535, relative) -> 1..100, the largest becoming 100; all 0: all 100."""
    top = max(weights, default=0)
    if top <= 0:
        return [100] * len(weights)
    return [max(1, min(100, round(100 * w / top))) for w in weights]


def srv_servers(
    records: Sequence[SrvRecord], addresses: Mapping[str, Sequence[str]]
) -> tuple[Server, ...]:
    """The servers of an SRV answer; ``addresses`` maps each target to its IPs (a target
    without any is left out). An ``ip:port`` reached through several records keeps the
    largest weight."""
    if not records:
        return ()
    best = min(r.priority for r in records)
    used = [r for r in records if r.priority == best and r.target != ""]
    weights = srv_weights([r.weight for r in used])
    found: dict[Address, int] = {}
    for r, w in zip(used, weights, strict=True):
        for ip in addresses.get(r.target, ()):
            a = Address(ip, r.port)
            found[a] = max(w, found.get(a, 0))
    order = sorted(found, key=lambda a: (a.host, a.port))
    return tuple(Server(a, found[a], discovered=True) for a in order)


class Tracker:
    """The last known servers of one group, and whether its name is in an outage."""

    def __init__(self, name: str, interval: float, servers: tuple[Server, ...] = ()) -> None:
        self.name = name
        self.interval = interval
        self.servers = servers
        self.empty_streak = 0  # consecutive empty answers
        self.outage: str | None = None  # the result that started the current outage

    def observe(self, answer: Answer) -> Step:
        if answer.result == "ok" and answer.servers:
            message = None
            if self.outage is not None:
                message = f"{self.name} resolves again ({len(answer.servers)} servers)"
            self.outage = None
            self.empty_streak = 0
            delay = next_interval(self.interval, answer.ttl)
            if answer.servers == self.servers:
                return Step(None, delay, message)
            self.servers = answer.servers
            return Step(answer.servers, delay, message)
        empty = answer.result in ("ok", "nxdomain")
        message = None
        if self.outage is None:
            self.outage = answer.result
            what = "has no records" if empty else f"lookup failed ({answer.result})"
            detail = f": {answer.detail}" if answer.detail else ""
            message = f"{self.name} {what}{detail}; keeping the last {len(self.servers)} servers"
        if not empty:
            return Step(None, self.interval, message, warning=True)
        self.empty_streak += 1
        # The first empty answer starts the count: the group empties once emptiness has
        # lasted the given number of whole intervals.
        if self.empty_streak > DISCOVERY_EMPTY_INTERVALS and self.servers:
            self.servers = ()
            message = (
                f"{self.name} has had no records for {DISCOVERY_EMPTY_INTERVALS} intervals;"
                " the group is now empty"
            )
            return Step((), self.interval, message, warning=True)
        return Step(None, self.interval, message, warning=True)


def with_discovered(config: Config, discovered: Discovered) -> Config:
    """``config`` with each discovery group's found servers after its literal ones (an
    address already written in the file is not added twice). Servers found with other
    discovery settings than the group's current ones are stale and left out."""
    groups = []
    changed = False
    for g in config.server_groups:
        entry = discovered.get(g.name)
        if g.discovery is None or entry is None or entry[0] != g.discovery or not entry[1]:
            groups.append(g)
            continue
        literal = {s.address for s in g.servers}
        extra = tuple(s for s in entry[1] if s.address not in literal)
        groups.append(replace(g, servers=g.servers + extra))
        changed = True
    return replace(config, server_groups=tuple(groups)) if changed else config


def encode(discovered: Discovered) -> dict[str, object]:
    """JSON-ready form of a discovered map (the supervisor hands it to its workers)."""
    out: dict[str, object] = {}
    for group, (spec, servers) in discovered.items():
        out[group] = {
            "spec": [spec.dns, spec.port, spec.interval, spec.weight, spec.timeout],
            "servers": [[s.address.host, s.address.port, s.weight] for s in servers],
        }
    return out


def decode(doc: Mapping[str, object] | None) -> dict[str, tuple[Discovery, tuple[Server, ...]]]:
    out: dict[str, tuple[Discovery, tuple[Server, ...]]] = {}
    for group, entry in (doc or {}).items():
        assert isinstance(entry, Mapping)
        dns, port, interval, weight, timeout = entry["spec"]
        spec = Discovery(dns, port, interval, weight, timeout)
        servers = tuple(
            Server(Address(host, p), w, discovered=True) for host, p, w in entry["servers"]
        )
        out[group] = (spec, servers)
    return out
