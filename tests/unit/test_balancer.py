"""Schedulers: rr, smooth wrr, wlc, consistent-hash sh."""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

import pytest

from lbproxy.core.balancer import (
    SCHEDULERS,
    Candidate,
    ConsistentHash,
    RoundRobin,
    Scheduler,
    SmoothWeightedRoundRobin,
    WeightedLeastConnections,
    make_scheduler,
)
from lbproxy.core.slow_start import SCALE


@dataclass(slots=True)
class Srv:
    id: str
    weight: int = 100
    active: int = 0
    fleet_active: int = 0
    ramp: int | None = None  # slow start: the effective weight in force, None: full

    @property
    def effective(self) -> int:
        return self.weight * SCALE if self.ramp is None else min(self.ramp, self.weight * SCALE)


@dataclass(frozen=True, slots=True)
class FrozenSrv:
    id: str
    weight: int
    active: int
    fleet_active: int = 0

    @property
    def effective(self) -> int:
        return self.weight * SCALE


def servers(*names: str, weight: int = 100) -> list[Srv]:
    return [Srv(f"rs1/{n}", weight) for n in names]


def ids(picked: list[Srv | None]) -> list[str]:
    return [p.id.removeprefix("rs1/") if p is not None else "-" for p in picked]


def picks(s: Scheduler, cands: list[Srv], n: int, key: str | None = None) -> list[str]:
    return ids([s.pick(cands, key) for _ in range(n)])


def clients(n: int) -> list[str]:
    return [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(n)]


# --- shared rules -----------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULERS)
def test_empty_candidates_give_none(name: str) -> None:
    assert make_scheduler(name).pick([]) is None
    assert make_scheduler(name).pick([], "10.0.0.1") is None


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("key", [None, "10.0.0.1"])
def test_weight_zero_is_never_chosen(name: str, key: str | None) -> None:
    s = make_scheduler(name)
    cands = [Srv("a", 0), Srv("b", 10), Srv("c", 0), Srv("d", 10)]
    seen = set()
    for i in range(200):
        c = s.pick(cands, None if key is None else f"10.0.{i}.1")
        assert c is not None
        seen.add(c.id)
    assert seen == {"b", "d"}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_all_weight_zero_gives_none(name: str) -> None:
    s = make_scheduler(name)
    cands = [Srv("a", 0), Srv("b", 0)]
    assert s.pick(cands) is None
    assert s.pick(cands, "10.0.0.1") is None


@pytest.mark.parametrize("name", SCHEDULERS)
def test_draining_a_server_moves_traffic_off_it(name: str) -> None:
    s = make_scheduler(name)
    cands = servers("a", "b", "c")
    picks(s, cands, 10)
    cands[1].weight = 0
    assert "b" not in picks(s, cands, 30) + picks(s, cands, 30, key="10.1.2.3")


@pytest.mark.parametrize("name", SCHEDULERS)
def test_accepts_any_candidate_shape(name: str) -> None:
    cands = [FrozenSrv("a", 1, 0), FrozenSrv("b", 1, 0)]
    picked = make_scheduler(name).pick(cands, "10.0.0.1")
    assert isinstance(picked, FrozenSrv)


def test_make_scheduler_types_and_names() -> None:
    expected = {
        "rr": RoundRobin,
        "wrr": SmoothWeightedRoundRobin,
        "wlc": WeightedLeastConnections,
        "sh": ConsistentHash,
    }
    assert set(expected) == set(SCHEDULERS)
    for name, cls in expected.items():
        s = make_scheduler(name)
        assert isinstance(s, cls)
        assert s.name == name


@pytest.mark.parametrize("name", SCHEDULERS)
def test_make_scheduler_keeps_previous_of_same_name(name: str) -> None:
    prev = make_scheduler(name)
    assert make_scheduler(name, prev) is prev
    other = next(n for n in SCHEDULERS if n != name)
    fresh = make_scheduler(other, prev)
    assert fresh is not prev and fresh.name == other


@pytest.mark.parametrize("bad", ["", "RR", "lc", "random", "round_robin"])
def test_make_scheduler_rejects_unknown_names(bad: str) -> None:
    with pytest.raises(ValueError, match=r"unknown scheduler .*rr, wrr, wlc, sh"):
        make_scheduler(bad)
    with pytest.raises(ValueError):
        make_scheduler(bad, make_scheduler("rr"))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedulers_are_slotted(name: str) -> None:
    s = make_scheduler(name)
    with pytest.raises(AttributeError):
        s.extra = 1  # type: ignore[attr-defined]


def test_candidate_protocol_is_structural() -> None:
    c: Candidate = Srv("a")
    assert c.id == "a"


# --- rr ---------------------------------------------------------------------------------


def test_rr_alternates_and_ignores_weights() -> None:
    s = make_scheduler("rr")
    cands = [Srv("rs1/a", 1), Srv("rs1/b", 100), Srv("rs1/c", 7)]
    assert picks(s, cands, 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_rr_last_picked_server_disappears() -> None:
    s = make_scheduler("rr")
    a, _b, c = cands = servers("a", "b", "c")
    assert picks(s, cands, 2) == ["a", "b"]
    # b goes down (or is excluded as already tried): continue with c, not a again.
    assert picks(s, [a, c], 3) == ["c", "a", "c"]


def test_rr_last_picked_server_was_at_the_end() -> None:
    s = make_scheduler("rr")
    a, b, _c = cands = servers("a", "b", "c")
    assert picks(s, cands, 3) == ["a", "b", "c"]
    assert picks(s, [a, b], 2) == ["a", "b"]


def test_rr_other_server_leaves_or_joins() -> None:
    s = make_scheduler("rr")
    a, b, c = cands = servers("a", "b", "c")
    assert picks(s, cands, 2) == ["a", "b"]
    assert picks(s, [b, c], 1) == ["c"]  # a left: position shifted, rotation did not
    d = Srv("rs1/d")
    assert picks(s, [d, a, b, c], 5) == ["d", "a", "b", "c", "d"]


def test_rr_no_double_pick_when_set_changes() -> None:
    s = make_scheduler("rr")
    cands = servers(*"abcde")
    last = None
    for i in range(500):
        # Each request sees a different server missing, as with retries and flapping.
        subset = [c for j, c in enumerate(cands) if j != i % 5]
        picked = s.pick(subset)
        assert picked is not None
        assert picked.id != last
        last = picked.id


def test_rr_fair_over_many_picks() -> None:
    s = make_scheduler("rr")
    counts = collections.Counter(picks(s, servers("a", "b", "c", "d"), 400))
    assert set(counts.values()) == {100}


def test_rr_retry_excluding_tried_server_gets_next() -> None:
    s = make_scheduler("rr")
    cands = servers("a", "b", "c")
    first = s.pick(cands)
    assert first is not None
    retry = s.pick([c for c in cands if c is not first])
    assert retry is not None and retry is not first


# --- wrr --------------------------------------------------------------------------------


def test_wrr_smooth_sequence_matches_nginx() -> None:
    # Worked by hand from ngx_http_upstream_get_peer, current weights (a, b, c):
    #   (1,2,3)->c (1,2,-3) | (2,4,0)->b (2,-2,0) | (3,0,3)->a, first max (-3,0,3)
    #   (-2,2,6)->c (-2,2,0) | (-1,4,3)->b (-1,-2,3) | (0,0,6)->c (0,0,0)
    s = make_scheduler("wrr")
    cands = [Srv("rs1/a", 1), Srv("rs1/b", 2), Srv("rs1/c", 3)]
    assert picks(s, cands, 12) == ["c", "b", "a", "c", "b", "c"] * 2


def test_wrr_exact_counts_over_600() -> None:
    s = make_scheduler("wrr")
    cands = [Srv("rs1/a", 1), Srv("rs1/b", 2), Srv("rs1/c", 3)]
    got = picks(s, cands, 600)
    assert collections.Counter(got) == {"a": 100, "b": 200, "c": 300}
    # Interleaved: the heaviest server never runs more than twice in a row, the
    # others never twice.
    runs = {k: max(len(list(g)) for kk, g in itertools.groupby(got) if kk == k) for k in "abc"}
    assert runs == {"a": 1, "b": 1, "c": 2}


def test_wrr_equal_weights_is_plain_round_robin() -> None:
    s = make_scheduler("wrr")
    assert picks(s, servers("a", "b", "c"), 6) == ["a", "b", "c"] * 2


def test_wrr_heavy_server_spread_out() -> None:
    s = make_scheduler("wrr")
    cands = [Srv("rs1/a", 5), Srv("rs1/b", 1), Srv("rs1/c", 1)]
    assert picks(s, cands, 7) == ["a", "a", "b", "a", "c", "a", "a"]


def test_wrr_state_carries_across_reload() -> None:
    cands = [Srv("rs1/a", 1), Srv("rs1/b", 2), Srv("rs1/c", 3)]
    s = make_scheduler("wrr")
    first = picks(s, cands, 3)
    # A reload rebuilds server objects (same ids) and hands the old scheduler over.
    s2 = make_scheduler("wrr", s)
    reloaded = [Srv("rs1/a", 1), Srv("rs1/b", 2), Srv("rs1/c", 3)]
    assert first + picks(s2, reloaded, 3) == ["c", "b", "a", "c", "b", "c"]
    # A fresh scheduler would start over with c.
    assert picks(make_scheduler("wrr"), reloaded, 1) == ["c"]


def test_wrr_weight_change_takes_effect() -> None:
    s = make_scheduler("wrr")
    cands = servers("a", "b")
    picks(s, cands, 10)
    cands[0].weight = 300
    got = collections.Counter(picks(s, cands, 400))
    assert got == {"a": 300, "b": 100}


def test_wrr_server_leaving_and_returning() -> None:
    s = make_scheduler("wrr")
    a, _b, c = cands = [Srv("rs1/a", 1), Srv("rs1/b", 1), Srv("rs1/c", 2)]
    picks(s, cands, 5)
    # Current weights left over from the 3-server rotation shift the shares by at most
    # one pick; never a burst.
    assert close(collections.Counter(picks(s, [a, c], 300)), {"a": 100, "c": 200})
    assert close(collections.Counter(picks(s, cands, 400)), {"a": 100, "b": 100, "c": 200})


def close(got: collections.Counter[str], want: dict[str, int]) -> bool:
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) <= 1 for k in want)


def test_wrr_forgets_ids_that_left_the_config() -> None:
    s = SmoothWeightedRoundRobin()
    for generation in range(100):
        s.pick([Srv(f"rs1/{generation}-{i}", i + 1) for i in range(3)])
    assert len(s._current) <= 2 * 3 + SmoothWeightedRoundRobin._PRUNE_SLACK


# --- wlc --------------------------------------------------------------------------------


def open_connections(s: Scheduler, cands: list[Srv], n: int) -> list[str]:
    """Pick ``n`` times, each pick opening a long-lived connection."""
    out = []
    for _ in range(n):
        c = s.pick(cands)
        assert c is not None
        c.active += 1
        out.append(c.id.removeprefix("rs1/"))
    return out


def test_wlc_spreads_long_lived_connections_evenly() -> None:
    s = make_scheduler("wlc")
    cands = servers("a", "b", "c")
    got = open_connections(s, cands, 300)
    assert [c.active for c in cands] == [100, 100, 100]
    assert got[:6] == ["a", "b", "c", "a", "b", "c"]


def test_wlc_respects_weights() -> None:
    s = make_scheduler("wlc")
    cands = [Srv("rs1/a", 1), Srv("rs1/b", 2), Srv("rs1/c", 3)]
    open_connections(s, cands, 600)
    assert [c.active for c in cands] == [100, 200, 300]


def test_wlc_fresh_server_takes_new_connections_until_caught_up() -> None:
    s = make_scheduler("wlc")
    cands = servers("a", "b", "c")
    open_connections(s, cands, 300)
    cands.append(Srv("rs1/d"))
    assert open_connections(s, cands, 100) == ["d"] * 100
    assert open_connections(s, cands, 8) == ["a", "b", "c", "d"] * 2


def test_wlc_fewest_per_weight_wins() -> None:
    s = make_scheduler("wlc")
    # 10/100 vs 1/5: a has the lower ratio despite more connections.
    cands = [Srv("rs1/a", 100, 10), Srv("rs1/b", 5, 1)]
    assert picks(s, cands, 3) == ["a", "a", "a"]


def test_wlc_ties_rotate() -> None:
    # Short requests: active stays 0, so every pick is a tie.
    s = make_scheduler("wlc")
    assert picks(s, servers("a", "b", "c"), 6) == ["a", "b", "c"] * 2


def test_wlc_ties_rotate_among_tied_only() -> None:
    s = make_scheduler("wlc")
    cands = [Srv("rs1/a", 100, 0), Srv("rs1/b", 100, 5), Srv("rs1/c", 100, 0)]
    assert picks(s, cands, 6) == ["a", "c"] * 3


def test_wlc_state_carries_across_reload() -> None:
    s = make_scheduler("wlc")
    assert picks(s, servers("a", "b", "c"), 1) == ["a"]
    s2 = make_scheduler("wlc", s)
    assert picks(s2, servers("a", "b", "c"), 1) == ["b"]


# --- sh ---------------------------------------------------------------------------------


def test_sh_same_key_same_server() -> None:
    s = make_scheduler("sh")
    cands = servers(*"abcde")
    for key in clients(200):
        first = s.pick(cands, key)
        assert all(s.pick(cands, key) is first for _ in range(3))


def test_sh_stable_across_instances_and_order() -> None:
    cands = servers(*"abcde")
    a, b = make_scheduler("sh"), make_scheduler("sh")
    for key in clients(500):
        pa, pb = a.pick(cands, key), b.pick(list(reversed(cands)), key)
        assert pa is not None and pb is not None
        assert pa.id == pb.id


def test_sh_known_mapping_is_stable_across_processes() -> None:
    # Pinned values: would fail if the ring used hash() (PYTHONHASHSEED) or changed.
    s = ConsistentHash()
    cands = servers(*"abc")
    keys = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "192.168.1.7", "::1", "2001:db8::1")
    assert ids([s.pick(cands, k) for k in keys]) == ["a", "a", "c", "b", "b", "c"]


def test_sh_spreads_keys() -> None:
    s = make_scheduler("sh")
    cands = servers(*"abcde")
    counts = collections.Counter(picks_for(s, cands, clients(10_000)).values())
    assert all(1500 <= n <= 2500 for n in counts.values()), counts


def picks_for(s: Scheduler, cands: list[Srv], keys: list[str]) -> dict[str, str]:
    out = {}
    for key in keys:
        c = s.pick(cands, key)
        assert c is not None
        out[key] = c.id
    return out


@pytest.mark.parametrize("n", [3, 5, 10])
def test_sh_removing_one_server_moves_only_its_keys(n: int) -> None:
    s = make_scheduler("sh")
    keys = clients(10_000)
    cands = [Srv(f"rs1/10.0.0.{i}:80") for i in range(n)]
    before = picks_for(s, cands, keys)
    for removed in cands:
        after = picks_for(s, [c for c in cands if c is not removed], keys)
        moved = [k for k in keys if after[k] != before[k]]
        assert len(moved) / len(keys) <= 1.3 / n
        # Only the removed server's keys move; the rest stay exactly where they were.
        assert all(before[k] == removed.id for k in moved)
        assert all(after[k] == before[k] for k in keys if before[k] != removed.id)


@pytest.mark.parametrize("n", [3, 5, 10])
def test_sh_adding_one_server_moves_keys_only_to_it(n: int) -> None:
    s = make_scheduler("sh")
    keys = clients(10_000)
    cands = [Srv(f"rs1/10.0.0.{i}:80") for i in range(n)]
    before = picks_for(s, cands, keys)
    new = Srv("rs1/10.0.0.99:80")
    after = picks_for(s, [*cands, new], keys)
    moved = [k for k in keys if after[k] != before[k]]
    assert all(after[k] == new.id for k in moved)
    assert len(moved) / len(keys) <= 1.3 / (n + 1)


def test_sh_weight_zero_drain_moves_only_its_keys() -> None:
    s = make_scheduler("sh")
    keys = clients(3000)
    cands = servers(*"abcd")
    before = picks_for(s, cands, keys)
    cands[2].weight = 0
    after = picks_for(s, cands, keys)
    assert all(after[k] == before[k] for k in keys if before[k] != "rs1/c")
    assert "rs1/c" not in after.values()


def test_sh_weight_decides_presence_not_share() -> None:
    s = make_scheduler("sh")
    keys = clients(2000)
    cands = servers(*"abc")
    before = picks_for(s, cands, keys)
    cands[0].weight = 1
    assert picks_for(s, cands, keys) == before


def test_sh_without_key_falls_back_to_rr() -> None:
    s = make_scheduler("sh")
    assert picks(s, servers("a", "b", "c"), 6) == ["a", "b", "c"] * 2


def test_sh_ring_cache_is_reused_and_bounded() -> None:
    s = ConsistentHash()
    cands = servers(*"abcdefghij")
    s.pick(cands, "k")
    ring = s._rings[tuple(c.id for c in cands)]
    s.pick(cands[1:], "k")  # a retry excluding one server builds a second ring
    s.pick(cands, "k")
    assert s._rings[tuple(c.id for c in cands)] is ring
    for i in range(len(cands)):
        s.pick(cands[:i] + cands[i + 1 :], "k")
    assert len(s._rings) <= ConsistentHash._MAX_RINGS
    # The most recently used ring survived the evictions.
    assert tuple(c.id for c in cands[:-1]) in s._rings


def test_sh_state_carries_across_reload() -> None:
    s = make_scheduler("sh")
    cands = servers("a", "b")
    s.pick(cands, "10.0.0.1")
    s2 = make_scheduler("sh", s)
    assert s2 is s
    assert isinstance(s2, ConsistentHash) and len(s2._rings) == 1


def test_sh_rejects_bad_vnodes() -> None:
    with pytest.raises(ValueError):
        ConsistentHash(vnodes=0)


def test_wlc_counts_the_fleet_s_connections_with_its_own() -> None:
    """``fleet_active`` (the other instances' published counts) weighs like ``active``: a
    server loaded through other instances is avoided here, as one balancer would."""
    a, b = Srv("rs1/a", active=0, fleet_active=40), Srv("rs1/b", active=5)
    wlc = WeightedLeastConnections()
    picked = []
    for _ in range(30):
        c = wlc.pick([a, b])
        assert c is not None
        c.active += 1
        picked.append(c.id)
    # b carries 5 of its own; a 40 through the fleet: b takes every pick until it reaches 40.
    assert picked == ["rs1/b"] * 30
    b.active = 40
    assert wlc.pick([a, b]) is not None
    b.fleet_active = 10  # now b carries 50 in all: a (40) is the lighter
    assert wlc.pick([a, b]) is a
