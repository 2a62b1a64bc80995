"""The rebalance decision (``core.rebalance``): fair shares by effective weight, the
tolerance band both ways, whole tunnels only (no back-and-forth) and the budget; in a fleet,
each instance's part of the fleet's excess."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from lbproxy.core.rebalance import (
    Load,
    apportion,
    fleet_loads,
    idlest_last,
    plan,
    portion,
    shares,
    take,
    within,
)


def test_scale_out_moves_the_excess_of_the_old_servers() -> None:
    loads = [Load("a", 100, 16), Load("b", 100, 16), Load("c", 0, 16)]
    assert not within(loads, 1.25)
    got = plan(loads, 1.25, budget=1000)
    assert got == {"a": 33, "b": 33}  # down to their share (66.7), whole tunnels


def test_budget_caps_the_round_and_takes_the_largest_excess_first() -> None:
    loads = [Load("a", 120, 16), Load("b", 80, 16), Load("c", 0, 16)]
    got = plan(loads, 1.25, budget=10)
    assert sum(got.values()) == 10
    assert got["a"] > got.get("b", 0)


def test_shares_follow_effective_weight() -> None:
    loads = [Load("a", 88, 32), Load("b", 32, 16)]
    assert shares(loads) == {"a": 80.0, "b": 40.0}
    assert within(loads, 1.25)  # 88 <= 100 and 32 >= 32
    assert plan(loads, 1.25, 100) == {}


def test_an_underloaded_server_alone_is_out_of_tolerance() -> None:
    # Every server within 1.25x above its share, but c far below its own: still moves.
    loads = [Load("a", 80, 16), Load("b", 80, 16), Load("c", 40, 16)]
    assert not within(loads, 1.25)
    assert plan(loads, 1.25, 100) == {"a": 13, "b": 13}


def test_small_counts_never_flip_flop() -> None:
    assert plan([Load("a", 2, 16), Load("b", 1, 16)], 1.25, 10) == {}
    assert plan([Load("a", 1, 16), Load("b", 0, 16)], 1.25, 10) == {}


def test_nothing_to_do() -> None:
    assert plan([Load("a", 100, 16)], 1.25, 10) == {}  # one server
    assert plan([Load("a", 100, 16), Load("b", 0, 16)], 1.25, 0) == {}  # no budget
    assert plan([Load("a", 0, 16), Load("b", 0, 16)], 1.25, 10) == {}  # no tunnels


def _fleet_parts(
    held: dict[str, dict[str, int]], weights: dict[str, int], tolerance: float, budget: int
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """The fleet's moves, and each instance's part as it computes it from its own view."""
    parts: dict[str, dict[str, int]] = {}
    moves: dict[str, int] = {}
    for me, counts in held.items():
        mine = [Load(sid, counts.get(sid, 0), w) for sid, w in weights.items()]
        others = {k: v for k, v in held.items() if k != me}
        fleet = fleet_loads(mine, others)
        moves = plan(fleet, tolerance, sum(x.tunnels for x in fleet))
        parts[me] = portion(moves, counts, others, me, budget)
    return moves, parts


def test_three_instances_move_the_fleet_s_excess_between_them() -> None:
    # Clients landed unevenly: each instance's own spread looks fine or nearly, the fleet's
    # is far out (c was added: it holds nothing anywhere).
    held = {
        "lb-1": {"a": 40, "b": 2, "c": 0},
        "lb-2": {"a": 5, "b": 30, "c": 0},
        "lb-3": {"a": 15, "b": 18, "c": 0},
    }
    weights = {"a": 16, "b": 16, "c": 16}
    moves, parts = _fleet_parts(held, weights, 1.25, 1000)
    assert moves == {"a": 23, "b": 13}  # 60 and 50 down to the share, 36.7
    for sid, n in moves.items():
        got = [parts[me].get(sid, 0) for me in held]
        assert sum(got) == n  # exactly the excess: no over-move, none left
        assert all(parts[me].get(sid, 0) <= held[me][sid] for me in held)
    # By the tunnels each holds there: lb-1 holds 40 of a's 60.
    assert parts["lb-1"]["a"] == 15 and parts["lb-2"]["b"] == 8
    # Evening out only its own tunnels, lb-1 would move nothing off b and lb-2 nothing off a.
    assert plan([Load(s, held["lb-1"][s], 16) for s in weights], 1.25, 1000).get("b", 0) == 0


def test_fleet_parts_add_up_within_one_tunnel_and_never_exceed_what_is_held() -> None:
    rnd = random.Random(7)
    weights = {"a": 16, "b": 32, "c": 16, "d": 8}
    for _ in range(300):
        held = {
            f"lb-{i}": {sid: rnd.choice([0, 0, 1, 3, rnd.randrange(200)]) for sid in weights}
            for i in range(rnd.randint(2, 4))
        }
        moves, parts = _fleet_parts(held, weights, 1.1, 10**6)
        for sid, n in moves.items():
            total = sum(parts[me].get(sid, 0) for me in held)
            assert n - 1 <= total <= n
            for me in held:
                assert parts[me].get(sid, 0) <= held[me][sid]
        for me in held:  # nothing off a server without excess
            assert set(parts[me]) <= set(moves)


def test_each_instance_s_part_is_capped_by_its_own_budget() -> None:
    held = {"lb-1": {"a": 100, "b": 0}, "lb-2": {"a": 100, "b": 0}}
    moves, parts = _fleet_parts(held, {"a": 16, "b": 16}, 1.25, 10)
    assert moves == {"a": 100}
    assert parts == {"lb-1": {"a": 10}, "lb-2": {"a": 10}}  # the rate per instance
    assert take({"a": 5, "b": 3}, 4) == {"a": 3, "b": 1}


def test_apportion_rounds_by_the_largest_remainder() -> None:
    assert apportion(2, {"x": 1, "y": 1, "z": 1}) == {"x": 1, "y": 1}  # ties: the name
    assert apportion(10, {"x": 3, "y": 0}) == {"x": 3}  # never more than held
    assert apportion(0, {"x": 3}) == {} and apportion(4, {}) == {}
    for n, counts in itertools.product(range(12), [(1, 2, 3), (5, 0, 5), (7, 7, 7)]):
        got = apportion(n, dict(zip("xyz", counts, strict=True)))
        assert sum(got.values()) == min(n, sum(counts))


@dataclass
class _Tunnel:
    name: str
    last: float
    started: float


def test_moves_take_the_idlest_first_and_the_oldest_of_a_tie() -> None:
    # uvloop's clock moves in whole milliseconds: tunnels opened within one tick and silent
    # since share ``last``; the oldest of them goes first, whatever order they came in.
    tick = [_Tunnel(n, 5.0, s) for n, s in (("t3", 0.3), ("t1", 0.1), ("t2", 0.2))]
    busy = _Tunnel("busy", 9.0, 0.05)
    idle = _Tunnel("idle", 1.0, 0.9)
    queue = idlest_last([*tick, busy, idle])
    taken = [queue.pop().name for _ in range(5)]
    assert taken == ["idle", "t1", "t2", "t3", "busy"]
    for order in itertools.permutations(tick):
        assert idlest_last(list(order))[-1].name == "t1"
