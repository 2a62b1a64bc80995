"""The metrics core without sockets: histogram buckets, forgetting a server, the
Collector's exposition (names, types, labels) summed over several registries, and the
README's metrics table against the table of families."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.control.metric_families import FAMILIES as TABLE
from lbproxy.control.metric_families import Collector
from lbproxy.core.metrics import (
    TIME_BUCKETS,
    WS_BUCKETS,
    Histogram,
    Registry,
    close_class,
    dump_registry,
    load_registry,
    merge_registries,
)

FAMILIES = {
    "lbproxy_requests": "counter",
    "lbproxy_requests_by_protocol": "counter",
    "lbproxy_http2_rapid_reset_closes": "counter",
    "lbproxy_request_duration_seconds": "histogram",
    "lbproxy_upstream_response_seconds": "histogram",
    "lbproxy_connections_active": "gauge",
    "lbproxy_connections": "counter",
    "lbproxy_connections_refused": "counter",
    "lbproxy_tls_handshake_failures": "counter",
    "lbproxy_backend_tls_handshake_failures": "counter",
    "lbproxy_websockets_active": "gauge",
    "lbproxy_websockets": "counter",
    "lbproxy_websocket_duration_seconds": "histogram",
    "lbproxy_websocket_closes": "counter",
    "lbproxy_websocket_messages": "counter",
    "lbproxy_websocket_close_codes": "counter",
    "lbproxy_websocket_policy_closes": "counter",
    "lbproxy_websockets_drained": "counter",
    "lbproxy_websockets_rebalanced": "counter",
    "lbproxy_websocket_ends": "counter",
    "lbproxy_bytes": "counter",
    "lbproxy_backend_up": "gauge",
    "lbproxy_backend_state": "gauge",
    "lbproxy_backend_effective_weight": "gauge",
    "lbproxy_health_checks": "counter",
    "lbproxy_upstream_errors": "counter",
    "lbproxy_retries": "counter",
    "lbproxy_config_reloads": "counter",
    "lbproxy_config_last_reload_success": "gauge",
    "lbproxy_config_last_reload_timestamp_seconds": "gauge",
    "lbproxy_tls_certificate_expiry_timestamp_seconds": "gauge",
    "lbproxy_dns_lookups": "counter",
    "lbproxy_backend_discovered": "gauge",
    "lbproxy_cluster_instances": "gauge",
    "lbproxy_cluster_limit_fallbacks": "counter",
    "lbproxy_cluster_redis_up": "gauge",
}


def exposition(*registries: Registry) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Render through prometheus-client and parse back: sample name -> {labels: value}."""
    prom = CollectorRegistry(auto_describe=False)
    prom.register(Collector(list(registries)))
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(generate_latest(prom).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


class _Live:
    """An open connection; with ``sid``, a tunnel to that server with ``messages``."""

    def __init__(self, i: int, o: int, sid: str = "", messages: tuple[int, int] = (0, 0)) -> None:
        self.i, self.o = i, o
        self.sid, self.messages = sid, messages

    def live_bytes(self) -> tuple[int, int]:
        return self.i, self.o

    def live_messages(self) -> tuple[str, int, int]:
        return self.sid, *self.messages


# ------------------------------------------------------------------ Histogram
def test_histogram_buckets_are_cumulative_with_le_inclusive():
    h = Histogram((0.1, 1.0, 10.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0, 100.0):
        h.observe(v)
    # A bucket counts values <= its bound; +Inf counts everything.
    assert h.cumulative() == [("0.1", 2), ("1.0", 4), ("10.0", 5), ("+Inf", 6)]
    assert h.sum == pytest.approx(104.65)


def test_histogram_buckets_a_value_where_bisect_left_would():
    import bisect
    import random

    rng = random.Random(5)
    values = [*TIME_BUCKETS, 0.0, -1.0, 1e9, float("nan"), float("inf")]
    values += [rng.uniform(0, 70) for _ in range(500)] + [rng.uniform(0, 0.01) for _ in range(500)]
    for v in values:
        h = Histogram(TIME_BUCKETS)
        h.observe(v)
        assert h.counts.index(1) == bisect.bisect_left(TIME_BUCKETS, v), v


def test_empty_histogram_has_every_bucket_at_zero():
    h = Histogram(TIME_BUCKETS)
    cum = h.cumulative()
    assert [c for _, c in cum] == [0] * (len(TIME_BUCKETS) + 1)
    assert cum[-1][0] == "+Inf"
    assert [b for b, _ in cum[:-1]] == [repr(float(b)) for b in TIME_BUCKETS]


def test_histogram_add_sums_counts_and_sum():
    a, b = Histogram(WS_BUCKETS), Histogram(WS_BUCKETS)
    a.observe(0.5)
    b.observe(0.5)
    b.observe(7200.0)
    a.add(b)
    assert dict(a.cumulative())["1.0"] == 2
    assert dict(a.cumulative())["14400.0"] == 3
    assert a.sum == pytest.approx(7201.0)


# ------------------------------------------------------------------ Registry
def test_registry_hands_out_one_stats_object_per_name_and_id():
    reg = Registry()
    assert reg.listener("web") is reg.listener("web")
    assert reg.server("g/1.2.3.4:80", "g", "1.2.3.4:80") is reg.server("g/1.2.3.4:80", "g", "x")


def test_forget_server_drops_only_that_servers_series():
    reg = Registry()
    web, api = reg.listener("web"), reg.listener("api")
    gone = reg.server("g/10.0.0.1:80", "g", "10.0.0.1:80")
    kept = reg.server("g/10.0.0.2:80", "g", "10.0.0.2:80")
    other_group = reg.server("h/10.0.0.1:80", "h", "10.0.0.1:80")
    for ss in (gone, kept, other_group):
        ss.health_checks["success"] += 1
        ss.upstream_response.observe(0.01)
    web.count_request("g", "10.0.0.1:80", 200, 0.01)
    api.count_request("g", "10.0.0.1:80", 500, 0.01)
    web.count_request("g", "10.0.0.2:80", 200, 0.01)
    web.count_request("h", "10.0.0.1:80", 200, 0.01)
    web.count_request("g", "", 503, 0.01)
    reg.backend_up["g/10.0.0.1:80"] = ("g", "10.0.0.1:80", 1)
    reg.backend_up["g/10.0.0.2:80"] = ("g", "10.0.0.2:80", 1)

    reg.forget_server("g/10.0.0.1:80")

    assert set(reg.servers) == {"g/10.0.0.2:80", "h/10.0.0.1:80"}
    assert set(reg.backend_up) == {"g/10.0.0.2:80"}
    assert web.requests == {
        ("g", "10.0.0.2:80", "200"): 1,
        ("h", "10.0.0.1:80", "200"): 1,
        ("g", "", "503"): 1,
    }
    assert api.requests == {}
    # Listener-level totals are history, not per-server series: they stay.
    assert web.request_duration["g"].cumulative()[-1] == ("+Inf", 3)
    m = exposition(reg)
    servers = {dict(k).get("server") for fam in m.values() for k in fam}
    assert "10.0.0.1:80" in servers  # still there for group h
    assert (
        labels(server_group="g", server="10.0.0.1:80", result="success")
        not in m["lbproxy_health_checks_total"]
    )
    reg.forget_server("g/10.0.0.1:80")  # a second time is harmless
    reg.forget_server("never/seen:1")


def test_ws_stats_track_open_and_established_per_listener():
    reg = Registry()
    ss = reg.server("g/s:1", "g", "s:1")
    assert ss.idle
    ss.ws_opened("web")
    ss.ws_opened("web")
    ss.ws_opened("api")
    ss.ws_closed("web", 0, 0, "1000")
    assert ss.ws_active == {"web": 1, "api": 1}
    assert ss.ws_total == {"web": 2, "api": 1}
    assert not ss.idle
    ss.ws_closed("web", 0, 0, "1000")
    ss.ws_closed("api", 0, 0, "1000")
    assert ss.idle


# ------------------------------------------------------------------ Collector
def test_collector_exposes_every_family_with_its_type_and_help():
    prom = CollectorRegistry(auto_describe=False)
    prom.register(Collector(Registry()))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(prom).decode())}
    assert {n: f.type for n, f in fams.items()} == FAMILIES
    assert all(f.documentation for f in fams.values())


def _fill(reg: Registry, scale: int) -> None:
    web = reg.listener("web")
    web.connections_total += 3 * scale
    web.connections_active += scale
    web.connections_refused["acl"] += scale
    web.connections_refused["max_connections"] += 2 * scale
    web.tls_failures["client_certificate"] += scale
    web.connections_refused["connections_per_client"] += 5 * scale
    web.connections_refused["proxy_protocol"] += 7 * scale
    web.bytes_in += 100 * scale
    web.bytes_out += 1000 * scale
    web.live.add(_Live(10 * scale, 20 * scale))
    for _ in range(scale):
        web.count_request("g", "s:1", 200, 0.003)
    web.count_request("g", "", 503, 0.0001)
    web.count_ws_close("g", "client", 2.0)
    web.ws_closes["shutdown"] += scale
    web.ws_messages_in += 10 * scale
    web.ws_messages_out += 20 * scale
    web.count_ws_close_code("proxy", 1001)
    web.count_ws_close_code("client", None)
    web.count_ws_policy("max_message_size")
    ss = reg.server("g/s:1", "g", "s:1")
    ss.ws_drained += scale
    ss.ws_rebalanced += 2 * scale
    ss.upstream_response.observe(0.002)
    ss.ws_opened("web")
    ss.errors["connect"] += scale
    ss.tls_failures["verify"] += 4 * scale
    ss.health_checks["success"] += 5 * scale
    ss.health_checks["failure"] += scale
    reg.backend_up["g/s:1"] = ("g", "s:1", 1)
    reg.backend_state["g/s:1"] = ("g", "s:1", "draining")
    reg.backend_weight["g/s:1"] = ("g", "s:1", 0.25 * scale)
    reg.count_retry("g")


def test_collector_sums_over_registries():
    one, two = Registry(), Registry()
    _fill(one, 1)
    _fill(two, 2)
    two.reloads.success = 7  # reload counts come from the first registry only
    one.reloads.success, one.reloads.failure, one.reloads.last_success = 2, 1, 0
    one.reloads.last_timestamp = 1700000000.5
    m = exposition(one, two)

    assert m["lbproxy_requests_total"] == {
        labels(listener="web", server_group="g", server="s:1", code="200"): 3,
        labels(listener="web", server_group="g", server="", code="503"): 2,
    }
    assert m["lbproxy_connections_total"] == {labels(listener="web"): 9}
    assert m["lbproxy_connections_active"] == {labels(listener="web"): 3}
    # Closed connections' bytes plus what the still-open ones have moved so far.
    assert m["lbproxy_bytes_total"] == {
        labels(listener="web", direction="in"): 300 + 30,
        labels(listener="web", direction="out"): 3000 + 60,
    }
    dur = m["lbproxy_request_duration_seconds_bucket"]
    assert dur[labels(listener="web", server_group="g", le="0.001")] == 2  # the two 503s
    assert dur[labels(listener="web", server_group="g", le="0.005")] == 5
    assert dur[labels(listener="web", server_group="g", le="+Inf")] == 5
    assert m["lbproxy_request_duration_seconds_count"] == {
        labels(listener="web", server_group="g"): 5
    }
    assert m["lbproxy_upstream_response_seconds_count"] == {
        labels(server_group="g", server="s:1"): 2
    }
    assert m["lbproxy_upstream_response_seconds_sum"][
        labels(server_group="g", server="s:1")
    ] == pytest.approx(0.004)
    assert m["lbproxy_websockets_active"] == {
        labels(listener="web", server_group="g", server="s:1"): 2
    }
    assert m["lbproxy_websockets_total"] == {
        labels(listener="web", server_group="g", server="s:1"): 2
    }
    closes = m["lbproxy_websocket_closes_total"]
    assert closes[labels(listener="web", reason="client")] == 2
    assert closes[labels(listener="web", reason="shutdown")] == 3
    assert closes[labels(listener="web", reason="error")] == 0
    assert len(closes) == 8
    assert m["lbproxy_websocket_policy_closes_total"] == {
        labels(listener="web", reason="max_message_size"): 2,
        labels(listener="web", reason="messages_per_second"): 0,
        labels(listener="web", reason="extension"): 0,
    }
    assert m["lbproxy_websocket_messages_total"] == {
        labels(listener="web", direction="in"): 30,
        labels(listener="web", direction="out"): 60,
    }
    assert m["lbproxy_websocket_close_codes_total"] == {
        labels(listener="web", side="proxy", code="1001"): 2,
        labels(listener="web", side="client", code="none"): 2,
    }
    assert m["lbproxy_websockets_drained_total"] == {labels(server_group="g", server="s:1"): 3}
    assert m["lbproxy_websockets_rebalanced_total"] == {labels(server_group="g", server="s:1"): 6}
    # One owner of the ramps (the first registry's, not a sum over processes).
    assert m["lbproxy_backend_effective_weight"] == {labels(server_group="g", server="s:1"): 0.25}
    # One owner of the state (not a sum over processes): 1 for the current one only.
    assert m["lbproxy_backend_state"] == {
        labels(server_group="g", server="s:1", state=st): 1 if st == "draining" else 0
        for st in ("up", "down", "unknown", "draining")
    }
    assert m["lbproxy_websocket_duration_seconds_count"] == {
        labels(listener="web", server_group="g"): 2
    }
    assert m["lbproxy_backend_up"] == {labels(server_group="g", server="s:1"): 2}
    assert m["lbproxy_health_checks_total"] == {
        labels(server_group="g", server="s:1", result="success"): 15,
        labels(server_group="g", server="s:1", result="failure"): 3,
    }
    errors = m["lbproxy_upstream_errors_total"]
    assert errors == {
        labels(server_group="g", server="s:1", kind="connect"): 3,
        labels(server_group="g", server="s:1", kind="timeout"): 0,
        labels(server_group="g", server="s:1", kind="reset"): 0,
        labels(server_group="g", server="s:1", kind="protocol"): 0,
    }
    assert m["lbproxy_connections_refused_total"] == {
        labels(listener="web", reason="max_connections"): 6,
        labels(listener="web", reason="acl"): 3,
        labels(listener="web", reason="connections_per_client"): 15,
        labels(listener="web", reason="proxy_protocol"): 21,
    }
    assert m["lbproxy_backend_tls_handshake_failures_total"] == {
        labels(server_group="g", server="s:1", reason="verify"): 12,
        labels(server_group="g", server="s:1", reason="certificate"): 0,
        labels(server_group="g", server="s:1", reason="protocol"): 0,
        labels(server_group="g", server="s:1", reason="reset"): 0,
        labels(server_group="g", server="s:1", reason="other"): 0,
    }
    assert m["lbproxy_tls_handshake_failures_total"] == {
        labels(listener="web", reason="client_certificate"): 3,
        labels(listener="web", reason="protocol"): 0,
        labels(listener="web", reason="timeout"): 0,
        labels(listener="web", reason="other"): 0,
    }
    assert m["lbproxy_retries_total"] == {labels(server_group="g"): 2}
    assert m["lbproxy_config_reloads_total"] == {
        labels(result="success"): 2,
        labels(result="failure"): 1,
    }
    assert m["lbproxy_config_last_reload_success"] == {(): 0}
    assert m["lbproxy_config_last_reload_timestamp_seconds"] == {(): 1700000000.5}


def test_collector_of_one_registry_equals_collector_of_a_list_of_it():
    reg = Registry()
    _fill(reg, 1)
    prom = CollectorRegistry(auto_describe=False)
    prom.register(Collector(reg))
    single = generate_latest(prom)
    prom2 = CollectorRegistry(auto_describe=False)
    prom2.register(Collector([reg]))
    assert generate_latest(prom2) == single


def test_a_fresh_registry_reports_a_successful_start():
    m = exposition(Registry())
    assert m["lbproxy_config_reloads_total"] == {
        labels(result="success"): 0,
        labels(result="failure"): 0,
    }
    assert m["lbproxy_config_last_reload_success"] == {(): 1}
    assert "lbproxy_requests_total" not in m  # no traffic, no series


def test_requests_by_protocol_and_rapid_resets_sum_over_workers() -> None:
    one, two = Registry(), Registry()
    one.listener("web").count_request("g", "s:1", 200, 0.01, "HTTP/2")
    one.listener("web").count_request("g", "s:1", 200, 0.01)  # HTTP/1.1 unless said
    two.listener("web").count_request("g", "s:1", 404, 0.01, "HTTP/2")
    two.listener("web").count_request("g", "s:1", 200, 0.01, "HTTP/1.0")
    two.listener("web").h2_rapid_resets += 2
    m = exposition(one, load_registry(json.loads(json.dumps(dump_registry(two)))))
    by_protocol = m["lbproxy_requests_by_protocol_total"]
    assert by_protocol == {
        (("listener", "web"), ("protocol", "HTTP/1.0")): 1.0,
        (("listener", "web"), ("protocol", "HTTP/1.1")): 1.0,
        (("listener", "web"), ("protocol", "HTTP/2")): 2.0,
    }
    assert m["lbproxy_http2_rapid_reset_closes_total"] == {(("listener", "web"),): 2.0}


# ------------------------------------------------------------------ WebSockets per server
def test_a_tunnels_end_is_classed_by_its_first_close_frame() -> None:
    assert close_class("client", 1000) == "1000"
    assert close_class("proxy", 1001) == "1001"  # a drain or a shutdown
    assert close_class("server", 1006) == "1006"  # sent (wrongly) in a frame: still abnormal
    assert close_class(None, None) == "1006"  # no close frame: the connection just ended
    assert close_class("client", None) == "other"  # a close frame without a code (1005)
    assert close_class("proxy", 1009) == "other"  # the policy: too big
    assert close_class("server", 4000) == "other"


def test_a_servers_messages_and_closes_are_folded_in_once_as_each_tunnel_ends() -> None:
    reg = Registry()
    ss = reg.server("g/s:1", "g", "s:1")
    for _ in range(3):
        ss.ws_opened("web")
    ss.ws_closed("web", 5, 7, "1000")
    ss.ws_closed("web", 1, 0, "1006")
    ss.ws_closed("web", 0, 2, "1006")
    assert (ss.ws_messages_in, ss.ws_messages_out) == (6, 9)
    assert ss.ws_close_classes == {"1000": 1, "1001": 0, "1006": 2, "other": 0}
    assert ss.ws_active == {"web": 0}


def test_open_tunnels_messages_are_read_per_server_and_travel_in_a_workers_dump() -> None:
    reg = Registry()
    web, api = reg.listener("web"), reg.listener("api")
    ss = reg.server("g/s:1", "g", "s:1")
    reg.server("g/t:1", "g", "t:1")
    ss.ws_opened("web")
    ss.ws_closed("web", 100, 200, "1001")  # an ended tunnel, already in the counters
    web.live.add(_Live(0, 0, "g/s:1", (3, 4)))
    api.live.add(_Live(0, 0, "g/s:1", (10, 20)))
    web.live.add(_Live(0, 0))  # a plain HTTP connection: no messages, no server
    assert reg.live_messages() == {"g/s:1": [13, 24]}
    # The dump adds the open ones' to the ended ones' (the counters stay as they are) ...
    dumped = load_registry(json.loads(json.dumps(dump_registry(reg))))
    assert (ss.ws_messages_in, ss.ws_messages_out) == (100, 200)
    got = dumped.servers["g/s:1"]
    assert (got.ws_messages_in, got.ws_messages_out) == (113, 224)
    assert got.ws_close_classes == {"1000": 0, "1001": 1, "1006": 0, "other": 0}
    assert dumped.servers["g/t:1"].ws_messages_in == 0
    assert dumped.live_messages() == {}  # ... and a loaded registry has nothing open
    # ... and two workers' dumps sum like every other counter.
    total = merge_registries([dumped, dumped]).servers["g/s:1"]
    assert (total.ws_messages_in, total.ws_messages_out) == (226, 448)
    assert total.ws_close_classes["1001"] == 2


# ------------------------------------------------------------------ README
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_metrics() -> list[tuple[str, str, tuple[str, ...]]]:
    """(exposed name, type, label names) of each row of the README's metrics table."""
    section = README.read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `lbproxy_"):
            continue
        name, kind, label_cell = (c.strip() for c in line.strip("|").split("|"))
        found = re.match(r"(counter|gauge|histogram)\b", kind)
        assert found, f"{name}: the type column does not start with a type: {kind!r}"
        # Each label may be followed by "(what its values are)", commas and all.
        while (bare := re.sub(r"\([^()]*\)", "", label_cell)) != label_cell:
            label_cell = bare
        labels = tuple(x.strip() for x in label_cell.split(",") if x.strip())
        rows.append((name.strip("`"), found.group(1), labels))
    return rows


def test_readme_metrics_table_lists_exactly_the_families_in_order():
    expected = [
        (f.name + ("_total" if f.kind == "counter" else ""), f.kind, f.labels) for f in TABLE
    ]
    assert readme_metrics() == expected


def test_the_table_of_families_is_what_the_collector_exposes():
    assert {f.name: f.kind for f in TABLE} == FAMILIES
    assert len(TABLE) == len(FAMILIES)  # no name twice
