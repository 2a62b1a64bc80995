"""The config model: defaults, value parsing, and every problem reported at once with its place.

Pure: ``parse_config`` works on in-memory mappings; only ``load_config`` reads (tmp) files.
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbproxy import config as cfg
from lbproxy.config import (
    AccessLog,
    Address,
    Admin,
    Config,
    ConfigError,
    HealthCheck,
    Listener,
    Server,
    ServerGroup,
    Timeouts,
    parse_address,
    parse_config,
    parse_duration,
)
from lbproxy.config import load as config_load
from lbproxy.config.top import parse_shed
from lbproxy.control.loading import load_config

REPO = Path(__file__).resolve().parents[2]


def minimal() -> dict[str, Any]:
    """The smallest valid document: one listener ``web`` -> group ``rs1`` with one server."""
    return {
        "listeners": [{"name": "web", "bind": "0.0.0.0:5000", "server_group": "rs1"}],
        "server_groups": {"rs1": {"servers": ["127.0.0.1:5001"]}},
    }


def with_(path: str, value: Any, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of ``doc`` (default: minimal) with the dotted ``path`` set; ``[i]`` indexes lists."""
    doc = copy.deepcopy(doc if doc is not None else minimal())
    parts = path.replace("[", ".").replace("]", "").split(".")
    node: Any = doc
    for part in parts[:-1]:
        key: Any = int(part) if part.isdigit() else part
        if isinstance(node, dict) and key not in node:
            node[key] = {}
        node = node[key]
    last = parts[-1]
    node[int(last) if last.isdigit() else last] = value
    return doc


def problems(doc: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


# --------------------------------------------------------------------------------- defaults


def test_minimal_document_gets_every_default():
    c = parse_config(minimal())
    assert c == Config(
        listeners=(Listener(name="web", bind=Address("0.0.0.0", 5000), server_group="rs1"),),
        server_groups=(ServerGroup(name="rs1", servers=(Server(Address("127.0.0.1", 5001)),)),),
    )
    (lst,) = c.listeners
    assert lst.protocol == "http"
    assert lst.timeouts == Timeouts(idle=60.0, request=60.0, connect=5.0, client_header=10.0)
    assert lst.x_forwarded_for is True
    (group,) = c.server_groups
    assert group.scheduler == "rr"
    assert group.servers[0].weight == 100
    assert group.keepalive_connections == 32
    assert group.keepalive_timeout == 4.0
    assert group.health_check == HealthCheck(
        enabled=True,
        protocol="http",
        path="/",
        method="HEAD",
        host="",
        port=0,
        interval=2.0,
        timeout=5.0,
        healthy_threshold=3,
        unhealthy_threshold=3,
        expected_codes=("http_2xx", "http_3xx"),
    )
    assert c.admin == Admin(Address("127.0.0.1", 8404))
    assert c.access_log == AccessLog(enabled=True, format="text", path="")
    assert c.shutdown_timeout == 30.0
    assert c.digest == ""
    assert c.group("rs1") is group
    with pytest.raises(KeyError):
        c.group("nope")


@pytest.mark.parametrize("section", ["admin", "access_log"])
def test_empty_optional_sections_mean_defaults(section):
    assert parse_config(with_(section, None)) == parse_config(minimal())
    assert parse_config(with_(section, {})) == parse_config(minimal())


def test_empty_health_check_and_server_list():
    c = parse_config(with_("server_groups.rs1", {"servers": None, "health_check": None}))
    assert c.server_groups[0].servers == ()
    assert c.server_groups[0].health_check == HealthCheck()
    assert parse_config(with_("server_groups.rs1.servers", [])).server_groups[0].servers == ()


def test_every_key_set_explicitly():
    doc = {
        "listeners": [
            {
                "name": "web",
                "bind": "[::]:5000",
                "protocol": "http",
                "server_group": "rs1",
                "idle_timeout": "300ms",
                "request_timeout": "2m",
                "connect_timeout": 1.5,
                "x_forwarded_for": False,
            }
        ],
        "server_groups": {
            "rs1": {
                "scheduler": "wlc",
                "servers": [{"address": "10.0.0.1:80", "weight": 0}, "backend_1.local:8080"],
                "keepalive_connections": 0,
                "keepalive_timeout": "10s",
                "health_check": {
                    "enabled": False,
                    "protocol": "tcp",
                    "path": "/healthz?full=1",
                    "method": "GET",
                    "host": "app.example:8080",
                    "port": 9000,
                    "interval": "500ms",
                    "timeout": "250ms",
                    "healthy_threshold": 1,
                    "unhealthy_threshold": 100,
                    "expected_codes": ["http_2xx", 404, "418"],
                },
            }
        },
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False, "format": "json", "path": "/var/log/lb.log"},
        "shutdown_timeout": "1m",
    }
    assert parse_config(doc) == Config(
        listeners=(
            Listener(
                name="web",
                bind=Address("::", 5000),
                server_group="rs1",
                idle_timeout=0.3,
                request_timeout=120.0,
                connect_timeout=1.5,
                x_forwarded_for=False,
            ),
        ),
        server_groups=(
            ServerGroup(
                name="rs1",
                servers=(
                    Server(Address("10.0.0.1", 80), 0),
                    Server(Address("backend_1.local", 8080)),
                ),
                scheduler="wlc",
                health_check=HealthCheck(
                    False,
                    "tcp",
                    "/healthz?full=1",
                    "GET",
                    "app.example:8080",
                    9000,
                    0.5,
                    0.25,
                    1,
                    100,
                    ("http_2xx", 404, 418),
                ),
                keepalive_connections=0,
                keepalive_timeout=10.0,
            ),
        ),
        admin=Admin(Address("127.0.0.1", 0)),
        access_log=AccessLog(False, "json", "/var/log/lb.log"),
        shutdown_timeout=60.0,
    )


# -------------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (60, 60.0),
        ("60", 60.0),
        ("60s", 60.0),
        ("500ms", 0.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        (1.5, 1.5),
        (" 30s ", 30.0),
    ],
)
def test_duration_accepted(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "expected a positive duration, got -1"),
        (0, "expected a positive duration, got 0"),
        ("0", "expected a positive duration, got '0'"),
        ("0ms", "expected a positive duration, got '0ms'"),
        (float("inf"), "expected a positive duration, got inf"),
        ("-1s", "expected a duration like 60s, 500ms or 2m, got '-1s'"),
        ("abc", "expected a duration like 60s, 500ms or 2m, got 'abc'"),
        ("5 parsecs", "expected a duration like 60s, 500ms or 2m, got '5 parsecs'"),
        ("10d", "expected a duration like 60s, 500ms or 2m, got '10d'"),
        ("", "expected a duration like 60s, 500ms or 2m, got ''"),
        (True, "expected a duration like 60s, 500ms or 2m, got true"),
        (None, "expected a duration like 60s, 500ms or 2m, got nothing"),
        ([1], "expected a duration like 60s, 500ms or 2m, got a list"),
    ],
)
def test_duration_rejected(value, message):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == message


def test_bad_duration_in_a_file_names_its_place():
    doc = with_("listeners[0].idle_timeout", "5 parsecs")
    doc = with_("server_groups.rs1.health_check.interval", True, doc)
    doc = with_("shutdown_timeout", -1, doc)
    assert problems(doc) == [  # in the order the document is written
        "listeners[0].idle_timeout: expected a duration like 60s, 500ms or 2m, got '5 parsecs'",
        "server_groups.rs1.health_check.interval: "
        "expected a duration like 60s, 500ms or 2m, got true",
        "shutdown_timeout: expected a positive duration, got -1",
    ]


# -------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:5001", "127.0.0.1", 5001),
        ("[::]:5000", "::", 5000),
        ("[::1]:80", "::1", 80),
        ("localhost:80", "localhost", 80),
        ("app_1.internal:65535", "app_1.internal", 65535),
    ],
)
def test_address_accepted(text, host, port):
    assert parse_address(text) == Address(host, port)


def test_address_str_brackets_ipv6():
    assert str(Address("::1", 80)) == "[::1]:80"
    assert str(Address("127.0.0.1", 80)) == "127.0.0.1:80"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1", "expected host:port, got '127.0.0.1'"),
        (":80", "expected host:port, got ':80'"),
        ("::1:80", "an IPv6 address needs brackets, [::1]:80, got '::1:80'"),
        ("host:99999", "port must be 1..65535, got 99999"),
        ("host:0", "port must be 1..65535, got 0"),
        ("host:", "expected host:port with a numeric port, got 'host:'"),
        ("host:http", "expected host:port with a numeric port, got 'host:http'"),
        ("host:-1", "expected host:port with a numeric port, got 'host:-1'"),
        ("[::1]", "expected [ipv6]:port, got '[::1]'"),
        ("[nope]:80", "not an IPv6 address in '[nope]:80'"),
        (
            "http://127.0.0.1:5001",
            "expected host:port without a scheme, got 'http://127.0.0.1:5001'",
        ),
        ("my host:80", "expected host:port with a host name or IPv4 address, got 'my host:80'"),
        ("*:80", "expected host:port with a host name or IPv4 address, got '*:80'"),
        (5001, "expected host:port, got 5001"),
        (None, "expected host:port, got nothing"),
    ],
)
def test_address_rejected(text, message):
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert str(info.value) == message


def test_port_zero_only_for_listeners_and_admin():
    assert parse_address("host:0", allow_port_zero=True) == Address("host", 0)
    with pytest.raises(ValueError, match=r"^port must be 0\.\.65535, got 70000$"):
        parse_address("host:70000", allow_port_zero=True)
    c = parse_config(with_("admin.bind", "127.0.0.1:0", with_("listeners[0].bind", "[::]:0")))
    assert c.listeners[0].bind == Address("::", 0)
    assert c.admin.bind == Address("127.0.0.1", 0)
    assert problems(with_("server_groups.rs1.servers", ["127.0.0.1:0"])) == [
        "server_groups.rs1.servers[0].address: port must be 1..65535, got 0"
    ]


# ------------------------------------------------------------------- problems, all at once


def test_spec_example_exact_line():
    doc = with_("server_groups.rs1.servers", ["127.0.0.1:5001", {"address": "127.0.0.1"}])
    assert problems(doc) == [
        "server_groups.rs1.servers[1].address: expected host:port, got '127.0.0.1'"
    ]


def test_every_problem_reported_at_once_with_its_place():
    doc = {
        "listeners": [
            {"name": "web", "bind": "0.0.0.0", "server_group": "rs1", "idle_timeout": "abc"},
            {"bind": "0.0.0.0:5001", "server_group": "nope"},
        ],
        "server_groups": {
            "rs1": {
                "scheduler": "roundrobin",
                "servers": [{"address": "127.0.0.1:5001", "weight": 101}, "[::1]"],
                "health_check": {"method": "POST", "healthy_threshold": 0},
            }
        },
        "admin": {"bind": "localhost"},
        "access_log": {"format": "xml"},
        "shutdown_timeout": "soon",
    }
    assert problems(doc) == [  # in the order the document is written
        "listeners[0].bind: expected host:port, got '0.0.0.0'",
        "listeners[0].idle_timeout: expected a duration like 60s, 500ms or 2m, got 'abc'",
        "listeners[1].server_group: no server group 'nope' (known: rs1)",
        "listeners[1].name: required",
        "server_groups.rs1.scheduler: expected one of rr, wrr, wlc, sh, got 'roundrobin'",
        "server_groups.rs1.servers[0].weight: expected an integer 0..100, got 101",
        "server_groups.rs1.servers[1].address: expected [ipv6]:port, got '[::1]'",
        "server_groups.rs1.health_check.method: expected one of HEAD, GET, got 'POST'",
        "server_groups.rs1.health_check.healthy_threshold: expected an integer 1..100, got 0",
        "admin.bind: expected host:port, got 'localhost'",
        "access_log.format: expected one of text, json, got 'xml'",
        "shutdown_timeout: expected a duration like 60s, 500ms or 2m, got 'soon'",
    ]


def test_a_broken_group_does_not_also_break_its_listeners():
    doc = with_("server_groups.rs1.servers[0]", {"address": "127.0.0.1:5001", "weight": -1})
    assert problems(doc) == [
        "server_groups.rs1.servers[0].weight: expected an integer 0..100, got -1"
    ]


# Every key the file takes at each place, in the order the unknown-key message lists them.
TOP_KEYS = (
    "listeners",
    "server_groups",
    "admin",
    "access_log",
    "shutdown_timeout",
    "resolvers",
    "cluster",
)
LISTENER_KEYS = (
    "name",
    "bind",
    "protocol",
    "server_group",
    "idle_timeout",
    "request_timeout",
    "connect_timeout",
    "x_forwarded_for",
    "rules",
    "client_header_timeout",
    "max_request_line",
    "max_header_size",
    "max_header_count",
    "max_connections",
    "tls",
    "redirect_https",
    "acl",
    "proxy_protocol",
    "http2",
    "http2_websocket",
    "websocket",
    "x_forwarded_proto",
    "x_forwarded_port",
    "x_forwarded_client_srcport",
    "slb_ip",
    "slb_id",
    "trusted_proxies",
    "limits",
    "bandwidth",
    "gzip",
    "gzip_types",
    "gzip_min_length",
)
GROUP_KEYS = (
    "scheduler",
    "servers",
    "health_check",
    "keepalive_connections",
    "keepalive_timeout",
    "hash_key",
    "sticky_session",
    "drain_timeout",
    "drain_close_code",
    "slow_start",
    "rebalance",
    "discovery",
    "proxy_protocol",
    "tls",
)
CHECK_KEYS = (
    "enabled",
    "protocol",
    "path",
    "method",
    "host",
    "port",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "expected_codes",
)


def allowed_at(place: str, doc: dict[str, Any]) -> tuple[str, ...]:
    """The keys the file accepts at ``place`` of ``doc``, as its unknown-key message lists them."""
    bogus = f"{place}.zzzz" if place else "zzzz"
    (problem,) = [p for p in problems(with_(bogus, 1, doc)) if p.startswith(bogus + ":")]
    return tuple(problem.split("allowed: ", 1)[1].removesuffix(")").split(", "))


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("bogus", TOP_KEYS),
        ("listeners[0].bogus", LISTENER_KEYS),
        ("server_groups.rs1.bogus", GROUP_KEYS),
        ("server_groups.rs1.servers[0].bogus", ("address", "weight")),
        ("server_groups.rs1.health_check.bogus", CHECK_KEYS),
        (
            "admin.bogus",
            (
                "bind",
                "token",
                "token_file",
                "token_env",
                "token_for_reads",
                "insecure",
                "allowed_hosts",
                "tls",
            ),
        ),
        ("access_log.bogus", ("enabled", "format", "path")),
    ],
)
def test_unknown_key_is_an_error_naming_its_place(path, allowed):
    doc = with_("server_groups.rs1.servers", [{"address": "127.0.0.1:5001"}])
    assert problems(with_(path, 1, doc)) == [f"{path}: unknown key (allowed: {', '.join(allowed)})"]


def test_schema_keys_include_the_documented_ones():
    doc = minimal()
    assert allowed_at("", doc) == TOP_KEYS
    assert set(allowed_at("listeners[0]", doc)) >= {
        "name",
        "bind",
        "protocol",
        "server_group",
        "idle_timeout",
        "request_timeout",
        "connect_timeout",
        "x_forwarded_for",
    }
    assert set(allowed_at("server_groups.rs1", doc)) >= {
        "scheduler",
        "servers",
        "health_check",
        "keepalive_connections",
        "keepalive_timeout",
    }
    servers = with_("server_groups.rs1.servers", [{"address": "127.0.0.1:5001"}])
    assert allowed_at("server_groups.rs1.servers[0]", servers) == ("address", "weight")
    assert allowed_at("server_groups.rs1.health_check", doc) == CHECK_KEYS


def test_typo_in_a_key_is_reported_and_the_rest_still_checked():
    doc = with_("listeners[0].idle_timout", "30s")
    doc = with_("server_groups.rs1.healthcheck", {"path": "/health"}, doc)
    doc = with_("server_groups.rs1.servers", ["127.0.0.1:5001", "127.0.0.1:5001"], doc)
    assert [p.split(":")[0] for p in problems(doc)] == [
        "listeners[0].idle_timout",
        "server_groups.rs1.servers[1].address",
        "server_groups.rs1.healthcheck",
    ]


# ---------------------------------------------------------------- listeners and their links


def test_listener_referencing_an_unknown_group():
    assert problems(with_("listeners[0].server_group", "rs2")) == [
        "listeners[0].server_group: no server group 'rs2' (known: rs1)"
    ]


def test_listener_required_keys():
    assert problems(with_("listeners", [{}])) == [
        "listeners[0].name: required",
        "listeners[0].bind: required",
        "listeners[0].server_group: required",
    ]


@pytest.mark.parametrize(
    ("listeners", "message"),
    [
        ([], "listeners: expected a non-empty list of listeners, got an empty list"),
        ({"web": {}}, "listeners: expected a non-empty list of listeners, got a mapping"),
        (None, "listeners: expected a non-empty list of listeners, got nothing"),
    ],
)
def test_listeners_must_be_a_non_empty_list(listeners, message):
    assert problems(with_("listeners", listeners)) == [message]


def test_duplicate_listener_names():
    second = {"name": "web", "bind": "0.0.0.0:5001", "server_group": "rs1"}
    doc = minimal()
    doc["listeners"].append(second)
    assert problems(doc) == ["listeners[1].name: duplicate listener name 'web'"]


def test_duplicate_binds_name_the_later_listener():
    doc = minimal()
    doc["listeners"] = [
        {"name": "a", "bind": "bad", "server_group": "rs1"},
        {"name": "b", "bind": "127.0.0.1:5000", "server_group": "rs1"},
        {"name": "c", "bind": "127.0.0.1:5000", "server_group": "rs1"},
    ]
    assert problems(doc) == [
        "listeners[0].bind: expected host:port, got 'bad'",
        "listeners[2].bind: 127.0.0.1:5000 is already used by listener b",
    ]


def test_port_zero_binds_never_clash():
    doc = minimal()
    doc["listeners"] = [
        {"name": "a", "bind": "127.0.0.1:0", "server_group": "rs1"},
        {"name": "b", "bind": "127.0.0.1:0", "server_group": "rs1"},
    ]
    doc["admin"] = {"bind": "127.0.0.1:0"}
    assert [lst.name for lst in parse_config(doc).listeners] == ["a", "b"]


def test_admin_on_a_listener_address():
    doc = with_("admin", {"bind": "0.0.0.0:5000", "token": "t0ken"})
    assert problems(doc) == ["admin.bind: 0.0.0.0:5000 is already used by listener web"]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("name", "my web", "expected a name of letters, digits, '_', '.', '-', got 'my web'"),
        ("name", 7, "expected a name of letters, digits, '_', '.', '-', got 7"),
        ("protocol", "tcp", "expected one of http, https, got 'tcp'"),
        ("x_forwarded_for", "yes", "expected true or false, got 'yes'"),
        ("request_timeout", 0, "expected a positive duration, got 0"),
        ("connect_timeout", "1e3", "expected a duration like 60s, 500ms or 2m, got '1e3'"),
    ],
)
def test_listener_bad_values(key, value, message):
    assert problems(with_(f"listeners[0].{key}", value)) == [f"listeners[0].{key}: {message}"]


# ------------------------------------------------------------------- server groups, servers


def test_server_groups_required_and_non_empty():
    doc = minimal()
    del doc["server_groups"]
    assert problems(doc) == [
        "listeners[0].server_group: no server group 'rs1' (known: none defined)",
        "server_groups: required (a mapping of group name to group)",
    ]
    assert problems(with_("server_groups", {})) == [
        "listeners[0].server_group: no server group 'rs1' (known: none defined)",
        "server_groups: expected at least one server group",
    ]
    assert problems(with_("server_groups", ["rs1"])) == [
        "listeners[0].server_group: no server group 'rs1' (known: none defined)",
        "server_groups: expected a mapping, got a list",
    ]


def test_group_needs_servers_key():
    assert problems(with_("server_groups.rs1", {})) == [
        "server_groups.rs1.servers: required (a list of servers, may be empty), or discovery"
    ]
    assert problems(with_("server_groups.rs1.servers", "127.0.0.1:5001")) == [
        "server_groups.rs1.servers: expected a list of servers, got '127.0.0.1:5001'"
    ]


def test_bad_group_name():
    doc = with_("server_groups.rs 2", {"servers": []})
    assert problems(doc) == [
        "server_groups.rs 2: bad group name: "
        "expected a name of letters, digits, '_', '.', '-', got 'rs 2'"
    ]


def test_duplicate_servers_in_a_group():
    doc = with_(
        "server_groups.rs1.servers",
        ["127.0.0.1:5001", "127.0.0.1:5002", {"address": "127.0.0.1:5001", "weight": 5}],
    )
    assert problems(doc) == [
        "server_groups.rs1.servers[2].address: duplicate server 127.0.0.1:5001"
    ]


def test_same_server_in_two_groups_is_fine():
    doc = with_("server_groups.rs2", {"servers": ["127.0.0.1:5001"]})
    assert [g.name for g in parse_config(doc).server_groups] == ["rs1", "rs2"]


@pytest.mark.parametrize("weight", [0, 1, 50, 100])
def test_weight_in_range(weight):
    doc = with_("server_groups.rs1.servers[0]", {"address": "127.0.0.1:5001", "weight": weight})
    assert parse_config(doc).server_groups[0].servers[0].weight == weight


@pytest.mark.parametrize(
    ("weight", "shown"), [(-1, "-1"), (101, "101"), ("50", "'50'"), (True, "true"), (1.5, "1.5")]
)
def test_weight_out_of_range(weight, shown):
    doc = with_("server_groups.rs1.servers[0]", {"address": "127.0.0.1:5001", "weight": weight})
    assert problems(doc) == [
        f"server_groups.rs1.servers[0].weight: expected an integer 0..100, got {shown}"
    ]


def test_server_needs_an_address():
    doc = with_("server_groups.rs1.servers[0]", {"weight": 5})
    assert problems(doc) == ["server_groups.rs1.servers[0].address: required"]
    doc = with_("server_groups.rs1.servers[0]", 5001)
    assert problems(doc) == ["server_groups.rs1.servers[0]: expected a mapping, got 5001"]


@pytest.mark.parametrize("scheduler", ["rr", "wrr", "wlc", "sh"])
def test_scheduler_names(scheduler):
    c = parse_config(with_("server_groups.rs1.scheduler", scheduler))
    assert c.server_groups[0].scheduler == scheduler


@pytest.mark.parametrize(("scheduler", "shown"), [("RR", "'RR'"), ("leastconn", "'leastconn'")])
def test_unknown_scheduler(scheduler, shown):
    assert problems(with_("server_groups.rs1.scheduler", scheduler)) == [
        f"server_groups.rs1.scheduler: expected one of rr, wrr, wlc, sh, got {shown}"
    ]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("keepalive_connections", -1, "expected an integer 0..10000, got -1"),
        ("keepalive_connections", 10001, "expected an integer 0..10000, got 10001"),
        ("keepalive_timeout", "0s", "expected a positive duration, got '0s'"),
        ("drain_timeout", "-1s", "expected a duration like 60s, 500ms or 2m, got '-1s'"),
        ("drain_timeout", True, "expected a duration like 60s, 500ms or 2m, got true"),
        (
            "drain_close_code",
            1000,
            "expected 1001 (Going Away) or 1012 (Service Restart), got 1000",
        ),
        (
            "drain_close_code",
            "1001",
            "expected 1001 (Going Away) or 1012 (Service Restart), got '1001'",
        ),
        ("slow_start", "-1s", "expected a duration like 60s, 500ms or 2m, got '-1s'"),
    ],
)
def test_group_bad_values(key, value, message):
    assert problems(with_(f"server_groups.rs1.{key}", value)) == [
        f"server_groups.rs1.{key}: {message}"
    ]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tolerance", 1, "must be above 1, got 1"),
        ("tolerance", 0, "expected a positive number, got 0"),
        ("rate", 0, "expected an integer 1..100000, got 0"),
        ("close_code", 1000, "expected 1001 (Going Away) or 1012 (Service Restart), got 1000"),
        ("bogus", 1, "unknown key (allowed: tolerance, rate, close_code)"),
    ],
)
def test_rebalance_bad_values(key, value, message):
    assert problems(with_("server_groups.rs1.rebalance", {key: value})) == [
        f"server_groups.rs1.rebalance.{key}: {message}"
    ]


def test_slow_start_and_rebalance_defaults():
    g = parse_config(minimal()).server_groups[0]
    assert (g.slow_start, g.rebalance) == (0.0, None)
    g = parse_config(with_("server_groups.rs1.rebalance", {})).server_groups[0]
    assert g.rebalance is not None
    assert (g.rebalance.tolerance, g.rebalance.rate, g.rebalance.close_code) == (1.25, 20, 1012)
    g = parse_config(with_("server_groups.rs1.slow_start", "30s")).server_groups[0]
    assert g.slow_start == 30.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"fraction": 0.5, "over": "60s"}, (0.5, None, 60.0)),
        ({"count": 3}, (None, 3, 0.0)),
        ({"fraction": 1}, (1.0, None, 0.0)),
    ],
)
def test_shed_body(body, expected):
    problems_, req = parse_shed(body)
    assert problems_ == [] and req is not None
    assert (req.fraction, req.count, req.over) == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, 'expected a JSON object with "fraction" (0..1) or "count", and "over"'),
        ({"fraction": 0.5, "count": 2}, 'expected a JSON object with "fraction" (0..1) or'),
        ({"fraction": 2}, "fraction: expected a number above 0 and at most 1, got 2"),
        ({"fraction": 0}, "fraction: expected a positive number, got 0"),
        ({"count": 0}, "count: expected an integer 1..10000000, got 0"),
        ({"count": 1, "over": "soon"}, "over: expected a duration"),
        ({"count": 1, "bogus": 1}, "bogus: unknown key"),
        (None, "expected"),
    ],
)
def test_shed_body_errors(body, message):
    problems_, req = parse_shed(body)
    assert req is None
    assert any(message in p for p in problems_), problems_


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 0.0), (0, 0.0), ("0s", 0.0), ("0", 0.0), ("30s", 30.0), (2, 2.0)]
)
def test_drain_timeout_zero_means_off(value, seconds):
    doc = with_("server_groups.rs1.drain_timeout", value) if value is not None else minimal()
    g = parse_config(doc).server_groups[0]
    assert (g.drain_timeout, g.drain_close_code) == (seconds, 1001)
    g = parse_config(with_("server_groups.rs1.drain_close_code", 1012)).server_groups[0]
    assert g.drain_close_code == 1012


# ----------------------------------------------------------------------------- health check

HC = "server_groups.rs1.health_check"


@pytest.mark.parametrize(
    ("key", "value"), [("protocol", "tcp"), ("protocol", "websocket"), ("method", "GET")]
)
def test_health_check_choices(key, value):
    c = parse_config(with_(f"{HC}.{key}", value))
    assert getattr(c.server_groups[0].health_check, key) == value


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("enabled", "yes", "expected true or false, got 'yes'"),
        ("protocol", "https", "expected one of http, tcp, websocket, got 'https'"),
        ("method", "POST", "expected one of HEAD, GET, got 'POST'"),
        ("method", "get", "expected one of HEAD, GET, got 'get'"),
        ("path", "health", "expected a path starting with '/', got 'health'"),
        ("path", "/a b", "expected a path starting with '/', got '/a b'"),
        ("path", "/a\r\nX: y", "expected a path starting with '/', got '/a\\r\\nX: y'"),
        ("host", "a\r\nX: y", "expected a Host header value like example.com, got 'a\\r\\nX: y'"),
        ("host", 5, "expected a Host header value like example.com, got 5"),
        ("port", 65536, "expected an integer 0..65535, got 65536"),
        ("port", -1, "expected an integer 0..65535, got -1"),
        ("interval", "0", "expected a positive duration, got '0'"),
        ("timeout", "abc", "expected a duration like 60s, 500ms or 2m, got 'abc'"),
        ("healthy_threshold", 0, "expected an integer 1..100, got 0"),
        ("unhealthy_threshold", 0, "expected an integer 1..100, got 0"),
        ("unhealthy_threshold", 101, "expected an integer 1..100, got 101"),
    ],
)
def test_health_check_bad_values(key, value, message):
    assert problems(with_(f"{HC}.{key}", value)) == [f"{HC}.{key}: {message}"]


@pytest.mark.parametrize("threshold", [1, 100])
def test_health_check_threshold_bounds(threshold):
    doc = with_(f"{HC}.healthy_threshold", threshold)
    doc = with_(f"{HC}.unhealthy_threshold", threshold, doc)
    check = parse_config(doc).server_groups[0].health_check
    assert (check.healthy_threshold, check.unhealthy_threshold) == (threshold, threshold)


@pytest.mark.parametrize(
    ("codes", "parsed"),
    [
        (["http_2xx"], ("http_2xx",)),
        (
            ["http_2xx", "http_3xx", "http_4xx", "http_5xx"],
            ("http_2xx", "http_3xx", "http_4xx", "http_5xx"),
        ),
        (["HTTP_3XX"], ("http_3xx",)),
        ([200, "204", 599, 100], (200, 204, 599, 100)),
        (["http_2xx", 301, 301, "301"], ("http_2xx", 301)),
    ],
)
def test_expected_codes_accepted(codes, parsed):
    c = parse_config(with_(f"{HC}.expected_codes", codes))
    assert c.server_groups[0].health_check.expected_codes == parsed


_NEITHER = (
    "is neither a status class (http_2xx, http_3xx, http_4xx, http_5xx) nor a status code 100..599"
)


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        ([], "expected a non-empty list like [http_2xx, 301], got an empty list"),
        ("http_2xx", "expected a non-empty list like [http_2xx, 301], got 'http_2xx'"),
        (200, "expected a non-empty list like [http_2xx, 301], got 200"),
        (["http_6xx"], f"item 0 ('http_6xx') {_NEITHER}"),
        (["http_1xx"], f"item 0 ('http_1xx') {_NEITHER}"),
        (["2xx"], f"item 0 ('2xx') {_NEITHER}"),
        ([200, 99], f"item 1 (99) {_NEITHER}"),
        ([600], f"item 0 (600) {_NEITHER}"),
        ([True], f"item 0 (True) {_NEITHER}"),
        ([None], f"item 0 (None) {_NEITHER}"),
        ([[200]], f"item 0 ([200]) {_NEITHER}"),
    ],
)
def test_expected_codes_rejected(codes, message):
    assert problems(with_(f"{HC}.expected_codes", codes)) == [f"{HC}.expected_codes: {message}"]


def test_every_health_check_problem_at_once():
    doc = with_(
        HC,
        {"protocol": "udp", "path": "x", "interval": "never", "expected_codes": [], "port": "80"},
    )
    assert [p.split(": ")[0] for p in problems(doc)] == [
        f"{HC}.protocol",
        f"{HC}.path",
        f"{HC}.interval",
        f"{HC}.expected_codes",
        f"{HC}.port",
    ]


def test_websocket_check_takes_path_and_host_and_refuses_method_and_codes():
    doc = with_(HC, {"protocol": "websocket", "path": "/ws", "host": "chat.example"})
    check = parse_config(doc).server_groups[0].health_check
    assert (check.protocol, check.path, check.host) == ("websocket", "/ws", "chat.example")
    doc = with_(HC, {"protocol": "websocket", "method": "GET", "expected_codes": [101]})
    assert problems(doc) == [
        f"{HC}.method: not used with protocol: websocket (a GET expecting 101)",
        f"{HC}.expected_codes: not used with protocol: websocket (a GET expecting 101)",
    ]


# -------------------------------------------------------------------- admin, log, top level


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("enabled", 1, "expected true or false, got 1"),
        ("format", "xml", "expected one of text, json, got 'xml'"),
        ("path", 5, "expected a string, got 5"),
    ],
)
def test_access_log_bad_values(key, value, message):
    assert problems(with_(f"access_log.{key}", value)) == [f"access_log.{key}: {message}"]


@pytest.mark.parametrize("section", ["admin", "access_log"])
def test_section_must_be_a_mapping(section):
    assert problems(with_(section, "yes")) == [f"{section}: expected a mapping, got 'yes'"]


def test_empty_document():
    assert problems(None) == ["the config file is empty"]
    assert problems({}) == [
        "listeners: required (a list with at least one listener)",
        "server_groups: required (a mapping of group name to group)",
    ]


@pytest.mark.parametrize(
    ("doc", "shown"), [([1, 2], "a list"), ("listeners", "'listeners'"), (5, "5")]
)
def test_top_level_must_be_a_mapping(doc, shown):
    assert problems(doc) == [f"expected a mapping, got {shown}"]


def test_config_is_frozen():
    c = parse_config(minimal())
    with pytest.raises(AttributeError):
        c.shutdown_timeout = 1.0  # type: ignore[misc]


# ------------------------------------------------------------------------------ load_config


def write(tmp_path: Path, text: str, name: str = "lb.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


GOOD = """\
listeners:
  - name: web
    bind: 0.0.0.0:5000
    server_group: rs1
server_groups:
  rs1:
    servers:
      - 127.0.0.1:5001
"""


def test_load_config_reads_and_validates(tmp_path):
    c = load_config(write(tmp_path, GOOD))
    assert c == parse_config(minimal())
    assert len(c.digest) == 64
    assert c.digest == hashlib.sha256(GOOD.encode()).hexdigest()


def test_load_config_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}: config file not found"]


def test_load_config_unreadable_path_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(str(tmp_path))  # a directory
    assert info.value.problems == [f"{tmp_path}: cannot read config file: Is a directory"]


def test_load_config_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, GOOD + "  rs2: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.problems
    assert line.startswith(f"{path}:10:1: YAML syntax error: ")
    assert "\n" not in line


def test_load_config_tab_indent_is_a_syntax_error(tmp_path):
    path = write(tmp_path, "listeners:\n\t- name: web\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:2:1: YAML syntax error: found character '\\t' that cannot start any token"
    ]


def test_load_config_duplicate_key_is_an_error(tmp_path):
    text = GOOD + "  rs1:\n    servers: []\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:9:3: YAML syntax error: duplicate key 'rs1' (first on line 6)"
    ]


def test_load_config_duplicate_key_on_one_line(tmp_path):
    path = write(tmp_path, GOOD + "admin: {bind: 127.0.0.1:1, bind: 127.0.0.1:2}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:9:28: YAML syntax error: duplicate key 'bind' (first on line 9)"
    ]


def test_load_config_yaml_merge_keys_still_work(tmp_path):
    text = GOOD.replace("      - 127.0.0.1:5001\n", "      - {<<: *srv, weight: 7}\n")
    text = "x-defaults: &srv {address: 127.0.0.1:5001, weight: 1}\n" + text
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:  # x-defaults is an unknown key, the rest is fine
        load_config(path)
    assert info.value.problems == [
        f"{path}:1: x-defaults: unknown key (allowed: listeners, server_groups, admin, access_log, "
        "shutdown_timeout, resolvers, cluster)"
    ]
    doc = yaml.load(Path(path).read_text(), Loader=config_load._UniqueKeyLoader)
    assert doc["server_groups"]["rs1"]["servers"] == [{"address": "127.0.0.1:5001", "weight": 7}]


def test_load_config_empty_and_comment_only_files(tmp_path):
    for text in ("", "# nothing here\n"):
        with pytest.raises(ConfigError) as info:
            path = write(tmp_path, text)
            load_config(path)
        assert info.value.problems == [f"{path}: the config file is empty"]


def test_load_config_validation_problems_pass_through(tmp_path):
    path = write(tmp_path, GOOD.replace("127.0.0.1:5001", "127.0.0.1"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [  # with the file and line the problem is on
        f"{path}:8: server_groups.rs1.servers[0].address: expected host:port, got '127.0.0.1'"
    ]


def test_digest_is_not_part_of_equality(tmp_path):
    a = load_config(write(tmp_path, GOOD, "a.yaml"))
    b = load_config(write(tmp_path, "# a comment-only change\n" + GOOD, "b.yaml"))
    assert a.digest != b.digest
    assert a == b
    c = load_config(write(tmp_path, GOOD.replace("5001", "5002"), "c.yaml"))
    assert c != a


# ------------------------------------------------------------------------ shipped examples


def test_demo_config_is_the_documented_demo_with_defaults():
    c = load_config(str(REPO / "config" / "lb.yaml"))
    expected = parse_config(
        {
            "listeners": [
                # gzip: off by default (as nginx), on in the demo (as CLB)
                {"name": "web", "bind": "0.0.0.0:5000", "server_group": "rs1", "gzip": True}
            ],
            "server_groups": {
                "rs1": {
                    "scheduler": "wlc",  # WebSockets spread by open count
                    "servers": ["127.0.0.1:5001", "127.0.0.1:5002"],
                    "health_check": {"path": "/health"},
                }
            },
        }
    )
    assert c == expected


def _keys(node: Any) -> set[str]:
    return set(node) if isinstance(node, dict) else set()


def test_full_config_shows_every_key():
    doc = yaml.safe_load((REPO / "config" / "full.yaml").read_text())
    load_config(str(REPO / "config" / "full.yaml"))  # valid
    base = minimal()
    rule = with_("listeners[0].rules", [{"path": "/a", "server_group": "rs1"}])
    sticky = with_("server_groups.rs1.sticky_session", {"socketio": True})
    server = with_("server_groups.rs1.servers", [{"address": "127.0.0.1:5001"}])
    ws = with_("listeners[0].websocket", {"max_message_size": 10})
    dns = with_("server_groups.rs1.discovery", {"dns": "chat.internal", "port": 80})
    assert _keys(doc) == set(allowed_at("", base))
    listener_keys = set(allowed_at("listeners[0]", base))
    assert set().union(*(_keys(lst) for lst in doc["listeners"])) == listener_keys
    groups = doc["server_groups"].values()
    group_keys = set(allowed_at("server_groups.rs1", base))
    assert set().union(*(_keys(g) for g in groups)) == group_keys
    rules = [r for lst in doc["listeners"] for r in lst.get("rules", [])]
    assert set().union(*(_keys(r) for r in rules)) == set(allowed_at("listeners[0].rules[0]", rule))
    stickies = [g["sticky_session"] for g in groups if "sticky_session" in g]
    sticky_keys = set(allowed_at("server_groups.rs1.sticky_session", sticky))
    assert set().union(*(_keys(s) for s in stickies)) == sticky_keys
    servers = [s for g in groups for s in g["servers"]]
    server_keys = set(allowed_at("server_groups.rs1.servers[0]", server))
    assert set().union(*(_keys(s) for s in servers)) == server_keys
    assert any(isinstance(s, str) for s in servers)  # the shorthand is shown too
    check_keys = set(allowed_at("server_groups.rs1.health_check", base))
    assert set().union(*(_keys(g["health_check"]) for g in groups)) == check_keys
    websockets = [lst["websocket"] for lst in doc["listeners"] if "websocket" in lst]
    ws_keys = set(allowed_at("listeners[0].websocket", ws))
    assert set().union(*(_keys(w) for w in websockets)) == ws_keys
    discoveries = [g["discovery"] for g in groups if "discovery" in g]
    dns_keys = set(allowed_at("server_groups.rs1.discovery", dns))
    assert set().union(*(_keys(d) for d in discoveries)) == dns_keys
    # token_file and token_env (each the other's alternative) are shown commented out
    assert _keys(doc["admin"]) == {
        "bind",
        "token",
        "token_for_reads",
        "insecure",
        "allowed_hosts",
        "tls",
    }
    assert _keys(doc["access_log"]) == {"enabled", "format", "path"}


# ----------------------------------------------------------------------------- websocket policy

WS = "listeners[0].websocket"


def test_websocket_policy_values_and_defaults():
    lst = parse_config(with_(WS, {"max_message_size": "1MiB"})).listeners[0]
    assert lst.websocket == cfg.WebSocketPolicy(1 << 20, 0.0, 1)
    lst = parse_config(with_(WS, {"messages_per_second": 2.5})).listeners[0]
    assert lst.websocket == cfg.WebSocketPolicy(0, 2.5, 3)  # burst: a second's worth
    lst = parse_config(with_(WS, {"messages_per_second": 10, "burst": 50})).listeners[0]
    assert lst.websocket == cfg.WebSocketPolicy(0, 10.0, 50)
    assert parse_config(minimal()).listeners[0].websocket is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({}, f"{WS}: expected max_message_size and/or messages_per_second"),
        ({"burst": 5}, f"{WS}: expected max_message_size and/or messages_per_second"),
        (
            {"max_message_size": 0},
            f"{WS}.max_message_size: expected a size 1..1099511627776 bytes, got 0",
        ),
        (
            {"messages_per_second": 0},
            f"{WS}.messages_per_second: expected a positive number, got 0",
        ),
        (
            {"messages_per_second": "5"},
            f"{WS}.messages_per_second: expected a positive number, got '5'",
        ),
        (
            {"messages_per_second": 5, "burst": 0},
            f"{WS}.burst: expected an integer 1..1000000, got 0",
        ),
        ({"max_message_size": 10, "burst": 3}, f"{WS}.burst: only used with messages_per_second"),
    ],
)
def test_websocket_policy_bad_values(value, message):
    assert problems(with_(WS, value)) == [message]


def test_websocket_policy_unknown_key():
    assert problems(with_(WS, {"max_size": 10})) == [
        f"{WS}.max_size: unknown key (allowed: max_message_size, messages_per_second, burst)",
        f"{WS}: expected max_message_size and/or messages_per_second",
    ]


# ------------------------------------------------------------------------ lines and did you mean


def test_every_problem_names_its_file_and_line(tmp_path):
    text = (
        "listeners:\n"  # 1
        "  - name: web\n"  # 2
        "    bind: 0.0.0.0:5000\n"  # 3
        "    server_group: chat.v2\n"  # 4
        "    idle_timout: 30s\n"  # 5
        "server_groups:\n"  # 6
        "  chat.v2:\n"  # 7: a group name with a dot
        "    servers:\n"  # 8
        "      - 127.0.0.1:5001\n"  # 9
        "      - address: 127.0.0.1\n"  # 10
        "    health_check: {}\n"  # 11
        "admin: {}\n"  # 12
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:5: listeners[0].idle_timout: unknown key (did you mean 'idle_timeout'?"
        " allowed: " + ", ".join(LISTENER_KEYS) + ")",
        f"{path}:10: server_groups.chat.v2.servers[1].address: expected host:port, got '127.0.0.1'",
    ]


def test_a_missing_key_points_at_its_parent(tmp_path):
    path = write(tmp_path, GOOD.replace("    bind: 0.0.0.0:5000\n", ""))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:2: listeners[0].bind: required"]


def test_a_far_typo_lists_the_keys_without_a_guess():
    (problem,) = problems(with_("server_groups.rs1.zzzz", 1))
    assert "did you mean" not in problem
