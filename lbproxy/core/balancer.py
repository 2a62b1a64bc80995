"""Schedulers: which server of a group gets the next request.

This module owns the choice among candidates and nothing else. The caller filters first:
it passes only servers that are available (health), in config order, minus any already
tried for this request, and it keeps ``active`` (open connections, WebSocket tunnels
included) up to date. A scheduler never sees sockets or clocks.

Rules every scheduler follows
    - Schedulers read a candidate's ``effective`` weight: ``weight * slow_start.SCALE``, less
      while the server ramps up after joining (slow start). A candidate whose effective
      weight is 0 is never chosen (it is draining). If nothing is left, ``pick`` returns None.
    - State is keyed by server id, never by position, so a scheduler handed over to a
      new configuration (``make_scheduler(name, previous)``) carries on where it was:
      no re-warming, no burst onto one server after a reload.
    - ``pick`` runs once per request; rr, wrr and wlc allocate nothing per call.

The schedulers
    rr   round-robin ignoring weights, continuing after the last picked server even when
         the candidate list changed under it; a ramping server takes its turn only in the
         proportion its ramp has reached.
    wrr  nginx's smooth weighted round-robin.
    wlc  weighted least connections, ties taken in round-robin order. The connections
         counted are ``active + fleet_active``: with ``cluster`` the other instances'
         published counts too, so a fleet balances as one balancer would.
    sh   consistent hashing of ``key`` (the client address) on a ring of virtual nodes;
         without a key it behaves as rr. A ramping server keeps the part of its keys its
         ramp has reached (the same keys, growing), the others go where they would without it.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Final, Protocol, TypeVar

from ..config.model import SCHEDULERS
from .slow_start import SCALE

__all__ = [
    "SCHEDULERS",
    "Candidate",
    "ConsistentHash",
    "RoundRobin",
    "Scheduler",
    "SmoothWeightedRoundRobin",
    "WeightedLeastConnections",
    "make_scheduler",
]


class Candidate(Protocol):
    # Read-only properties so plain attributes, properties and frozen dataclasses all fit.
    @property
    def id(self) -> str: ...
    @property
    def weight(self) -> int: ...
    @property
    def effective(self) -> int:
        """``weight * SCALE``, less during slow start; what the schedulers compare."""
        ...

    @property
    def active(self) -> int: ...
    @property
    def fleet_active(self) -> int: ...  # the other instances' count (``cluster``), else 0


C = TypeVar("C", bound=Candidate)


class Scheduler(Protocol):
    @property
    def name(self) -> str: ...

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        """Choose one of ``candidates``, or None when none can be chosen."""
        ...


class _Cursor:
    """Where round-robin continues: just after the server picked last.

    The id is remembered, not just the index, so that a server joining or leaving
    elsewhere in the list does not shift the rotation. When the last picked server is
    itself gone (down, or excluded as already tried), its old index is where the
    server that followed it now sits, so the rotation continues from there.
    """

    __slots__ = ("last_id", "last_pos")

    def __init__(self) -> None:
        self.last_id: str | None = None
        self.last_pos: int = -1

    def start(self, candidates: Sequence[Candidate]) -> int:
        """Index to start looking from (may equal len(candidates); take it modulo)."""
        pos = self.last_pos
        if 0 <= pos < len(candidates) and candidates[pos].id == self.last_id:
            return pos + 1
        for i, c in enumerate(candidates):
            if c.id == self.last_id:
                return i + 1
        return max(pos, 0)

    def moved_to(self, candidate: Candidate, pos: int) -> None:
        self.last_id = candidate.id
        self.last_pos = pos


class RoundRobin:
    __slots__ = ("_credit", "_cursor")

    name: Final = "rr"

    def __init__(self) -> None:
        self._cursor = _Cursor()
        # A ramping server's credit (slow start): it earns its effective weight each time
        # its turn comes and is picked once the credit reaches its full weight.
        self._credit: dict[str, int] = {}

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        n = len(candidates)
        start = self._cursor.start(candidates)
        fallback: C | None = None
        fallback_pos = -1
        for step in range(n):
            pos = (start + step) % n
            c = candidates[pos]
            eff = c.effective
            if eff > 0:
                full = c.weight * SCALE
                if eff < full:
                    credit = self._credit.get(c.id, 0) + eff
                    if credit < full:
                        self._credit[c.id] = credit
                        if fallback is None:
                            fallback, fallback_pos = c, pos
                        continue
                    self._credit[c.id] = credit - full
                self._cursor.moved_to(c, pos)
                return c
        if fallback is not None:  # only ramping servers are left: one of them, still
            self._cursor.moved_to(fallback, fallback_pos)
        return fallback


class SmoothWeightedRoundRobin:
    """nginx's ``ngx_http_upstream_get_peer``: every pick each candidate's current
    weight grows by its weight, the largest wins and pays back the total. Over any
    window each server gets its exact share, spread out rather than in runs."""

    __slots__ = ("_current",)

    name: Final = "wrr"

    # Ids of servers no longer configured would otherwise stay forever; pruning only
    # past this slack keeps the common case (a server briefly down or excluded for a
    # retry) from losing its place.
    _PRUNE_SLACK: Final = 16

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        current = self._current
        best: C | None = None
        best_weight = 0
        total = 0
        for c in candidates:
            weight = c.effective
            if weight <= 0:
                continue
            cw = current.get(c.id, 0) + weight
            current[c.id] = cw
            total += weight
            # Strict ">" keeps nginx's tie-break: the first in config order wins.
            if best is None or cw > best_weight:
                best = c
                best_weight = cw
        if best is None:
            return None
        current[best.id] = best_weight - total
        if len(current) > 2 * len(candidates) + self._PRUNE_SLACK:
            self._current = {c.id: current.get(c.id, 0) for c in candidates}
        return best


class WeightedLeastConnections:
    """Fewest ``active + fleet_active`` (the fleet's count with ``cluster``) per unit of
    effective weight; among equals, round-robin, in which a ramping server (slow start) takes
    its turn only in the proportion its ramp has reached (as ``RoundRobin`` does): with short
    requests every server often has 0 active, and a tie must not hand a fresh server a full
    share."""

    __slots__ = ("_credit", "_cursor")

    name: Final = "wlc"

    def __init__(self) -> None:
        self._cursor = _Cursor()
        self._credit: dict[str, int] = {}

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        n = len(candidates)
        start = self._cursor.start(candidates)
        best: C | None = None
        best_pos = -1
        best_load = 0
        for step in range(n):
            pos = (start + step) % n
            c = candidates[pos]
            if c.effective <= 0:
                continue
            load = c.active + c.fleet_active
            # a.load/a.effective < b.load/b.effective, cross-multiplied to stay exact.
            # Strict "<" makes the first equal one after the cursor win the tie.
            if best is None or load * best.effective < best_load * c.effective:
                best = c
                best_pos = pos
                best_load = load
        if best is None:
            return None
        full = best.weight * SCALE
        if best.effective < full:
            credit = self._credit.get(best.id, 0) + best.effective
            if credit < full:
                self._credit[best.id] = credit
                # Not its turn yet: the next one tied with it, if any, takes this pick.
                for step in range(1, n):
                    pos = (best_pos + step) % n
                    c = candidates[pos]
                    load = c.active + c.fleet_active
                    if c.effective > 0 and load * best.effective == best_load * c.effective:
                        best, best_pos, best_load = c, pos, load
                        break
            else:
                self._credit[best.id] = credit - full
        self._cursor.moved_to(best, best_pos)
        return best


def _hash64(data: str) -> int:
    # blake2b, not hash(): the ring must be the same in every process and every run
    # (PYTHONHASHSEED), or a restart would move every client.
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class _Ring:
    __slots__ = ("owners", "points")

    def __init__(self, ids: Sequence[str], vnodes: int) -> None:
        # Sorted by (point, id) so that the ring does not depend on the order of ids.
        nodes = sorted(
            (_hash64(f"{server_id}#{i}"), server_id, index)
            for index, server_id in enumerate(ids)
            for i in range(vnodes)
        )
        self.points: list[int] = [point for point, _, _ in nodes]
        # Index into the ids tuple the ring was built for.
        self.owners: list[int] = [index for _, _, index in nodes]

    def lookup(self, key: str) -> int:
        i = bisect.bisect_left(self.points, _hash64(key))
        return self.owners[i if i < len(self.owners) else 0]


class ConsistentHash:
    """Source hashing on a ring: removing one of N servers moves only its ~1/N of keys.

    Every server with weight > 0 gets the same number of virtual nodes: weight decides
    presence, not share, because a share that followed weight would move keys whenever
    an operator retuned weights. Rings are cached per tuple of eligible ids; a few are
    kept so that flapping or a retry that excludes one server does not rebuild each time.
    """

    __slots__ = ("_fallback", "_rings", "_vnodes")

    name: Final = "sh"

    VNODES: Final = 160
    _MAX_RINGS: Final = 8

    def __init__(self, vnodes: int = VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        self._vnodes = vnodes
        self._rings: dict[tuple[str, ...], _Ring] = {}
        self._fallback = RoundRobin()

    def pick(self, candidates: Sequence[C], key: str | None = None) -> C | None:
        if key is None:
            return self._fallback.pick(candidates)
        eligible = [c for c in candidates if c.effective > 0]
        if not eligible:
            return None
        chosen = eligible[self._ring(eligible).lookup(key)]
        full = chosen.weight * SCALE
        # Slow start: the key stays only if it falls in the part the ramp has reached (a
        # hash of its own, so the kept keys are the same ones as the ramp grows).
        if (
            chosen.effective < full
            and len(eligible) > 1
            and _hash64(f"{key}#ramp") % full >= chosen.effective
        ):
            rest = [c for c in eligible if c is not chosen]
            chosen = rest[self._ring(rest).lookup(key)]
        return chosen

    def _ring(self, eligible: Sequence[Candidate]) -> _Ring:
        ids = tuple(c.id for c in eligible)
        ring = self._rings.pop(ids, None)
        if ring is None:
            ring = _Ring(ids, self._vnodes)
            if len(self._rings) >= self._MAX_RINGS:
                del self._rings[next(iter(self._rings))]
        self._rings[ids] = ring  # re-inserted last: the dict order is least recently used
        return ring


_FACTORIES: Final[Mapping[str, Callable[[], Scheduler]]] = {
    "rr": RoundRobin,
    "wrr": SmoothWeightedRoundRobin,
    "wlc": WeightedLeastConnections,
    "sh": ConsistentHash,
}
assert tuple(_FACTORIES) == SCHEDULERS, "the config's scheduler names are the balancer's"


def make_scheduler(name: str, previous: Scheduler | None = None) -> Scheduler:
    """A scheduler called ``name``; ``previous`` itself if it already is one.

    Handing back ``previous`` is what carries rotation and weight state across a
    config reload. Unknown names raise ValueError.
    """
    factory = _FACTORIES.get(name)
    if factory is None:
        raise ValueError(f"unknown scheduler {name!r} (expected one of {', '.join(SCHEDULERS)})")
    if previous is not None and previous.name == name:
        return previous
    return factory()
