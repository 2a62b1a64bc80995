"""DNS discovery decisions, in memory: intervals, SRV mapping, hold, empty-after-3, merging."""

from __future__ import annotations

from lbproxy.config import DISCOVERY_EMPTY_INTERVALS, Address, Discovery, Server, parse_config
from lbproxy.core.dns import (
    Answer,
    SrvRecord,
    Tracker,
    address_servers,
    decode,
    encode,
    next_interval,
    srv_servers,
    srv_weights,
    with_discovered,
)


def found(*addresses: str, weight: int = 100) -> tuple[Server, ...]:
    out = []
    for a in addresses:
        host, port = a.rsplit(":", 1)
        out.append(Server(Address(host.strip("[]"), int(port)), weight, discovered=True))
    return tuple(out)


def test_next_interval_follows_ttl_within_bounds() -> None:
    assert next_interval(10.0, None) == 10.0
    assert next_interval(10.0, 5) == 5.0
    assert next_interval(10.0, 300) == 10.0
    assert next_interval(10.0, 0) == 1.0  # never more than once a second
    assert next_interval(1.0, 0.2) == 1.0


def test_address_servers_sorted_unique_and_discovered() -> None:
    got = address_servers(["10.0.0.2", "10.0.0.1", "10.0.0.2", "::1"], 5001, 40)
    assert got == (
        Server(Address("10.0.0.1", 5001), 40, True),
        Server(Address("10.0.0.2", 5001), 40, True),
        Server(Address("::1", 5001), 40, True),
    )
    assert str(got[2].address) == "[::1]:5001"


def test_srv_weights_map_onto_1_to_100() -> None:
    assert srv_weights([10, 20]) == [50, 100]
    assert srv_weights([0, 0]) == [100, 100]
    assert srv_weights([0, 65535]) == [1, 100]
    assert srv_weights([1, 65535]) == [1, 100]
    assert srv_weights([30000, 60000, 60000]) == [50, 100, 100]


def test_srv_servers_lowest_priority_targets_ports_and_weights() -> None:
    records = [
        SrvRecord(10, 1, 5001, "a.test"),
        SrvRecord(10, 3, 5002, "b.test"),
        SrvRecord(20, 100, 5003, "backup.test"),  # a backup: left out
        SrvRecord(10, 3, 5004, "gone.test"),  # no address: left out
    ]
    addresses = {"a.test": ["10.0.0.1"], "b.test": ["10.0.0.2", "::2"], "backup.test": ["10.9.9.9"]}
    got = srv_servers(records, addresses)
    assert got == (
        Server(Address("10.0.0.1", 5001), 33, True),
        Server(Address("10.0.0.2", 5002), 100, True),
        Server(Address("::2", 5002), 100, True),
    )
    # One address reached through two records keeps the larger weight.
    twice = [SrvRecord(0, 1, 80, "a.test"), SrvRecord(0, 4, 80, "a.test")]
    assert srv_servers(twice, {"a.test": ["10.0.0.1"]}) == found("10.0.0.1:80", weight=100)
    assert srv_servers([], {}) == ()


def test_tracker_growth_shrink_and_no_change() -> None:
    t = Tracker("rs1", 10.0)
    step = t.observe(Answer("ok", found("10.0.0.1:80"), ttl=3))
    assert step.servers == found("10.0.0.1:80") and step.delay == 3.0 and step.message is None
    step = t.observe(Answer("ok", found("10.0.0.1:80", "10.0.0.2:80"), ttl=30))
    assert step.servers == found("10.0.0.1:80", "10.0.0.2:80") and step.delay == 10.0
    assert t.observe(Answer("ok", found("10.0.0.1:80", "10.0.0.2:80"))).servers is None
    assert t.observe(Answer("ok", found("10.0.0.2:80"))).servers == found("10.0.0.2:80")


def test_tracker_holds_on_failure_and_logs_once_per_outage() -> None:
    t = Tracker("rs1", 5.0, found("10.0.0.1:80"))
    first = t.observe(Answer("timeout", detail="no answer within 2s"))
    assert first.servers is None and first.warning and first.delay == 5.0
    assert (
        first.message is not None
        and "timeout" in first.message
        and "keeping the last 1" in first.message
    )
    for result in ("timeout", "error", "timeout") * 5:  # however long it lasts: held
        step = t.observe(Answer(result))
        assert step.servers is None and step.message is None
    assert t.servers == found("10.0.0.1:80")
    back = t.observe(Answer("ok", found("10.0.0.1:80"), ttl=60))
    assert back.servers is None and back.message is not None and "resolves again" in back.message
    again = t.observe(Answer("error", detail="SERVFAIL"))  # a new outage: logged again
    assert again.message is not None and "SERVFAIL" in again.message


def test_tracker_empties_after_three_intervals_of_empty_answers() -> None:
    t = Tracker("rs1", 5.0, found("10.0.0.1:80"))
    steps = [t.observe(Answer("nxdomain")) for _ in range(DISCOVERY_EMPTY_INTERVALS)]
    assert all(s.servers is None for s in steps)  # the first, then 3 intervals' worth...
    assert steps[0].message is not None and "no records" in steps[0].message
    last = t.observe(Answer("nxdomain"))  # ...3 intervals after the first empty answer
    assert last.servers == () and last.message is not None and "now empty" in last.message
    assert t.observe(Answer("nxdomain")).servers is None  # already empty: nothing to swap


def test_tracker_empty_ok_answer_counts_as_empty_and_success_resets_the_count() -> None:
    t = Tracker("rs1", 5.0, found("10.0.0.1:80"))
    for _ in range(DISCOVERY_EMPTY_INTERVALS):
        assert t.observe(Answer("ok", ())).servers is None
    t.observe(Answer("ok", found("10.0.0.1:80")))  # back: the count starts over
    for _ in range(DISCOVERY_EMPTY_INTERVALS):
        assert t.observe(Answer("nxdomain")).servers is None
    assert t.observe(Answer("nxdomain")).servers == ()


def test_tracker_failures_do_not_count_as_empty_intervals() -> None:
    t = Tracker("rs1", 5.0, found("10.0.0.1:80"))
    for _ in range(10):
        t.observe(Answer("timeout"))
    for _ in range(DISCOVERY_EMPTY_INTERVALS):
        assert t.observe(Answer("nxdomain")).servers is None
    assert t.observe(Answer("nxdomain")).servers == ()


def _config(discovery: dict[str, object] | None, servers: list[str]) -> object:
    group: dict[str, object] = {"servers": servers}
    if discovery is not None:
        group["discovery"] = discovery
    return parse_config(
        {
            "listeners": [{"name": "web", "bind": "127.0.0.1:0", "server_group": "rs1"}],
            "server_groups": {"rs1": group, "other": {"servers": ["127.0.0.1:9"]}},
        }
    )


def test_with_discovered_adds_after_literal_servers_once() -> None:
    config = _config({"dns": "chat.test", "port": 80}, ["10.0.0.1:80"])
    spec = config.group("rs1").discovery  # type: ignore[attr-defined]
    assert spec == Discovery("chat.test", 80)
    got = with_discovered(config, {"rs1": (spec, found("10.0.0.1:80", "10.0.0.2:80"))})  # type: ignore[arg-type]
    assert got.group("rs1").servers == (  # type: ignore[attr-defined]
        Server(Address("10.0.0.1", 80)),
        Server(Address("10.0.0.2", 80), 100, True),
    )
    assert got.group("other") == config.group("other")  # type: ignore[attr-defined]
    # Servers found with other settings (the file changed the name) are stale.
    stale = Discovery("old.test", 80)
    assert with_discovered(config, {"rs1": (stale, found("10.0.0.2:80"))}) is config  # type: ignore[arg-type]
    # A group that no longer has discovery takes nothing.
    plain = _config(None, ["10.0.0.1:80"])
    assert with_discovered(plain, {"rs1": (spec, found("10.0.0.2:80"))}) is plain  # type: ignore[arg-type]


def test_encode_decode_round_trip() -> None:
    spec = Discovery("_chat._tcp.test", 0, 5.0, 100, 1.5)
    data = {"rs1": (spec, found("10.0.0.1:80", "[::1]:81"))}
    assert decode(encode(data)) == data
    assert decode(None) == {}
