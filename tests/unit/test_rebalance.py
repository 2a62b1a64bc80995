"""The rebalance decision (``core.rebalance``): fair shares by effective weight, the
tolerance band both ways, whole tunnels only (no back-and-forth) and the budget."""

from __future__ import annotations

from lbproxy.core.rebalance import Load, plan, shares, within


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
