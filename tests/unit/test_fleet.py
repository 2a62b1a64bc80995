"""core.fleet (the fleet's merges and records) and the ``cluster`` config section."""

from __future__ import annotations

from typing import Any

import pytest

from lbproxy.config.model import ConfigError
from lbproxy.config.top import parse_config
from lbproxy.control.cluster import redacted
from lbproxy.core.fleet import (
    Entry,
    Instance,
    Shed,
    due_sheds,
    live_instances,
    member_of,
    merge_overrides,
    odd_configs,
    others_counts,
    others_tunnels,
    shed_parts,
)


def entry(at: float, state: str | None = "drain", by: str = "lb-a") -> Entry:
    return Entry(state, None, by, at)


def test_merge_takes_the_last_writer_by_timestamp() -> None:
    local = {"g/a": entry(10.0), "g/b": entry(30.0, "ready"), "g/c": entry(5.0)}
    remote = {"g/a": entry(20.0, "ready", "lb-b"), "g/b": entry(25.0), "g/d": entry(1.0)}
    apply, write = merge_overrides(local, remote)
    # The fleet's newer a and the unknown d are applied here; b set here later is written
    # back, and c (never reached Redis: set while it was down) too.
    assert apply == {"g/a": remote["g/a"], "g/d": remote["g/d"]}
    assert write == {"g/b": local["g/b"], "g/c": local["g/c"]}


def test_merge_of_equal_states_does_nothing() -> None:
    same = {"g/a": entry(10.0)}
    assert merge_overrides(same, dict(same)) == ({}, {})
    assert merge_overrides({}, {}) == ({}, {})


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"admin_state": "drain", "weight": null, "by": "x"}',  # no time
        b'{"admin_state": "gone", "weight": null, "by": "x", "at": 1}',
        b'{"admin_state": null, "weight": "7", "by": "x", "at": 1}',
        b'{"admin_state": null, "weight": true, "by": "x", "at": 1}',
    ],
)
def test_a_foreign_or_damaged_entry_is_ignored(raw: bytes) -> None:
    assert Entry.loads(raw) is None


def test_an_entry_round_trips() -> None:
    e = Entry("drain", 7, "lb-a", 1234.5)
    assert Entry.loads(e.dumps()) == e


def inst(name: str, at: float, config: str = "h", **servers: int) -> Instance:
    return Instance(name, "", "0.1", "pure", 0.0, config, 0, 0, 0.0, at, dict(servers))


def test_a_dead_instance_s_record_stops_counting() -> None:
    records = [inst("b", 100.0), inst("a", 98.5), inst("c", 96.9), None]
    assert [i.name for i in live_instances(records, 100.0, 3.0)] == ["a", "b"]
    assert Instance.loads(b"garbage") is None
    assert Instance.loads(inst("a", 1.0, x=2).dumps()) == inst("a", 1.0, x=2)


def test_others_counts_sum_the_other_instances_per_server() -> None:
    fleet = [inst("a", 0, s1=5, s2=1), inst("b", 0, s1=3), inst("c", 0, s2=4, s3=0)]
    assert others_counts(fleet, "a") == {"s1": 3, "s2": 4}
    assert others_counts(fleet, "z") == {"s1": 8, "s2": 5}


def test_others_tunnels_per_instance_and_records_without_them() -> None:
    a = Instance("a", "", "0.1", "pure", 0.0, "h", 0, 0, 0.0, 1.0, {"s1": 9}, {"s1": 4, "s2": 0})
    assert Instance.loads(a.dumps()) == a
    # An older instance's record has no ``websockets``: read, with none.
    old = a.dumps().replace(',"websockets":{"s1":4,"s2":0}', "")
    assert "websockets" not in old
    b = Instance.loads(old.replace('"name":"a"', '"name":"b"'))
    assert b is not None and b.websockets == {} and b.servers == {"s1": 9}
    assert others_tunnels([a, b], "z") == {"a": {"s1": 4}}
    assert others_tunnels([a, b], "a") == {}
    assert Instance.loads(a.dumps().replace('"s1":4', '"s1":"x"')) is None


def test_odd_configs_flag_the_minority_hash() -> None:
    assert odd_configs([inst("a", 0, "x"), inst("b", 0, "x"), inst("c", 0, "y")]) == {"c"}
    assert odd_configs([inst("a", 0, "x"), inst("b", 0, "x")]) == set()
    assert odd_configs([]) == set()


def doc(**cluster: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "bind": "127.0.0.1:0", "server_group": "g"}],
        "server_groups": {"g": {"servers": [{"address": "127.0.0.1:9"}]}},
        "cluster": cluster,
    }


def test_cluster_config_defaults_and_schemes() -> None:
    assert parse_config({k: v for k, v in doc().items() if k != "cluster"}).cluster is None
    c = parse_config(doc(redis="redis://r:6379/0")).cluster
    assert c is not None and c.name is None and c.prefix == "lbproxy:"
    c = parse_config(doc(redis="rediss://:s3cret@r:6380/1", name="lb-a", prefix="fleet1:")).cluster
    assert c is not None and c.redis == "rediss://:s3cret@r:6380/1"
    assert (c.name, c.prefix) == ("lb-a", "fleet1:")


@pytest.mark.parametrize(
    ("cluster", "message"),
    [
        ({}, "cluster.redis: required"),
        ({"redis": "http://:hunter2@r:6379"}, "expected a Redis URL"),
        ({"redis": "redis://r", "prefix": "has space"}, "cluster.prefix"),
        ({"redis": "redis://r", "name": "a/b"}, "cluster.name"),
        ({"redis": "redis://r", "nme": "a"}, "nme"),
    ],
)
def test_cluster_config_errors(cluster: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(doc(**cluster))
    text = "\n".join(e.value.problems)
    assert message in text
    assert "hunter2" not in text  # a password in a bad URL is never echoed


def test_the_password_is_redacted_in_logs_and_views() -> None:
    assert redacted("redis://:s3cret@r:6379/0") == "redis://***@r:6379/0"
    assert redacted("rediss://user:s3cret@r:6380/0") == "rediss://user:***@r:6380/0"
    assert redacted("redis://r:6379/0") == "redis://r:6379/0"


def test_a_shed_count_is_split_by_the_tunnels_each_instance_holds() -> None:
    assert shed_parts(8, {"lb-0": 15, "lb-1": 5}) == {"lb-0": 6, "lb-1": 2}
    assert shed_parts(3, {"lb-0": 1, "lb-1": 1, "lb-2": 1}) == {"lb-0": 1, "lb-1": 1, "lb-2": 1}
    assert shed_parts(50, {"lb-0": 4, "lb-1": 0}) == {"lb-0": 4}  # never more than held
    assert shed_parts(5, {}) == {}


def test_a_shed_record_round_trips_and_a_damaged_one_is_ignored() -> None:
    shed = Shed("x", "lb-0", 10.0, "rs1/a:1", None, 8, 60.0, {"lb-0": 15}, {"lb-0": 8})
    assert Shed.loads(shed.dumps()) == shed
    assert Shed.loads(b"{") is None
    assert Shed.loads(b'{"id":"x","by":"a","at":1,"server":"s","over":1}') is None  # neither
    both = b'{"id":"x","by":"a","at":1,"server":"s","fraction":0.5,"count":2}'
    assert Shed.loads(both) is None


def test_due_sheds_are_new_young_and_asked_elsewhere() -> None:
    def shed(i: str, by: str, at: float) -> Shed:
        return Shed(i, by, at, "rs1/a:1", 0.5, None, 1.0)

    records = [shed("new", "lb-0", 99.0), shed("old", "lb-0", 90.0), shed("seen", "lb-0", 99.0)]
    records += [shed("mine", "lb-1", 99.0), shed("first", "lb-2", 98.0)]
    due = due_sheds(records, {"seen": 99.0}, "lb-1.123", 100.0, 5.0)
    assert [r.id for r in due] == ["first", "new"]  # oldest first; lb-1's own worker skips
    assert member_of("lb-1.123", "lb-1") and member_of("lb-1", "lb-1")
    assert not member_of("lb-10", "lb-1")
