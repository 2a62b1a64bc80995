"""Config keys of issue 7: listener forwarding rules, hash_key and sticky_session."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from lbproxy.config import (
    DEFAULT_SOCKETIO_PATH,
    DEFAULT_STICKY_COOKIE,
    DEFAULT_STICKY_COOKIE_TIMEOUT,
    ConfigError,
    Listener,
    Rule,
    ServerGroup,
    StickySession,
    parse_config,
)


def doc(rules: Any = None, group: dict[str, Any] | None = None, **listener: Any) -> dict[str, Any]:
    """Two groups (rs1 the default, rs2) and one listener ``web``; extra keys merge in."""
    lst: dict[str, Any] = {"name": "web", "bind": "127.0.0.1:0", "server_group": "rs1"}
    if rules is not None:
        lst["rules"] = rules
    lst.update(listener)
    rs1: dict[str, Any] = {"servers": ["127.0.0.1:5001"]}
    rs1.update(group or {})
    return {
        "listeners": [lst],
        "server_groups": {"rs1": rs1, "rs2": {"servers": ["127.0.0.1:5002"]}},
    }


def problems(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(d)
    return info.value.problems


def listener(d: dict[str, Any]) -> Listener:
    return parse_config(d).listeners[0]


def rs1(d: dict[str, Any]) -> ServerGroup:
    return parse_config(d).group("rs1")


# --- listeners[].rules ------------------------------------------------------------------------


def test_rules_default_to_empty_tuple() -> None:
    assert listener(doc()).rules == ()
    assert listener(doc(rules=None)).rules == ()
    assert listener(doc(rules=[])).rules == ()


def test_rules_parsed_in_file_order_with_defaults() -> None:
    lst = listener(
        doc(
            rules=[
                {"host": "chat.example.com", "path": "/api/", "server_group": "rs2"},
                {"host": "*.example.com", "server_group": "rs2"},
                {"path": "/static/", "server_group": "rs1"},
            ]
        )
    )
    assert lst.rules == (
        Rule(host="chat.example.com", path="/api/", server_group="rs2"),
        Rule(host="*.example.com", path="/", server_group="rs2"),
        Rule(host=None, path="/static/", server_group="rs1"),
    )
    assert lst.server_group == "rs1"


def test_rule_host_is_normalised_to_lower_case_without_trailing_dot() -> None:
    lst = listener(
        doc(
            rules=[
                {"host": "Chat.Example.COM.", "server_group": "rs2"},
                {"host": "*.EXAMPLE.org", "server_group": "rs2"},
                {"host": "[::1]", "server_group": "rs2"},
                {"host": "10.0.0.1", "server_group": "rs2"},
            ]
        )
    )
    assert [r.host for r in lst.rules] == ["chat.example.com", "*.example.org", "[::1]", "10.0.0.1"]


def test_config_with_rules_compares_equal_when_parsed_twice() -> None:
    d = doc(rules=[{"host": "a.example.com", "path": "/x/", "server_group": "rs2"}])
    assert parse_config(d) == parse_config(copy.deepcopy(d))
    other = doc(rules=[{"host": "a.example.com", "path": "/y/", "server_group": "rs2"}])
    assert parse_config(d) != parse_config(other)
    assert hash(listener(d).rules) == hash(listener(copy.deepcopy(d)).rules)


def test_rules_not_a_list() -> None:
    assert problems(doc(rules={"host": "a.com"})) == [
        "listeners[0].rules: expected a list of rules (host, path, server_group), got a mapping"
    ]


def test_rule_not_a_mapping() -> None:
    assert problems(doc(rules=["a.com"])) == [
        "listeners[0].rules[0]: expected a mapping, got 'a.com'"
    ]


def test_rule_unknown_key() -> None:
    assert problems(doc(rules=[{"host": "a.com", "server_group": "rs2", "pool": "x"}])) == [
        "listeners[0].rules[0].pool: unknown key (allowed: host, path, server_group)"
    ]


def test_rule_needs_host_or_path() -> None:
    assert problems(doc(rules=[{"server_group": "rs2"}])) == [
        "listeners[0].rules[0]: a rule needs a host, a path or both"
    ]


def test_rule_server_group_required_and_must_exist() -> None:
    assert problems(doc(rules=[{"host": "a.com"}, {"path": "/x", "server_group": "nope"}])) == [
        "listeners[0].rules[0].server_group: required",
        "listeners[0].rules[1].server_group: no server group 'nope' (known: rs1, rs2)",
    ]


def test_rule_server_group_with_own_problems_is_not_reported_missing() -> None:
    d = doc(rules=[{"host": "a.com", "server_group": "rs2"}])
    d["server_groups"]["rs2"]["scheduler"] = "fastest"
    assert problems(d) == [
        "server_groups.rs2.scheduler: expected one of rr, wrr, wlc, sh, got 'fastest'"
    ]


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("*", "'*' matches every host: leave host out instead"),
        ("a.*.com", "a wildcard is only a leading '*.' like *.example.com, got 'a.*.com'"),
        (
            "*example.com",
            "a wildcard is only a leading '*.' like *.example.com, got '*example.com'",
        ),
        ("a.com:8080", "a host without a port (rules match any port), got 'a.com:8080'"),
        ("a b.com", "expected a host like chat.example.com or *.example.com, got 'a b.com'"),
        ("", "expected a host like chat.example.com or *.example.com, got ''"),
        ("a..com", "expected a host like chat.example.com or *.example.com, got 'a..com'"),
        ("[zz]", "not an IPv6 address in '[zz]'"),
        (5, "expected a host like chat.example.com or *.example.com, got 5"),
        (None, "expected a host like chat.example.com or *.example.com, got nothing"),
    ],
)
def test_rule_bad_host(host: Any, message: str) -> None:
    assert problems(doc(rules=[{"host": host, "server_group": "rs2"}])) == [
        f"listeners[0].rules[0].host: {message}"
    ]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("api/", "expected a path starting with '/', got 'api/'"),
        ("/a b", "expected a path starting with '/', got '/a b'"),
        ("/api?x=1", "expected a path prefix without '?' or '#', got '/api?x=1'"),
        ("/api#top", "expected a path prefix without '?' or '#', got '/api#top'"),
        (7, "expected a path starting with '/', got 7"),
    ],
)
def test_rule_bad_path(path: Any, message: str) -> None:
    assert problems(doc(rules=[{"path": path, "server_group": "rs2"}])) == [
        f"listeners[0].rules[0].path: {message}"
    ]


def test_duplicate_rules_in_one_listener() -> None:
    rules = [
        {"host": "a.com", "path": "/x/", "server_group": "rs2"},
        {"path": "/y/", "server_group": "rs2"},
        {"host": "A.com", "path": "/x/", "server_group": "rs1"},  # same after normalising
        {"path": "/y/", "server_group": "rs1"},
        {"host": "b.com", "server_group": "rs1"},
        {"host": "b.com", "path": "/", "server_group": "rs2"},  # path defaults to "/"
    ]
    assert problems(doc(rules=rules)) == [
        "listeners[0].rules[2]: duplicate rule: host 'a.com' and path '/x/' already in rules[0]",
        "listeners[0].rules[3]: duplicate rule: path '/y/' already in rules[1]",
        "listeners[0].rules[5]: duplicate rule: host 'b.com' and path '/' already in rules[4]",
    ]


def test_same_rule_in_two_listeners_is_fine() -> None:
    d = doc(rules=[{"host": "a.com", "server_group": "rs2"}])
    second = dict(d["listeners"][0], name="other", bind="127.0.0.1:0")
    d["listeners"].append(second)
    config = parse_config(d)
    assert (
        config.listeners[0].rules
        == config.listeners[1].rules
        == (Rule(host="a.com", path="/", server_group="rs2"),)
    )


def test_every_rule_problem_reported_at_once() -> None:
    rules = [
        {"host": "a:1", "server_group": "rs2"},
        {"path": "x", "server_group": "rs3"},
        {"host": "ok.com", "server_group": "rs2", "weight": 3},
    ]
    assert problems(doc(rules=rules)) == [
        "listeners[0].rules[0].host: a host without a port (rules match any port), got 'a:1'",
        "listeners[0].rules[1].path: expected a path starting with '/', got 'x'",
        "listeners[0].rules[1].server_group: no server group 'rs3' (known: rs1, rs2)",
        "listeners[0].rules[2].weight: unknown key (allowed: host, path, server_group)",
    ]


# --- server_groups.<name>.hash_key ----------------------------------------------------------


def test_hash_key_default_and_values() -> None:
    assert rs1(doc()).hash_key == "client_ip"
    assert rs1(doc(group={"hash_key": "client_ip"})).hash_key == "client_ip"
    assert rs1(doc(group={"hash_key": "x_forwarded_for", "scheduler": "sh"})).hash_key == (
        "x_forwarded_for"
    )


def test_hash_key_bad_value() -> None:
    assert problems(doc(group={"hash_key": "cookie"})) == [
        "server_groups.rs1.hash_key: expected one of client_ip, x_forwarded_for, got 'cookie'"
    ]


# --- server_groups.<name>.sticky_session ----------------------------------------------------


def sticky(value: Any) -> StickySession | None:
    return rs1(doc(group={"sticky_session": value})).sticky


def sticky_problems(value: Any) -> list[str]:
    return problems(doc(group={"sticky_session": value}))


def test_sticky_absent_or_empty_value_is_off() -> None:
    assert rs1(doc()).sticky is None
    assert sticky(None) is None


def test_sticky_insert_defaults() -> None:
    assert sticky({"type": "insert"}) == StickySession(
        "insert", DEFAULT_STICKY_COOKIE, DEFAULT_STICKY_COOKIE_TIMEOUT, False, DEFAULT_SOCKETIO_PATH
    )
    assert (DEFAULT_STICKY_COOKIE, DEFAULT_STICKY_COOKIE_TIMEOUT) == ("SERVERID", 1000.0)
    assert DEFAULT_SOCKETIO_PATH == "/socket.io/"


def test_sticky_insert_every_key() -> None:
    value = {
        "type": "insert",
        "cookie": "lb_route",
        "cookie_timeout": "2m",
        "socketio": True,
        "socketio_path": "/ws/engine.io/",
    }
    assert sticky(value) == StickySession("insert", "lb_route", 120.0, True, "/ws/engine.io/")


def test_sticky_server_needs_cookie() -> None:
    assert sticky({"type": "server", "cookie": "JSESSIONID"}) == StickySession(
        "server", "JSESSIONID", 1000.0, False, "/socket.io/"
    )
    assert sticky_problems({"type": "server"}) == [
        "server_groups.rs1.sticky_session.cookie: required with type: server"
        " (the name of the backend's cookie)"
    ]


def test_sticky_socketio_alone() -> None:
    assert sticky({"socketio": True}) == StickySession(
        None, "SERVERID", 1000.0, True, "/socket.io/"
    )
    assert sticky({"socketio": True, "socketio_path": "/rt"}) == StickySession(
        None, "SERVERID", 1000.0, True, "/rt"
    )


def test_sticky_that_enables_nothing_is_an_error() -> None:
    message = (
        "server_groups.rs1.sticky_session: enables nothing: set type (insert or server) and/or"
        " socketio: true (leave sticky_session out for no persistence)"
    )
    assert sticky_problems({}) == [message]
    assert sticky_problems({"socketio": False}) == [message]


def test_sticky_cookie_keys_without_type() -> None:
    assert sticky_problems({"socketio": True, "cookie": "A", "cookie_timeout": "5s"}) == [
        "server_groups.rs1.sticky_session.cookie: only used with type: insert or server",
        "server_groups.rs1.sticky_session.cookie_timeout: only used with type: insert or server",
    ]


def test_sticky_socketio_path_without_socketio() -> None:
    assert sticky_problems({"type": "insert", "socketio_path": "/x/"}) == [
        "server_groups.rs1.sticky_session.socketio_path: only used with socketio: true"
    ]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("insert", "sticky_session: expected a mapping, got 'insert'"),
        (
            {"type": "rewrite"},
            "sticky_session.type: expected one of insert, server, got 'rewrite'",
        ),
        ({"type": None}, "sticky_session.type: expected one of insert, server, got nothing"),
        (
            {"type": "insert", "enabled": True},
            "sticky_session.enabled: unknown key"
            " (allowed: type, cookie, cookie_timeout, socketio, socketio_path, secret)",
        ),
        (
            {"type": "insert", "cookie_timeout": "soon"},
            "sticky_session.cookie_timeout: expected a duration like 60s, 500ms or 2m, got 'soon'",
        ),
        (
            {"type": "insert", "cookie_timeout": 0},
            "sticky_session.cookie_timeout: expected a positive duration, got 0",
        ),
        (
            {"type": "insert", "socketio": "yes"},
            "sticky_session.socketio: expected true or false, got 'yes'",
        ),
        (
            {"socketio": True, "socketio_path": "socket.io"},
            "sticky_session.socketio_path: expected a path starting with '/', got 'socket.io'",
        ),
        (
            {"socketio": True, "socketio_path": "/socket.io/?EIO=4"},
            "sticky_session.socketio_path: expected a path prefix without '?' or '#',"
            " got '/socket.io/?EIO=4'",
        ),
    ],
)
def test_sticky_bad_values(value: Any, problem: str) -> None:
    assert sticky_problems(value) == [f"server_groups.rs1.{problem}"]


@pytest.mark.parametrize(
    "cookie", ["a b", "a;b", "a=b", 'a"b', "a,b", "", "a/b", "é", "a\tb", "[x]", "a:b", 12]
)
def test_sticky_cookie_must_be_a_token(cookie: Any) -> None:
    shown = repr(cookie)
    assert sticky_problems({"type": "insert", "cookie": cookie}) == [
        "server_groups.rs1.sticky_session.cookie: expected a cookie name of letters, digits"
        f" and !#$%&'*+-.^_`|~, got {shown}"
    ]


@pytest.mark.parametrize("cookie", ["SERVERID", "JSESSIONID", "connect.sid", "a!#$%&'*+-.^_`|~z"])
def test_sticky_cookie_tokens_accepted(cookie: str) -> None:
    result = sticky({"type": "server", "cookie": cookie})
    assert result is not None
    assert result.cookie == cookie


def test_group_with_bad_sticky_is_not_built_but_listener_is_not_blamed() -> None:
    assert problems(doc(group={"sticky_session": {"type": "server"}, "hash_key": "ip"})) == [
        "server_groups.rs1.sticky_session.cookie: required with type: server"
        " (the name of the backend's cookie)",
        "server_groups.rs1.hash_key: expected one of client_ip, x_forwarded_for, got 'ip'",
    ]


def test_sticky_config_equality() -> None:
    value = {"type": "insert", "cookie": "X", "socketio": True}
    a = parse_config(doc(group={"sticky_session": value}))
    b = parse_config(doc(group={"sticky_session": dict(value)}))
    c = parse_config(doc(group={"sticky_session": dict(value, cookie="Y")}))
    assert a == b
    assert a != c
    assert a != parse_config(doc())


def test_defaults_of_dataclasses() -> None:
    assert StickySession() == StickySession(None, "SERVERID", 1000.0, False, "/socket.io/")
    group = ServerGroup(name="g")
    assert (group.hash_key, group.sticky) == ("client_ip", None)
