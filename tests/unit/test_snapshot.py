"""RuntimeState: snapshots built from configs carry per-server state across reloads.

No network: building a snapshot is bookkeeping only. Covers which ServerState objects a new
snapshot reuses (health, open-connection count, scheduler), what ``Changes`` reports, that
``build`` alone changes nothing until ``commit``, and the reload budget for a config of 100
server groups of 10 servers.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from lbproxy.config import Config, parse_config
from lbproxy.core import metrics
from lbproxy.core.health import Event, State
from lbproxy.core.snapshot import RuntimeState, Snapshot

CHECK = {"interval": "200ms", "timeout": "1s", "path": "/health"}


def doc(
    groups: dict[str, list[Any]],
    listeners: list[dict[str, Any]] | None = None,
    schedulers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A config mapping: ``groups`` maps a group name to its servers (addresses or dicts)."""
    schedulers = schedulers or {}
    return {
        "listeners": listeners or [{"name": "web", "bind": "127.0.0.1:0", "server_group": "g1"}],
        "server_groups": {
            name: {
                "scheduler": schedulers.get(name, "rr"),
                "servers": servers,
                "health_check": CHECK,
            }
            for name, servers in groups.items()
        },
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }


def build(state: RuntimeState, d: dict[str, Any]) -> Any:
    snap, changes = state.build(parse_config(d))
    state.commit(snap)
    return snap, changes


def servers_of(snap: Snapshot, group: str) -> dict[str, Any]:
    return {s.id: s for s in snap.groups[group].servers}


def mark_up(server: Any) -> None:
    server.health.observe(Event.CHECK_OK, "200 OK", 1.0, healthy_threshold=1, unhealthy_threshold=1)


A, B, C, D = "127.0.0.1:5001", "127.0.0.1:5002", "127.0.0.1:5003", "127.0.0.1:5004"


def test_first_build_adds_every_server_and_listener():
    state = RuntimeState(metrics.Registry())
    snap, changes = build(state, doc({"g1": [A, B], "g2": [C]}))
    assert [s.id for s in changes.added_servers] == [f"g1/{A}", f"g1/{B}", f"g2/{C}"]
    assert changes.removed_servers == ()
    assert changes.added_listeners == ("web",)
    assert set(state.servers) == {f"g1/{A}", f"g1/{B}", f"g2/{C}"}
    assert all(s.health.state is State.UNKNOWN and s.active == 0 for s in state.servers.values())
    assert snap.listeners["web"].group is snap.groups["g1"]


def test_persisting_servers_keep_their_state_objects():
    state = RuntimeState(metrics.Registry())
    old, _ = build(state, doc({"g1": [A, B]}))
    a, b = old.groups["g1"].servers
    mark_up(a)
    a.active = 3  # open requests and tunnels
    b.active = 1
    sched = old.groups["g1"].scheduler

    # B goes, C comes, A stays; the listener's idle timeout changes on the side.
    new, changes = build(
        state,
        doc(
            {"g1": [C, A]},
            listeners=[
                {"name": "web", "bind": "127.0.0.1:0", "server_group": "g1", "idle_timeout": 5}
            ],
        ),
    )
    members = servers_of(new, "g1")
    assert members[f"g1/{A}"] is a
    assert a.health.state is State.UP
    assert a.active == 3
    assert new.groups["g1"].scheduler is sched
    assert [s.id for s in changes.added_servers] == [f"g1/{C}"]
    assert members[f"g1/{C}"].health.state is State.UNKNOWN
    assert changes.removed_servers == (b,)
    assert b.active == 1  # a removed server's open connections are left alone
    assert changes.changed_listeners == ("web",)
    assert changes.changed_groups == ("g1",)
    assert set(state.servers) == {f"g1/{A}", f"g1/{C}"}
    assert changes.summary() == (
        f"listeners changed: web; groups changed: g1; servers added: g1/{C}; "
        f"servers removed: g1/{B}"
    )


def test_scheduler_rotation_continues_across_a_reload():
    state = RuntimeState(metrics.Registry())
    old, _ = build(state, doc({"g1": [A, B, C]}))
    for s in old.groups["g1"].servers:
        mark_up(s)
    picks = [old.groups["g1"].pick(None).address.port for _ in range(2)]
    assert picks == [5001, 5002]
    new, _ = build(state, doc({"g1": [A, B, C, D]}))
    for s in new.groups["g1"].servers:
        mark_up(s)
    # No restart from the first server: the rotation goes on after 5002.
    assert [new.groups["g1"].pick(None).address.port for _ in range(3)] == [5003, 5004, 5001]


def test_a_changed_scheduler_name_gets_a_new_scheduler():
    state = RuntimeState(metrics.Registry())
    old, _ = build(state, doc({"g1": [A, B], "g2": [C]}))
    new, _ = build(state, doc({"g1": [A, B], "g2": [C]}, schedulers={"g1": "wlc"}))
    assert new.groups["g1"].scheduler is not old.groups["g1"].scheduler
    assert new.groups["g1"].scheduler.name == "wlc"
    assert new.groups["g2"].scheduler is old.groups["g2"].scheduler


def test_same_address_in_another_group_is_another_server():
    state = RuntimeState(metrics.Registry())
    old, _ = build(state, doc({"g1": [A], "g2": [B]}))
    moved_from = servers_of(old, "g1")[f"g1/{A}"]
    new, changes = build(state, doc({"g1": [], "g2": [B, A]}))
    moved_to = servers_of(new, "g2")[f"g2/{A}"]
    assert moved_to is not moved_from
    assert [s.id for s in changes.added_servers] == [f"g2/{A}"]
    assert [s.id for s in changes.removed_servers] == [f"g1/{A}"]


def test_build_without_commit_changes_nothing():
    """A reload that fails after building (say, a bind) must leave the state as it was."""
    state = RuntimeState(metrics.Registry())
    old, _ = build(state, doc({"g1": [A, B]}))
    known = dict(state.servers)
    scheds = dict(state.schedulers)
    _, changes = state.build(parse_config(doc({"g1": [C]}, schedulers={"g1": "wrr"})))
    assert state.servers == known
    assert state.schedulers == scheds
    # The next build is computed against the committed state, not the abandoned one.
    _, changes = state.build(parse_config(doc({"g1": [A, D]})))
    assert [s.id for s in changes.added_servers] == [f"g1/{D}"]
    assert [s.id for s in changes.removed_servers] == [f"g1/{B}"]
    assert servers_of(old, "g1")[f"g1/{A}"] is state.servers[f"g1/{A}"]


def test_commit_applies_new_weights_to_persisting_servers():
    state = RuntimeState(metrics.Registry())
    old, _ = build(state, doc({"g1": [{"address": A, "weight": 10}, B]}))
    a = servers_of(old, "g1")[f"g1/{A}"]
    snap, changes = state.build(parse_config(doc({"g1": [{"address": A, "weight": 70}, B]})))
    assert a.weight == 10  # not before commit
    state.commit(snap)
    assert a.weight == 70
    assert changes.added_servers == () and changes.removed_servers == ()
    assert changes.changed_groups == ("g1",)


def test_listener_changes_are_reported_by_name():
    state = RuntimeState(metrics.Registry())
    build(
        state,
        doc(
            {"g1": [A]},
            listeners=[
                {"name": "web", "bind": "127.0.0.1:8001", "server_group": "g1"},
                {"name": "api", "bind": "127.0.0.1:8002", "server_group": "g1"},
            ],
        ),
    )
    _, changes = build(
        state,
        doc(
            {"g1": [A]},
            listeners=[
                {"name": "web", "bind": "127.0.0.1:8003", "server_group": "g1"},
                {"name": "api2", "bind": "127.0.0.1:8002", "server_group": "g1"},
            ],
        ),
    )
    assert changes.added_listeners == ("api2",)
    assert changes.removed_listeners == ("api",)
    assert changes.changed_listeners == ("web",)
    assert changes.added_servers == () and changes.removed_servers == ()
    assert changes.summary() == (
        "listeners added: api2; listeners removed: api; listeners changed: web"
    )


def test_unchanged_config_reports_no_changes():
    state = RuntimeState(metrics.Registry())
    build(state, doc({"g1": [A, B]}))
    _, changes = build(state, doc({"g1": [A, B]}))
    assert changes.summary() == "no listener or server changes"


# --------------------------------------------------------------- a big reload (issue 4's budget)


def big_config(port_offset: int = 0, idle: str = "60s") -> Config:
    """100 server groups of 10 servers, a listener on each group."""
    groups = {
        f"g{g:03d}": {
            "scheduler": ("rr", "wrr", "wlc", "sh")[g % 4],
            "servers": [
                {"address": f"10.0.{g}.{s + 1}:{8000 + port_offset}", "weight": 1 + s}
                for s in range(10)
            ],
            "health_check": CHECK,
        }
        for g in range(100)
    }
    return parse_config(
        {
            "listeners": [
                {
                    "name": f"l{g:03d}",
                    "bind": "127.0.0.1:0",
                    "server_group": f"g{g:03d}",
                    "idle_timeout": idle,
                }
                for g in range(100)
            ],
            "server_groups": groups,
            "admin": {"bind": "127.0.0.1:0"},
            "access_log": {"enabled": False},
        }
    )


def best_of_3(fn: Any) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# Seconds: a hang guard only. The budget of issue 4 (100 ms for such a reload) is a figure,
# measured by bench/reload_budget.py: on a loaded machine a wall-clock budget here would fail
# for reasons that are not lbproxy's.
HANG_GUARD = 10.0


@pytest.mark.parametrize(
    "change",
    ["timeouts only", "every server replaced"],
)
def test_reload_of_100_groups_of_10_servers(change):
    registry = metrics.Registry()
    state = RuntimeState(registry)
    base = big_config()
    snap, _ = state.build(base)
    state.commit(snap)
    configs = [big_config(idle="30s"), big_config()]
    if change == "every server replaced":
        configs = [big_config(port_offset=1), big_config(port_offset=2)]
    counter = [0]

    def reload_once() -> None:
        config = configs[counter[0] % 2]
        counter[0] += 1
        new, changes = state.build(config)
        state.commit(new)
        if change == "timeouts only":
            assert changes.added_servers == () and changes.removed_servers == ()
        else:
            assert len(changes.added_servers) == len(changes.removed_servers) == 1000

    elapsed = best_of_3(reload_once)
    assert len(state.servers) == 1000
    assert elapsed < HANG_GUARD, f"build+commit took {elapsed * 1000:.1f} ms"


# ------------------------------------------------------------------ draining and overrides


def test_removed_and_weight_0_servers_begin_draining_on_commit():
    state = RuntimeState(metrics.Registry())
    snap, _ = build(state, doc({"g1": [A, B, C]}))
    a, b, c = snap.groups["g1"].servers
    assert not any(s.draining for s in (a, b, c))
    new, _ = state.build(parse_config(doc({"g1": [A, {"address": B, "weight": 0}]})))
    began = state.commit(new)
    assert began == [b, c]
    assert (b.draining, b.removed, c.draining, c.removed) == (True, False, True, True)
    assert state.retired == {c.id: c}
    assert [s.state_name for s in (a, b, c)] == ["unknown", "draining", "draining"]
    # Brought back, the removed one is the same state again (its tunnels, its counters).
    again, changes = build(state, doc({"g1": [A, B, C]}))
    assert servers_of(again, "g1")[c.id] is c and c in changes.added_servers
    assert not c.draining and not b.draining and state.retired == {}


def test_overrides_survive_reloads_while_the_server_stays():
    state = RuntimeState(metrics.Registry())
    snap, _ = build(state, doc({"g1": [A, B]}))
    a, b = snap.groups["g1"].servers
    for s in (a, b):
        mark_up(s)
    server, began = state.set_override(a.id, admin_state="drain")
    assert (server, began, a.draining) == (a, True, True)
    assert snap.groups["g1"].available() == [b]
    server, began = state.set_override(a.id, weight=30)  # the admin state stays
    assert (began, a.admin_state, a.weight, a.draining) == (False, "drain", 30, True)
    build(state, doc({"g1": [{"address": A, "weight": 70}, B]}))
    assert (a.admin_state, a.weight, a.config_weight, a.draining) == ("drain", 30, 70, True)
    state.set_override(a.id, admin_state="ready")
    assert (a.draining, a.weight) == (False, 30)
    state.set_override(b.id, weight=0)
    assert b.draining
    # Gone from the config, its overrides go too; back, it has the file's values.
    build(state, doc({"g1": [B]}))
    assert a.id not in state.overrides and b.id in state.overrides
    build(state, doc({"g1": [A, B]}))
    assert (a.admin_state, a.weight, a.override) == ("ready", 100, None)
    with pytest.raises(KeyError):
        state.set_override("g1/127.0.0.1:1", admin_state="drain")


def test_pins_to_a_draining_server_hold_unless_the_group_drains_with_a_timeout():
    state = RuntimeState(metrics.Registry())
    d = doc({"g1": [A, B]})
    snap, _ = build(state, d)
    a, b = snap.groups["g1"].servers
    for s in (a, b):
        mark_up(s)
    state.set_override(a.id, admin_state="drain")
    assert snap.groups["g1"].pinnable(a)  # HAProxy's drain: sessions stay
    d["server_groups"]["g1"]["drain_timeout"] = "10s"
    snap, _ = build(state, d)
    assert not snap.groups["g1"].pinnable(a)  # everything moves off within the window
    assert snap.groups["g1"].pinnable(b)


def test_sticky_secret_keys_the_tokens_and_a_new_secret_rekeys_on_commit():
    from lbproxy.core.sticky import server_token

    state = RuntimeState(metrics.Registry())

    def with_secret(secret: str | None) -> dict[str, Any]:
        d = doc({"g1": ["127.0.0.1:5001"]})
        if secret is not None:
            d["server_groups"]["g1"]["sticky_session"] = {"type": "insert", "secret": secret}
        return d

    snap, _ = build(state, with_secret(None))
    server = snap.groups["g1"].servers[0]
    assert server.token == server_token("g1/127.0.0.1:5001")  # the built-in key

    secret = "a-secret-of-twenty-chars"
    snap2, _ = state.build(parse_config(with_secret(secret)))
    keyed = server_token("g1/127.0.0.1:5001", secret)
    assert keyed != server.token
    assert set(snap2.groups["g1"].by_token) == {keyed}
    assert server.token != keyed  # the old snapshot's connections still set the old token
    state.commit(snap2)
    assert snap2.groups["g1"].servers[0] is server and server.token == keyed
