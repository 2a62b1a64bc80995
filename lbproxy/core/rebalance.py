"""Rebalance: which servers of a group hold more WebSockets than their fair share, and how
many tunnels to move off each, within a budget.

Owns the decision only (the I/O layer, ``control.rebalance``, closes the tunnels). The fair
share of a server is the group's tunnels spread by effective weight over the servers that
take new ones. The spread is *out of tolerance* when some server holds more than
``tolerance`` times its share, or less than its share divided by ``tolerance``; only then
does anything move, and then each server above its share gives up its whole excess (rounded
down, so that moving a tunnel always brings it nearer its share and two servers never trade
the same tunnel back and forth), the largest excess first, at most ``budget`` in all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Load:
    """One server that takes new tunnels: its id, open tunnels and effective weight (> 0)."""

    id: str
    tunnels: int
    weight: int


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
    out: dict[str, int] = {}
    while budget > 0 and excess:
        sid = max(excess, key=lambda k: (excess[k], k))
        out[sid] = out.get(sid, 0) + 1
        budget -= 1
        excess[sid] -= 1
        if excess[sid] <= 0:
            del excess[sid]
    return out
