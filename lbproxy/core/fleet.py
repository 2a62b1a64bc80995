"""The fleet's shared state as pure decisions (no Redis, no clock: the caller passes ``now``).

Owns what ``control.cluster`` (the Redis I/O) decides with:
- ``Entry`` and ``merge_overrides``: a runtime override as the fleet keeps it (what was set,
  by which instance, when) and the merge of this instance's overrides with the fleet's: the
  last writer by timestamp wins, so an override set while Redis was unreachable is written
  when it is back unless another instance set a newer one meanwhile;
- ``Instance`` and ``live_instances``: one instance's published record (its counts per
  server, its totals, its config hash) and which records still count (younger than the
  expiry: a dead instance's counts vanish on their own);
- ``others_counts``: the sum of the other live instances' open connections and tunnels per
  server, which ``wlc`` adds to this instance's live counts (``ServerState.fleet_active``);
- ``others_tunnels``: the other live instances' open tunnels per server, each apart, which
  the rebalance adds to this instance's and apportions its moves by (``core.rebalance``);
- ``odd_configs``: the instances whose config hash differs from the fleet's most common one;
- ``Shed``, ``shed_parts`` and ``due_sheds``: a shed asked for through one instance as the
  fleet keeps it (a short-lived record), a count split over the instances by the tunnels
  each holds on the server (``core.rebalance.apportion``, the rebalance's arithmetic), and
  which records an instance has still to perform (new to it, young, not its own).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .rebalance import apportion


def _dumps(record: object) -> str:
    """A record as the compact JSON every instance writes (one shape for all three kinds)."""
    return json.dumps(asdict(record), separators=(",", ":"))  # type: ignore[call-overload]


def _counts(value: Any) -> dict[str, int]:
    """A record's name -> count mapping as read back (absent or null: empty); a value that
    is not one raises, and the record is ignored."""
    return {str(k): int(v) for k, v in (value or {}).items()}


@dataclass(frozen=True, slots=True)
class Entry:
    """A runtime override as the fleet keeps it: the values in force (None: the config's),
    the instance that set it and when (Unix seconds)."""

    admin_state: str | None
    weight: int | None
    by: str
    at: float

    def dumps(self) -> str:
        return _dumps(self)

    @staticmethod
    def loads(text: str | bytes) -> Entry | None:
        """The entry another instance wrote, or None when it is not one (a foreign or
        damaged value is ignored rather than applied)."""
        try:
            d = json.loads(text)
            admin_state, weight = d.get("admin_state"), d.get("weight")
            if admin_state not in (None, "ready", "drain"):
                return None
            if weight is not None and (isinstance(weight, bool) or not isinstance(weight, int)):
                return None
            return Entry(admin_state, weight, str(d["by"]), float(d["at"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def merge_overrides(
    local: Mapping[str, Entry], remote: Mapping[str, Entry]
) -> tuple[dict[str, Entry], dict[str, Entry]]:
    """Last writer by timestamp. Returns (what this instance must apply: the fleet's newer
    entries, what it must write: its own newer or unknown-to-the-fleet entries)."""
    apply: dict[str, Entry] = {}
    write: dict[str, Entry] = {}
    for sid, entry in remote.items():
        known = local.get(sid)
        if known is None or entry.at > known.at:
            apply[sid] = entry
    for sid, entry in local.items():
        known = remote.get(sid)
        if known is None or entry.at > known.at:
            write[sid] = entry
    return apply, write


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance's record, as it publishes it about twice a second."""

    name: str
    address: str  # its listeners' addresses, comma separated
    version: str
    build: str
    started: float  # Unix seconds
    config: str  # sha256 of its config file
    connections: int  # open client connections
    tunnels: int  # open WebSocket tunnels
    rps: float  # requests per second over the last period
    at: float  # when it wrote this record (Unix seconds)
    servers: dict[str, int] = field(default_factory=dict)  # server id -> open requests+tunnels
    # server id -> open tunnels (absent from an older instance's record: read as none)
    websockets: dict[str, int] = field(default_factory=dict)

    def dumps(self) -> str:
        return _dumps(self)

    @staticmethod
    def loads(text: str | bytes) -> Instance | None:
        try:
            d: dict[str, Any] = json.loads(text)
            return Instance(
                name=str(d["name"]),
                address=str(d.get("address", "")),
                version=str(d.get("version", "")),
                build=str(d.get("build", "")),
                started=float(d.get("started", 0.0)),
                config=str(d.get("config", "")),
                connections=int(d.get("connections", 0)),
                tunnels=int(d.get("tunnels", 0)),
                rps=float(d.get("rps", 0.0)),
                at=float(d["at"]),
                servers=_counts(d.get("servers")),
                websockets=_counts(d.get("websockets")),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def live_instances(records: Iterable[Instance | None], now: float, expiry: float) -> list[Instance]:
    """The records written within ``expiry`` seconds of ``now``, by name."""
    out = [r for r in records if r is not None and now - r.at <= expiry]
    return sorted(out, key=lambda r: r.name)


def others_counts(instances: Iterable[Instance], me: str) -> dict[str, int]:
    """Open requests and tunnels per server id on every instance but ``me``."""
    out: dict[str, int] = {}
    for inst in instances:
        if inst.name == me:
            continue
        for sid, n in inst.servers.items():
            if n > 0:
                out[sid] = out.get(sid, 0) + n
    return out


def others_tunnels(instances: Iterable[Instance], me: str) -> dict[str, dict[str, int]]:
    """Open tunnels per server id of every instance but ``me`` (those holding any), by name."""
    out: dict[str, dict[str, int]] = {}
    for inst in instances:
        held = {sid: n for sid, n in inst.websockets.items() if n > 0}
        if inst.name != me and held:
            out[inst.name] = held
    return out


def odd_configs(instances: Iterable[Instance]) -> set[str]:
    """Names of the instances whose config hash is not the fleet's most common one (none
    when every instance agrees; on a tie, the hash of the earliest name counts as the
    fleet's)."""
    listed = list(instances)
    if not listed:
        return set()
    counts = Counter(i.config for i in listed)
    best = max(counts.values())
    common = next(i.config for i in listed if counts[i.config] == best)
    return {i.name for i in listed if i.config != common}


@dataclass(frozen=True, slots=True)
class Shed:
    """A shed asked for through one instance (``by``), as it tells the fleet: every other
    instance sheds its part of its own tunnels on ``server`` over ``over`` seconds, the same
    ``fraction`` of its own, or its entry in ``parts`` (a ``count`` split by ``held``: the
    tunnels each instance held there, as the asking instance knew them)."""

    id: str
    by: str
    at: float  # Unix seconds
    server: str
    fraction: float | None
    count: int | None
    over: float
    held: dict[str, int] = field(default_factory=dict)
    parts: dict[str, int] = field(default_factory=dict)

    def dumps(self) -> str:
        return _dumps(self)

    @staticmethod
    def loads(text: str | bytes) -> Shed | None:
        """The record, or None when it is not one (ignored, never performed)."""
        try:
            d: dict[str, Any] = json.loads(text)
            fraction, count = d.get("fraction"), d.get("count")
            if (fraction is None) == (count is None):
                return None
            return Shed(
                id=str(d["id"]),
                by=str(d["by"]),
                at=float(d["at"]),
                server=str(d["server"]),
                fraction=None if fraction is None else min(1.0, max(0.0, float(fraction))),
                count=None if count is None else max(0, int(count)),
                over=max(0.0, float(d.get("over", 0.0))),
                held=_counts(d.get("held")),
                parts=_counts(d.get("parts")),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None


def member_of(name: str, instance: str) -> bool:
    """Whether the member ``name`` is ``instance`` or one of its workers (``<instance>.<pid>``)."""
    return name == instance or name.startswith(instance + ".")


def shed_parts(count: int, held: Mapping[str, int]) -> dict[str, int]:
    """``count`` tunnels of one server split over the instances by the tunnels each holds
    there (``held``), as the rebalance splits a server's excess: the parts add up to
    ``count`` (or to all held, when fewer) and none exceeds what its instance holds."""
    return apportion(count, held)


def due_sheds(
    records: Iterable[Shed], seen: Mapping[str, float], member: str, now: float, max_age: float
) -> list[Shed]:
    """The sheds ``member`` has still to perform, oldest first: not yet seen (by id), asked
    for within ``max_age`` seconds of ``now`` (an instance that comes later, or back after an
    outage, does not replay an old one), and not asked through its own instance (which
    performed its part when asked)."""
    out = [
        r
        for r in records
        if r.id not in seen and now - r.at <= max_age and not member_of(member, r.by)
    ]
    return sorted(out, key=lambda r: (r.at, r.id))
