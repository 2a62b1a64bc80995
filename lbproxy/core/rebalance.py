"""Rebalance: which servers of a group hold more WebSockets than their fair share, and how
many tunnels to move off each, within a budget.

Owns the decision only (the I/O layer, ``control.rebalance``, closes the tunnels). The fair
share of a server is the group's tunnels spread by effective weight over the servers that
take new ones. The spread is *out of tolerance* when some server holds more than
``tolerance`` times its share, or less than its share divided by ``tolerance``; only then
does anything move, and then each server above its share gives up its whole excess (rounded
down, so that moving a tunnel always brings it nearer its share and two servers never trade
the same tunnel back and forth), the largest excess first, at most ``budget`` in all.

In a fleet (``cluster``) the loads are the fleet's (``fleet_loads``: this instance's tunnels
plus what the others published) and the plan is the fleet's excess; each instance closes
only its share of each server's excess (``portion``: the excess apportioned by the tunnels
each instance holds there, largest remainders first, so that the instances' shares add up
to the excess exactly and none exceeds what it holds), at most its own ``budget``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


@dataclass(frozen=True, slots=True)
class Load:
    """One server that takes new tunnels: its id, open tunnels and effective weight (> 0)."""

    id: str
    tunnels: int
    weight: int


class Idles(Protocol):
    """What the order of moves reads of a tunnel: its last activity (loop time, whole
    milliseconds under uvloop) and its start (monotonic, finer)."""

    @property
    def last(self) -> float: ...

    @property
    def started(self) -> float: ...


T = TypeVar("T", bound=Idles)


def idlest_last(tunnels: Sequence[T]) -> list[T]:
    """The tunnels in the order a move takes them from the end (``pop``): the one idle
    longest last, and among those idle since the same tick (tunnels opened within one
    millisecond, nothing sent since) the oldest, never the order of the set they came from."""
    return sorted(tunnels, key=lambda t: (t.last, t.started), reverse=True)


def shares(loads: Sequence[Load]) -> dict[str, float]:
    """Each server's fair share of the group's tunnels."""
    total = sum(x.tunnels for x in loads)
    weights = sum(x.weight for x in loads)
    if weights <= 0:
        return {x.id: 0.0 for x in loads}
    return {x.id: total * x.weight / weights for x in loads}


def within(loads: Sequence[Load], tolerance: float) -> bool:
    """Whether every server's tunnels are within ``tolerance`` of its fair share (a server's
    count off by less than one tunnel always is: there is nothing finer to move)."""
    fair = shares(loads)
    for x in loads:
        share = fair[x.id]
        if x.tunnels > share * tolerance and x.tunnels - share >= 1:
            return False
        if x.tunnels < share / tolerance and share - x.tunnels >= 1:
            return False
    return True


def plan(loads: Sequence[Load], tolerance: float, budget: int) -> dict[str, int]:
    """How many tunnels to close on each server (ids absent: none); empty when within
    tolerance, when fewer than two servers take new tunnels, or with no budget."""
    if budget <= 0 or len(loads) < 2 or within(loads, tolerance):
        return {}
    fair = shares(loads)
    excess = {x.id: int(x.tunnels - fair[x.id]) for x in loads if x.tunnels - fair[x.id] >= 1}
    return take(excess, budget)


def take(excess: Mapping[str, int], budget: int) -> dict[str, int]:
    """At most ``budget`` of ``excess`` (server id -> tunnels to move), one at a time from
    the server with the most left (ties: the greater id), so a short budget evens out the
    largest excesses first."""
    left = {sid: n for sid, n in excess.items() if n > 0}
    out: dict[str, int] = {}
    while budget > 0 and left:
        sid = max(left, key=lambda k: (left[k], k))
        out[sid] = out.get(sid, 0) + 1
        budget -= 1
        left[sid] -= 1
        if left[sid] <= 0:
            del left[sid]
    return out


def fleet_loads(mine: Sequence[Load], others: Mapping[str, Mapping[str, int]]) -> list[Load]:
    """``mine`` (this instance's servers that take new tunnels) with the tunnels the other
    instances hold on each added (``others``: instance -> server id -> tunnels)."""
    return [
        Load(x.id, x.tunnels + sum(held.get(x.id, 0) for held in others.values()), x.weight)
        for x in mine
    ]


def apportion(excess: int, held: Mapping[str, int]) -> dict[str, int]:
    """``excess`` tunnels of one server split among the instances by the tunnels each holds
    there (``held``: instance -> tunnels): each gets the floor of its proportional part,
    and what is left goes one each to the largest remainders (ties: the smaller name), so
    the parts add up to ``excess`` (or to all held, when fewer) and none exceeds its own.
    Every instance computing this from the same counts gets the same split."""
    total = sum(n for n in held.values() if n > 0)
    if excess <= 0 or total <= 0:
        return {}
    excess = min(excess, total)
    parts = {name: excess * n // total for name, n in held.items() if n > 0}
    rest = excess - sum(parts.values())
    # Remainders compared exactly (integers): excess * n mod total.
    order = sorted(parts, key=lambda k: (-(excess * held[k] % total), k))
    for name in order[:rest]:
        parts[name] += 1
    return {name: n for name, n in parts.items() if n > 0}


def portion(
    moves: Mapping[str, int],
    mine: Mapping[str, int],
    others: Mapping[str, Mapping[str, int]],
    me: str,
    budget: int,
) -> dict[str, int]:
    """This instance's part of the fleet's ``moves`` (server id -> tunnels, from ``plan`` on
    ``fleet_loads``): per server, ``apportion`` by the tunnels each instance holds there
    (``mine``: this instance's, under ``me``; ``others``: the rest of the fleet), never more
    than this instance holds, at most ``budget`` in all (``take``)."""
    out: dict[str, int] = {}
    for sid, n in moves.items():
        held = {name: counts.get(sid, 0) for name, counts in others.items() if name != me}
        held[me] = mine.get(sid, 0)
        part = apportion(n, held).get(me, 0)
        if part > 0:
            out[sid] = part
    return take(out, budget)
