"""Forwarding rules: host and path matching and precedence of ``rules.Router``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbproxy.config import Listener, Rule, parse_config
from lbproxy.core.rules import Router, normalize_host, target_path


def router(*rules: tuple[str | None, str, str], default: str = "default") -> Router:
    return Router(
        default, [Rule(host=host, path=path, server_group=group) for host, path, group in rules]
    )


# --- helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (b"Chat.Example.com", "chat.example.com"),
        (b"chat.example.com:8080", "chat.example.com"),
        ("chat.example.com:", "chat.example.com"),
        (b"chat.example.com.", "chat.example.com"),
        (b"chat.example.com.:443", "chat.example.com"),
        (b"[::1]:8080", "[::1]"),
        (b"[2001:DB8::1]", "[2001:db8::1]"),
        (b"10.0.0.1:80", "10.0.0.1"),
        (b"  spaced.com ", "spaced.com"),
        (b"", None),
        (None, None),
    ],
)
def test_normalize_host(host: bytes | str | None, expected: str | None) -> None:
    assert normalize_host(host) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/api/x?y=1", "/api/x"),
        (b"/api/x#frag", "/api/x"),
        (b"/a?b/c#d", "/a"),
        ("/plain", "/plain"),
        (b"/", "/"),
        (b"http://example.com/api/x?q", "/api/x"),
        (b"HTTPS://example.com", "/"),
        (b"http://example.com?q=/api/", "/"),
        (b"*", "/"),
        (b"example.com:443", "/"),
        (b"", "/"),
    ],
)
def test_target_path(target: bytes | str, expected: str) -> None:
    assert target_path(target) == expected


# --- matching -------------------------------------------------------------------------------


def test_no_rules_routes_everything_to_the_default() -> None:
    r = Router("rs1")
    assert r.route(b"chat.example.com", b"/api/") == "rs1"
    assert r.route(None, b"/") == "rs1"


def test_exact_host() -> None:
    r = router(("chat.example.com", "/", "chat"))
    assert r.route(b"chat.example.com", b"/") == "chat"
    assert r.route(b"chat.example.com", b"/any/path") == "chat"
    assert r.route(b"www.example.com", b"/") == "default"
    assert r.route(b"example.com", b"/") == "default"
    assert r.route(b"xchat.example.com", b"/") == "default"
    assert r.route(b"chat.example.com.evil.org", b"/") == "default"
    assert r.route(None, b"/") == "default"


def test_wildcard_host_matches_any_depth_but_not_the_bare_domain() -> None:
    r = router(("*.example.com", "/", "wild"))
    assert r.route(b"a.example.com", b"/") == "wild"
    assert r.route(b"a.b.example.com", b"/x") == "wild"
    assert r.route(b"example.com", b"/") == "default"
    assert r.route(b"badexample.com", b"/") == "default"
    assert r.route(b"a.example.com.org", b"/") == "default"
    assert r.route(b".example.com", b"/") == "default"
    assert r.route(None, b"/") == "default"


def test_exact_host_beats_wildcard() -> None:
    r = router(("*.example.com", "/", "wild"), ("chat.example.com", "/", "chat"))
    assert r.route(b"chat.example.com", b"/") == "chat"
    assert r.route(b"mail.example.com", b"/") == "wild"


def test_longer_wildcard_beats_shorter() -> None:
    r = router(("*.example.com", "/", "outer"), ("*.eu.example.com", "/", "inner"))
    assert r.route(b"a.eu.example.com", b"/") == "inner"
    assert r.route(b"x.a.eu.example.com", b"/") == "inner"
    assert r.route(b"eu.example.com", b"/") == "outer"
    assert r.route(b"a.us.example.com", b"/") == "outer"


def test_longest_path_prefix_wins() -> None:
    r = router(
        (None, "/api/", "api"),
        (None, "/api/v2/", "api2"),
        (None, "/a", "a"),
    )
    assert r.route(b"h", b"/api/v2/users") == "api2"
    assert r.route(b"h", b"/api/v1/users") == "api"
    assert r.route(b"h", b"/api/") == "api"
    assert r.route(b"h", b"/api") == "a"  # "/api/" is not a prefix of "/api"
    assert r.route(b"h", b"/about") == "a"  # a plain string prefix, like nginx
    assert r.route(b"h", b"/b") == "default"
    assert r.route(None, b"/api/v2/") == "api2"


def test_rule_order_in_the_file_does_not_matter() -> None:
    rules = [(None, "/api/", "api"), (None, "/api/v2/", "api2"), ("h.com", "/", "h")]
    for ordering in (rules, rules[::-1], [rules[1], rules[2], rules[0]]):
        r = router(*ordering)
        assert r.route(b"x.com", b"/api/v2/x") == "api2"
        assert r.route(b"x.com", b"/api/v1") == "api"
        assert r.route(b"h.com", b"/other") == "h"


def test_path_matching_ignores_the_query_string() -> None:
    r = router((None, "/api/", "api"))
    assert r.route(b"h", b"/?next=/api/") == "default"
    assert r.route(b"h", b"/x?/api/") == "default"
    assert r.route(b"h", b"/api/?q=1") == "api"
    assert r.route(b"h", b"/api/#x") == "api"


def test_path_prefix_is_case_sensitive() -> None:
    r = router((None, "/API/", "api"))
    assert r.route(b"h", b"/API/x") == "api"
    assert r.route(b"h", b"/api/x") == "default"


def test_host_is_case_insensitive_and_port_is_ignored() -> None:
    r = router(("chat.example.com", "/", "chat"), ("*.example.org", "/", "org"))
    assert r.route(b"CHAT.Example.Com", b"/") == "chat"
    assert r.route(b"chat.example.com:8080", b"/") == "chat"
    assert r.route(b"chat.example.com.", b"/") == "chat"
    assert r.route("Chat.Example.Com:443", "/") == "chat"
    assert r.route(b"A.EXAMPLE.ORG:81", b"/") == "org"


def test_ipv6_host_with_port() -> None:
    r = router(("[::1]", "/", "local6"), ("127.0.0.1", "/", "local4"))
    assert r.route(b"[::1]:8080", b"/") == "local6"
    assert r.route(b"[::1]", b"/") == "local6"
    assert r.route(b"127.0.0.1:8080", b"/") == "local4"
    assert r.route(b"[::2]:8080", b"/") == "default"


def test_str_and_bytes_are_equivalent() -> None:
    r = router(("chat.example.com", "/api/", "api"))
    assert r.route("chat.example.com", "/api/x?y") == r.route(b"chat.example.com", b"/api/x?y")
    assert r.route("chat.example.com", "/api/x") == "api"


def test_absolute_form_target_is_matched_on_its_path() -> None:
    r = router((None, "/api/", "api"))
    assert r.route(b"example.com", b"http://example.com/api/x") == "api"
    assert r.route(b"example.com", b"http://example.com/") == "default"


def test_asterisk_target_matches_as_slash() -> None:
    r = router(("h.com", "/", "h"), (None, "/api/", "api"))
    assert r.route(b"h.com", b"*") == "h"
    assert r.route(b"x.com", b"*") == "default"


# --- precedence -----------------------------------------------------------------------------


def test_host_rule_beats_hostless_rule_at_equal_prefix() -> None:
    r = router((None, "/api/", "any"), ("chat.example.com", "/api/", "chat"))
    assert r.route(b"chat.example.com", b"/api/x") == "chat"
    assert r.route(b"other.com", b"/api/x") == "any"
    assert r.route(None, b"/api/x") == "any"


def test_wildcard_rule_beats_hostless_rule_at_equal_prefix() -> None:
    r = router((None, "/", "any"), ("*.example.com", "/", "wild"))
    assert r.route(b"a.example.com", b"/") == "wild"
    assert r.route(b"example.com", b"/") == "any"


def test_longer_prefix_beats_more_specific_host() -> None:
    r = router(
        ("chat.example.com", "/", "chat"),
        ("*.example.com", "/static/", "cdn-wild"),
        (None, "/api/", "api"),
    )
    assert r.route(b"chat.example.com", b"/api/x") == "api"
    assert r.route(b"chat.example.com", b"/static/x") == "cdn-wild"
    assert r.route(b"chat.example.com", b"/other") == "chat"
    assert r.route(b"www.example.com", b"/other") == "default"
    assert r.route(b"www.example.com", b"/static/a.css") == "cdn-wild"


def test_exact_host_without_matching_path_falls_back_to_wildcard_and_hostless() -> None:
    r = router(
        ("chat.example.com", "/api/", "chat-api"),
        ("*.example.com", "/", "wild"),
        (None, "/health", "health"),
    )
    assert r.route(b"chat.example.com", b"/api/1") == "chat-api"
    assert r.route(b"chat.example.com", b"/") == "wild"
    assert r.route(b"chat.example.com", b"/health") == "health"
    assert r.route(b"other.org", b"/") == "default"


def test_full_precedence_ladder_at_equal_prefix() -> None:
    r = router(
        (None, "/x/", "none"),
        ("*.com", "/x/", "tld"),
        ("*.example.com", "/x/", "wild"),
        ("*.b.example.com", "/x/", "wild-b"),
        ("a.b.example.com", "/x/", "exact"),
    )
    assert r.route(b"a.b.example.com", b"/x/") == "exact"
    assert r.route(b"c.b.example.com", b"/x/") == "wild-b"
    assert r.route(b"c.example.com", b"/x/") == "wild"
    assert r.route(b"c.com", b"/x/") == "tld"
    assert r.route(b"c.org", b"/x/") == "none"
    assert r.route(b"c.org", b"/y/") == "default"


def test_the_issue_example() -> None:
    config = parse_config(
        {
            "listeners": [
                {
                    "name": "web",
                    "bind": "127.0.0.1:0",
                    "server_group": "rs1",
                    "rules": [{"host": "chat.example.com", "path": "/api/", "server_group": "rs2"}],
                }
            ],
            "server_groups": {
                "rs1": {"servers": ["127.0.0.1:5001"]},
                "rs2": {"servers": ["127.0.0.1:5002"]},
            },
        }
    )
    r = Router.for_listener(config.listeners[0])
    assert r.default == "rs1"
    assert r.route(b"chat.example.com", b"/api/messages?since=1") == "rs2"
    assert r.route(b"chat.example.com", b"/index.html") == "rs1"
    assert r.route(b"www.example.com", b"/api/messages") == "rs1"


def test_for_listener_uses_default_and_rules() -> None:
    from lbproxy.config import Address

    lst = Listener(
        name="web",
        bind=Address("127.0.0.1", 0),
        server_group="main",
        rules=(Rule(host=None, path="/a/", server_group="other"),),
    )
    r = Router.for_listener(lst)
    assert (r.route(None, b"/a/1"), r.route(None, b"/b")) == ("other", "main")
    assert r.rules == lst.rules
    assert repr(r) == "Router(default='main', 1 rules)"


# --- against a brute-force reference ---------------------------------------------------------

_HOSTS = ["a.example.com", "b.a.example.com", "example.com", "x.org", "[::1]"]
_RULE_HOSTS = [None, "a.example.com", "*.example.com", "*.a.example.com", "x.org", "*.org"]
_PATHS = ["/", "/a", "/a/", "/a/b", "/ab", "/b/"]


def _reference(rules: list[Rule], default: str, host: str | None, path: str) -> str:
    def host_matches(pattern: str | None) -> bool:
        if pattern is None:
            return True
        if host is None:
            return False
        if pattern.startswith("*."):
            return host.endswith(pattern[1:])
        return host == pattern

    def rank(pattern: str | None) -> tuple[int, int]:
        if pattern is None:
            return (0, 0)
        return (1, len(pattern)) if pattern.startswith("*.") else (2, 0)

    matching = [r for r in rules if host_matches(r.host) and path.startswith(r.path)]
    if not matching:
        return default
    return max(matching, key=lambda r: (len(r.path), rank(r.host))).server_group


@given(
    st.lists(
        st.tuples(st.sampled_from(_RULE_HOSTS), st.sampled_from(_PATHS)),
        unique=True,
        max_size=8,
    ),
    st.sampled_from([None, *_HOSTS]),
    st.sampled_from([*_PATHS, "/a/b/c", "/c"]),
)
def test_router_agrees_with_brute_force(
    pairs: list[tuple[str | None, str]], host: str | None, path: str
) -> None:
    rules = [Rule(host=h, path=p, server_group=f"g{i}") for i, (h, p) in enumerate(pairs)]
    r = Router("default", rules)
    assert r.route(host, path) == _reference(rules, "default", host, path)
    port = None if host is None else f"{host.upper()}:8080"
    assert r.route(port, path + "?q=1") == _reference(rules, "default", host, path)
