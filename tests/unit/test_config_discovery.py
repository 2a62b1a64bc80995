"""Config of issue 14: discovery, resolvers, sticky_session.secret; every error has its place."""

from __future__ import annotations

from typing import Any

import pytest

from lbproxy.config import Address, ConfigError, Discovery, parse_config


def doc(group: dict[str, Any], **top: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "listeners": [{"name": "web", "bind": "127.0.0.1:0", "server_group": "rs1"}],
        "server_groups": {"rs1": group},
    }
    d.update(top)
    return d


def problems(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(d)
    return exc.value.problems


def test_discovery_a_name_with_defaults_and_no_servers_key() -> None:
    c = parse_config(doc({"discovery": {"dns": "Chat.Internal.", "port": 5001}}))
    g = c.group("rs1")
    assert g.servers == ()
    assert g.discovery == Discovery("chat.internal", 5001, 10.0, 100, 2.0)
    assert not g.discovery.srv
    assert c.resolvers == ()


def test_discovery_srv_name_beside_literal_servers() -> None:
    group = {
        "servers": ["127.0.0.1:5001"],
        "discovery": {"dns": "_chat._tcp.service.consul", "interval": "5s", "timeout": "500ms"},
    }
    g = parse_config(doc(group)).group("rs1")
    assert g.discovery == Discovery("_chat._tcp.service.consul", 0, 5.0, 100, 0.5)
    assert g.discovery.srv and len(g.servers) == 1


def test_resolvers_ip_or_ip_port() -> None:
    c = parse_config(
        doc({"servers": []}, resolvers=["127.0.0.1:5353", "10.0.0.2", "::1", "[::1]:53"])
    )
    assert c.resolvers == (
        Address("127.0.0.1", 5353),
        Address("10.0.0.2", 53),
        Address("::1", 53),
        Address("::1", 53),
    )


def test_discovery_errors_with_their_places() -> None:
    p = problems(doc({"discovery": {"dns": "chat.internal"}}))
    assert p == [
        "server_groups.rs1.discovery.port: required with an A/AAAA name (the servers' port)"
    ]
    p = problems(doc({"discovery": {"dns": "_chat._tcp.x", "port": 80, "weight": 5}}))
    assert "server_groups.rs1.discovery.port: not used with an SRV name" in p[0]
    assert "server_groups.rs1.discovery.weight: not used with an SRV name" in p[1]
    p = problems(doc({"discovery": {"dns": "a.test", "port": 80, "interval": "500ms"}}))
    assert p == ["server_groups.rs1.discovery.interval: must be at least 1s"]
    p = problems(doc({"discovery": {"dns": "bad name!", "port": 80}}))
    assert p[0].startswith("server_groups.rs1.discovery.dns: expected a DNS name")
    p = problems(doc({"discovery": {"dns": "10.0.0.1", "port": 80}}))
    assert "is an address, not a name" in p[0]
    p = problems(doc({"discovery": {"dns": "a.test", "port": 0, "typo": 1}}))
    assert any(x.startswith("server_groups.rs1.discovery.typo: unknown key") for x in p)
    assert any(x.startswith("server_groups.rs1.discovery.port: expected an integer") for x in p)
    p = problems(doc({"discovery": {"dns": "a.test", "port": 80, "timeout": "31s"}}))
    assert p == ["server_groups.rs1.discovery.timeout: must be at most 30s"]
    p = problems(doc({"discovery": "chat.internal"}))
    assert p == ["server_groups.rs1.discovery: expected a mapping, got 'chat.internal'"]
    # Without discovery, servers stay required.
    p = problems(doc({}))
    assert p == [
        "server_groups.rs1.servers: required (a list of servers, may be empty), or discovery"
    ]


def test_resolver_errors() -> None:
    p = problems(doc({"servers": []}, resolvers=["dns.google:53", "127.0.0.1:99999"]))
    assert p[0].startswith("resolvers[0]: a name server is an IP address")
    assert p[1].startswith("resolvers[1]: port must be")
    p = problems(doc({"servers": []}, resolvers="127.0.0.1"))
    assert p == ["resolvers: expected a list like [127.0.0.1:53], got '127.0.0.1'"]


def test_sticky_secret() -> None:
    secret = "s3cret-of-the-fleet-0123"
    g = parse_config(
        doc({"servers": [], "sticky_session": {"type": "insert", "secret": secret}})
    ).group("rs1")
    assert g.sticky is not None and g.sticky.secret == secret
    assert secret not in repr(g)  # never printed
    p = problems(doc({"servers": [], "sticky_session": {"type": "insert", "secret": "short"}}))
    assert p == ["server_groups.rs1.sticky_session.secret: expected at least 16 characters"]
    assert "short" not in p[0]
    p = problems(doc({"servers": [], "sticky_session": {"socketio": True, "secret": secret}}))
    assert p == ["server_groups.rs1.sticky_session.secret: only used with type: insert"]
