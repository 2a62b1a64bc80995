"""What happened in the last minutes and hours: bounded rings of rates and gauges, and an
event log, kept in memory for the status page and ``GET /status/history``.

Owns the arithmetic only (pure: no clock, no timer, no I/O). ``control.history`` reads the
counters the data path already keeps (``core.metrics``) on a timer and hands each reading to
``History.add`` with its time; every resolution (every 5 s for 15 minutes, every minute for
6 hours by default) turns the difference from its previous reading into per-second rates and
interval quantiles, and writes one row per entity into a fixed ``array('d')``: the memory is
allocated when an entity first appears and never grows. NaN marks "no value" (a gap): an
entity not there yet, a server not up, an interval with no observation to take a quantile of.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

NAN = math.nan

# Each entity kind's series, in the order of its row. Rates are per second over the interval;
# p50/p99 are seconds; the others are gauges read at the sample.
# WebSocket messages both ways, and ends by close code class per second (of a listener: close
# frames either way; of a server or group: its tunnels as they end, by their first close).
WS_SERIES = (
    "ws_messages_in",
    "ws_messages_out",
    "closes_1000",
    "closes_1001",
    "closes_1006",
    "closes_other",
)
SERVER_SERIES = (
    "up",
    "requests",
    "errors_5xx",
    "connect_failures",
    "p50",
    "p99",
    "connections",
    "tunnels",
    *WS_SERIES,
)
GROUP_SERIES = (
    "servers_up",
    "requests",
    "errors_5xx",
    "connect_failures",
    "p50",
    "p99",
    "connections",
    "tunnels",
    *WS_SERIES,
)
LISTENER_SERIES = (
    "requests",
    "errors_5xx",
    "p50",
    "p99",
    "connections",
    "tunnels",
    *WS_SERIES,
)
SERIES = {"server": SERVER_SERIES, "group": GROUP_SERIES, "listener": LISTENER_SERIES}
# The series that are gauges (a value at the sample, not a difference of counters).
GAUGES = frozenset({"up", "servers_up", "connections", "tunnels"})
QUANTILES = {"p50": 0.5, "p99": 0.99}
# A server that is not up has no traffic series at that point: the chart shows a gap. Not its
# WebSocket series: its open tunnels go on (health does not close them), and how they end
# when it dies (1006) is what one looks for there.
DOWN_GAP = frozenset({"requests", "errors_5xx", "p50", "p99", "connections", "tunnels"})


@dataclass(slots=True)
class Reading:
    """One entity's counters at one moment: monotonic ``counters`` (rates are their
    differences), a latency histogram's ``buckets`` and per-bucket ``counts`` (the last one
    is +Inf), and ``gauges``. ``up`` is False for a server not taking traffic."""

    kind: str
    meta: dict[str, str]
    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    buckets: tuple[float, ...] = ()
    counts: list[int] = field(default_factory=list)
    up: bool = True


def quantile(q: float, buckets: tuple[float, ...], counts: list[int]) -> float:
    """The ``q`` quantile of per-bucket ``counts`` (upper ``buckets``, then +Inf), linearly
    interpolated within its bucket as Prometheus' histogram_quantile does; NaN if empty."""
    total = sum(counts)
    if total <= 0:
        return NAN
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if seen + c >= rank and c > 0:
            if i >= len(buckets):  # +Inf: the highest finite bound is all we know
                return buckets[-1] if buckets else NAN
            lower = buckets[i - 1] if i > 0 else 0.0
            return lower + (buckets[i] - lower) * (rank - seen) / c
        seen += c
    return buckets[-1] if buckets else NAN


class Track:
    """One entity's rows at one resolution: ``len(series) * capacity`` doubles."""

    __slots__ = ("kind", "last", "meta", "values", "width")

    def __init__(self, kind: str, meta: dict[str, str], capacity: int) -> None:
        self.kind = kind
        self.meta = meta
        self.width = len(SERIES[kind])
        self.values = array("d", [NAN]) * (self.width * capacity)
        self.last: Reading | None = None  # the previous reading, to take differences from


class Resolution:
    """Every ``interval`` seconds, the last ``capacity`` points of every entity."""

    def __init__(self, interval: float, capacity: int) -> None:
        if interval <= 0 or capacity < 2:
            raise ValueError("a history resolution needs interval > 0 and at least 2 points")
        self.interval = interval
        self.capacity = capacity
        self.times = array("d", [NAN]) * capacity
        self.count = 0  # points written so far; the next goes to count % capacity
        self.last_time = NAN
        self.tracks: dict[str, Track] = {}
        self.seen: dict[str, int] = {}  # key -> the point it last had a reading at

    def due(self, now: float, slack: float) -> bool:
        # ``slack``: half the finest interval, so a tick a little early still takes the point.
        return math.isnan(self.last_time) or now - self.last_time >= self.interval - slack

    def add(self, now: float, readings: dict[str, Reading]) -> None:
        slot = self.count % self.capacity
        dt = now - self.last_time if not math.isnan(self.last_time) else NAN
        self.times[slot] = now
        for key, r in readings.items():
            track = self.tracks.get(key)
            if track is None:
                track = self.tracks[key] = Track(r.kind, r.meta, self.capacity)
            track.meta = r.meta
            row = _row(r, track.last, dt)
            base = slot * track.width
            track.values[base : base + track.width] = row
            track.last = r
            self.seen[key] = self.count
        for key, track in list(self.tracks.items()):
            if key in readings:
                continue
            if self.count - self.seen[key] >= self.capacity:  # all its points aged out
                del self.tracks[key], self.seen[key]
                continue
            base = slot * track.width
            track.values[base : base + track.width] = array("d", [NAN]) * track.width
            track.last = None
        self.count += 1
        self.last_time = now

    def view(self) -> dict[str, object]:
        """Oldest point first; NaN as None (JSON null)."""
        n = min(self.count, self.capacity)
        order = [(self.count - n + i) % self.capacity for i in range(n)]
        out: dict[str, dict[str, object]] = {"server": {}, "group": {}, "listener": {}}
        for key, t in self.tracks.items():
            names = SERIES[t.kind]
            series = {
                name: [_json(t.values[slot * t.width + j]) for slot in order]
                for j, name in enumerate(names)
            }
            out[t.kind][key.split(":", 1)[1]] = {**t.meta, "series": series}
        return {
            "interval": self.interval,
            "points": self.capacity,
            "times": [_json(self.times[slot]) for slot in order],
            "servers": out["server"],
            "groups": out["group"],
            "listeners": out["listener"],
        }


def _json(v: float) -> float | None:
    return None if math.isnan(v) else round(v, 6)


def _row(r: Reading, prev: Reading | None, dt: float) -> array[float]:
    names = SERIES[r.kind]
    row = array("d", [NAN]) * len(names)
    for j, name in enumerate(names):
        if name in GAUGES:
            row[j] = r.gauges.get(name, NAN)
        elif prev is None or not dt > 0:
            continue  # the first reading has nothing to take a difference from
        elif name in QUANTILES:
            if len(prev.counts) == len(r.counts):
                diff = [a - b for a, b in zip(r.counts, prev.counts, strict=True)]
                if min(diff, default=0) >= 0:
                    row[j] = quantile(QUANTILES[name], r.buckets, diff)
        else:
            now, before = r.counters.get(name, NAN), prev.counters.get(name, NAN)
            if now >= before:  # a counter that went down (a restart) has no rate here
                row[j] = (now - before) / dt
        if not r.up and name in DOWN_GAP:
            row[j] = NAN
    return row


@dataclass(frozen=True, slots=True)
class Event:
    time: float
    kind: str  # one of EVENT_KINDS
    text: str
    group: str | None = None
    server: str | None = None

    def view(self) -> dict[str, object]:
        return {
            "time": self.time,
            "kind": self.kind,
            "text": self.text,
            "group": self.group,
            "server": self.server,
        }


EVENT_KINDS = ("health", "reload", "drain", "rebalance", "api", "worker", "dns")


class EventLog:
    """The last ``capacity`` events, with the time ``clock`` gives (wall-clock seconds)."""

    def __init__(self, clock: Callable[[], float], capacity: int = 1000) -> None:
        self.clock = clock
        self.events: deque[Event] = deque(maxlen=capacity)
        # A worker's: each event also handed to the supervisor, whose history is the one shown.
        self.forward: Callable[[Event], None] | None = None

    def record(
        self, kind: str, text: str, group: str | None = None, server: str | None = None
    ) -> None:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = Event(self.clock(), kind, text, group, server)
        self.events.append(event)
        if self.forward is not None:
            self.forward(event)

    def since(self, start: float) -> list[dict[str, object]]:
        return [e.view() for e in self.events if e.time >= start]


class History:
    """The fine and the coarse resolution, fed the same readings."""

    def __init__(self, resolutions: Iterable[tuple[float, int]]) -> None:
        self.resolutions = [Resolution(i, n) for i, n in resolutions]
        self.slack = min(r.interval for r in self.resolutions) / 2

    def add(self, now: float, readings: dict[str, Reading]) -> None:
        for res in self.resolutions:
            if res.due(now, self.slack):
                res.add(now, readings)

    def view(self, events: EventLog, finest_only: bool = False) -> dict[str, object]:
        chosen = self.resolutions[:1] if finest_only else self.resolutions
        views = [r.view() for r in chosen]
        first = [t for v in views for t in v["times"][:1]]  # type: ignore[index]
        start = min((t for t in first if t is not None), default=0.0)
        return {"resolutions": views, "events": events.since(start)}
