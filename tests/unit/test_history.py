"""core.history: the rings of rates and gauges and the event log, with an injected clock."""

from __future__ import annotations

import math
import tracemalloc

import pytest

from lbproxy.control.history import RESOLUTIONS
from lbproxy.core.history import (
    SERVER_SERIES,
    EventLog,
    History,
    Reading,
    Resolution,
    quantile,
)

BUCKETS = (0.01, 0.1, 1.0)


def server(requests: float, up: bool = True, counts: list[int] | None = None) -> Reading:
    return Reading(
        "server",
        {"id": "g/a:1", "group": "g", "address": "a:1"},
        counters={
            "requests": requests,
            "errors_5xx": 0.0,
            "connect_failures": 0.0,
            "ws_messages_in": requests,
            "ws_messages_out": 2 * requests,
        },
        gauges={"up": 1.0 if up else 0.0, "connections": 3, "tunnels": 2},
        buckets=BUCKETS,
        counts=counts or [0, 0, 0, 0],
        up=up,
    )


def series(res: Resolution, name: str, kind: str = "servers", key: str = "g/a:1") -> list:
    view = res.view()
    return view[kind][key]["series"][name]  # type: ignore[index]


def test_quantile_interpolates_within_its_bucket_like_histogram_quantile() -> None:
    assert quantile(0.5, BUCKETS, [0, 10, 0, 0]) == pytest.approx(0.055)
    assert quantile(0.99, BUCKETS, [100, 0, 0, 0]) == pytest.approx(0.0099)
    assert quantile(0.99, BUCKETS, [0, 0, 0, 5]) == 1.0  # +Inf: the highest bound known
    assert math.isnan(quantile(0.5, BUCKETS, [0, 0, 0, 0]))


def test_rates_are_differences_over_the_interval_and_gauges_the_value_read() -> None:
    res = Resolution(5.0, 10)
    res.add(100.0, {"server:g/a:1": server(0)})
    res.add(105.0, {"server:g/a:1": server(50, counts=[0, 10, 0, 0])})
    res.add(110.0, {"server:g/a:1": server(60, counts=[0, 10, 10, 0])})
    assert res.view()["times"] == [100.0, 105.0, 110.0]
    assert series(res, "requests") == [None, 10.0, 2.0]  # the first has nothing before it
    assert series(res, "connections") == [3, 3, 3]
    assert series(res, "p50") == [None, pytest.approx(0.055), pytest.approx(0.55)]


def test_a_server_not_up_is_a_gap_in_its_traffic_and_a_zero_in_up() -> None:
    res = Resolution(5.0, 10)
    for i, (n, up) in enumerate([(0, True), (10, True), (10, False), (10, False), (20, True)]):
        res.add(100.0 + 5 * i, {"server:g/a:1": server(n, up)})
    assert series(res, "requests") == [None, 2.0, None, None, 2.0]
    assert series(res, "tunnels") == [2, 2, None, None, 2]
    assert series(res, "up") == [1, 1, 0, 0, 1]


def test_a_counter_that_went_down_has_no_rate_at_that_point() -> None:
    res = Resolution(5.0, 10)
    for i, n in enumerate([100, 150, 20, 30]):  # a restart in between: counting anew
        res.add(100.0 + 5 * i, {"server:g/a:1": server(n)})
    assert series(res, "requests") == [None, 10.0, None, 2.0]


def test_the_ring_is_bounded_oldest_first_and_its_memory_fixed() -> None:
    res = Resolution(5.0, 4)
    res.add(0.0, {"server:g/a:1": server(0)})
    size = len(res.tracks["server:g/a:1"].values)
    assert size == 4 * len(SERVER_SERIES)
    for i in range(1, 10):
        res.add(5.0 * i, {"server:g/a:1": server(5 * i)})
    assert res.view()["times"] == [30.0, 35.0, 40.0, 45.0]
    assert series(res, "requests") == [1.0, 1.0, 1.0, 1.0]
    assert len(res.tracks["server:g/a:1"].values) == size


def test_an_entity_that_left_has_gaps_then_is_forgotten_once_aged_out() -> None:
    res = Resolution(5.0, 3)
    res.add(0.0, {"server:g/a:1": server(0)})
    res.add(5.0, {"server:g/a:1": server(5)})
    res.add(10.0, {})
    assert series(res, "requests") == [None, 1.0, None]
    res.add(15.0, {})
    assert series(res, "requests") == [1.0, None, None]  # its last point is the oldest
    res.add(20.0, {})
    assert res.view()["servers"] == {}
    assert res.tracks == {}


def test_the_coarse_resolution_takes_a_point_only_when_its_interval_passed() -> None:
    h = History([(5.0, 10), (60.0, 10)])
    for i in range(25):  # two minutes at 5 s
        h.add(1000.0 + 5 * i, {"server:g/a:1": server(5 * i)})
    fine, coarse = h.resolutions
    assert fine.view()["times"][-1] == 1120.0
    assert coarse.view()["times"] == [1000.0, 1060.0, 1120.0]
    assert series(coarse, "requests") == [None, 1.0, 1.0]


def test_bad_resolutions_are_refused() -> None:
    with pytest.raises(ValueError, match="interval > 0"):
        Resolution(0, 10)
    with pytest.raises(ValueError, match="at least 2"):
        Resolution(5, 1)


def test_the_event_log_is_bounded_timed_and_refuses_unknown_kinds() -> None:
    now = [10.0]
    log = EventLog(lambda: now[0], capacity=3)
    for i in range(5):
        now[0] = 10.0 + i
        log.record("health", f"e{i}", "g", "g/a:1")
    assert [e["text"] for e in log.since(0)] == ["e2", "e3", "e4"]
    assert [e["time"] for e in log.since(13.0)] == [13.0, 14.0]
    assert log.since(0)[0] == {
        "time": 12.0,
        "kind": "health",
        "text": "e2",
        "group": "g",
        "server": "g/a:1",
    }
    with pytest.raises(ValueError, match="unknown event kind"):
        log.record("gossip", "x")


def test_history_view_carries_the_events_of_its_span() -> None:
    now = [0.0]
    log = EventLog(lambda: now[0])
    log.record("reload", "before anything was sampled")
    h = History([(5.0, 2)])
    for i in range(4):
        h.add(100.0 + 5 * i, {"server:g/a:1": server(i)})
    now[0] = 112.0
    log.record("reload", "inside")
    view = h.view(log)
    assert [e["text"] for e in view["events"]] == ["inside"]  # type: ignore[index]


def bytes_per_server() -> int:
    """What one more server costs in the default resolutions (server rows only)."""
    h = History(RESOLUTIONS)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(2):
        h.add(5.0 * i, {"server:g/a:1": server(i)})
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(s.size_diff for s in after.compare_to(before, "filename"))


def test_one_server_costs_about_62_kb_of_history() -> None:
    # README "Monitoring" states this number: 14 series x (180 + 360) points x 8 bytes, plus
    # the Reading kept to take the next difference from.
    assert len(SERVER_SERIES) == 14
    measured = bytes_per_server()
    assert 14 * 540 * 8 <= measured < 64_000, measured


def test_a_servers_websocket_series_are_rates_and_go_on_while_it_is_down() -> None:
    res = Resolution(5.0, 10)
    for i, (n, up) in enumerate([(0, True), (10, True), (20, False), (30, True)]):
        res.add(100.0 + 5 * i, {"server:g/a:1": server(n, up)})
    assert series(res, "ws_messages_in") == [None, 2.0, 2.0, 2.0]  # no gap while down
    assert series(res, "ws_messages_out") == [None, 4.0, 4.0, 4.0]
    assert series(res, "requests") == [None, 2.0, None, 2.0]


def test_a_servers_messages_are_its_ended_tunnels_plus_its_open_ones_counted_once() -> None:
    from lbproxy.control.history import _server_ws
    from lbproxy.core.metrics import ServerStats

    ss = ServerStats("g", "a:1")
    ss.ws_opened("web")
    ss.ws_opened("web")
    ss.ws_closed("web", 4, 6, "1000")  # one ended: folded in
    # The other is open with 10 and 20 so far: read from it, added.
    now = _server_ws(ss, [10, 20])
    assert (now["ws_messages_in"], now["ws_messages_out"]) == (14.0, 26.0)
    assert now["closes_1000"] == 1.0 and now["closes_1006"] == 0.0
    # It ends with 12 and 20: folded in once, no longer read as open; the counters grew by
    # what it passed since, never counted twice nor going down.
    ss.ws_closed("web", 12, 20, "1006")
    later = _server_ws(ss, None)
    assert (later["ws_messages_in"], later["ws_messages_out"]) == (16.0, 26.0)
    assert (later["closes_1000"], later["closes_1006"], later["closes_other"]) == (1.0, 1.0, 0.0)


def test_the_page_carries_the_history_where_no_event_text_can_end_its_script() -> None:
    import json

    from lbproxy.control.status_page import _history_data

    log = EventLog(lambda: 110.0)
    log.record("api", "</script><script>alert(1)</script>")
    h = History([(5.0, 4), (60.0, 4)])
    for i in range(3):
        h.add(100.0 + 5 * i, {"server:g/a:1": server(i)})
    data = _history_data({"time": 111.0, **h.view(log, finest_only=True)})
    assert "<" not in data
    back = json.loads(data)
    assert back["events"][0]["text"] == "</script><script>alert(1)</script>"
    # Of a server, only what the page draws travels with it: the sparkline's requests, and
    # its WebSocket messages both ways summed.
    assert back["resolution"]["servers"] == {
        "g/a:1": {
            "id": "g/a:1",
            "group": "g",
            "address": "a:1",
            "series": {"requests": [None, 0.2, 0.2], "ws_messages": [None, 0.6, 0.6]},
        }
    }
    assert _history_data(None) == "null"


def test_the_data_path_knows_nothing_of_the_history() -> None:
    # The history reads the counters the data path keeps anyway; no module of proxy/ (nor
    # core.metrics, which it adds to) imports or calls it.
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "lbproxy"
    hot = [*sorted((root / "proxy").glob("*.py")), root / "core" / "metrics.py"]
    assert len(hot) > 10
    for path in hot:
        text = path.read_text()
        assert "history" not in text and "EventLog" not in text, path
