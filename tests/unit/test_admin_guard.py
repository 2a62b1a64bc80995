"""The admin section's rules (issue 25) and the admin gate's pure checks: which binds need a
token, the token sources, allowed_hosts; which Host and Origin values the admin answers."""

from __future__ import annotations

from typing import Any

import pytest

from lbproxy.config import Address, Admin, ConfigError, parse_config
from lbproxy.control.admin_guard import host_allowed, origin_allowed, split_host


def doc(**admin: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "bind": "127.0.0.1:8080", "server_group": "rs1"}],
        "server_groups": {"rs1": {"servers": ["127.0.0.1:5001"]}},
        "admin": admin,
    }


def problems(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(d)
    return e.value.problems


@pytest.mark.parametrize("bind", ["0.0.0.0:8404", "[::]:8404", "10.0.0.5:8404", "lb.example:1"])
def test_a_bind_off_loopback_needs_a_token(bind: str) -> None:
    (message,) = problems(doc(bind=bind))
    assert message.startswith(f"admin: bind {bind}")
    for fix in ("admin.token,", "admin.token_file", "admin.token_env", "admin.insecure: true"):
        assert fix in message
    for fix in ({"token": "t0ken"}, {"token_file": "x"}, {"token_env": "X"}, {"insecure": True}):
        assert parse_config(doc(bind=bind, **fix)).admin.bind.port in (8404, 1)


@pytest.mark.parametrize("bind", ["127.0.0.1:8404", "127.3.4.5:1", "[::1]:8404", "localhost:9"])
def test_loopback_needs_no_token(bind: str) -> None:
    assert parse_config(doc(bind=bind)).admin.token == ""


def test_admin_keys() -> None:
    a = parse_config(
        doc(token_env="LB_TOKEN", token_for_reads=True, allowed_hosts=["A.Example.", "[::1]"])
    ).admin
    assert a == Admin(
        Address("127.0.0.1", 8404),
        token_env="LB_TOKEN",
        token_for_reads=True,
        allowed_hosts=("a.example", "::1"),
    )
    assert problems(doc(token="t0ken", token_file="f", token_env="E")) == [
        "admin: token and token_file and token_env: give only one source of the token"
    ]
    assert problems(doc(token_for_reads=True)) == [
        "admin: token_for_reads: needs a token (token, token_file or token_env)"
    ]
    assert problems(doc(token_env="1-bad")) == [
        "admin.token_env: expected an environment variable name like LB_ADMIN_TOKEN, got '1-bad'"
    ]
    assert problems(doc(allowed_hosts=["a.example:80", "*.x", 5])) == [
        "admin.allowed_hosts[0]: a host name or IP address without a port or scheme, "
        "got 'a.example:80'",
        "admin.allowed_hosts[1]: expected a host name like admin.example.com, got '*.x'",
        "admin.allowed_hosts[2]: expected a host name like admin.example.com, got 5",
    ]
    assert problems(doc(allowed_hosts="a.example")) == [
        "admin.allowed_hosts: expected a list of host names, got 'a.example'"
    ]
    assert problems(doc(insecure="yes"))[0].startswith("admin.insecure:")
    assert problems(doc(tls={"cert": "c.pem"})) == ["admin.tls.key: required"]
    assert "s3cret" not in repr(Admin(token="s3cret"))  # never printed


def test_split_host() -> None:
    assert split_host("Example.COM:8404") == ("example.com", 8404)
    assert split_host("example.com.") == ("example.com", None)
    assert split_host("[::1]:80") == ("::1", 80)
    assert split_host("[::1]") == ("::1", None)
    assert split_host("127.0.0.1") == ("127.0.0.1", None)


def test_host_allowed() -> None:
    admin = Admin(Address("0.0.0.0", 8404), allowed_hosts=("lb.internal",))
    for host in ("localhost", "127.0.0.1", "127.1.2.3", "::1", "lb.internal", "10.0.0.5"):
        assert host_allowed(host, admin, "10.0.0.5"), host
    for host in ("evil.example", "10.0.0.6", "localhost.evil.example", "0.0.0.0.evil", ""):
        assert not host_allowed(host, admin, "10.0.0.5"), host
    named = Admin(Address("lb-admin.example", 8404), token="t")
    assert host_allowed("lb-admin.example", named, None)
    assert host_allowed("10.0.0.7", Admin(Address("10.0.0.7", 8404), token="t"), None)


def test_origin_allowed() -> None:
    admin = Admin(allowed_hosts=("lb.internal",))
    assert origin_allowed("http://127.0.0.1:8404", "http", "127.0.0.1:8404", admin)
    assert origin_allowed("http://LOCALHOST:8404", "http", "localhost:8404", admin)
    assert origin_allowed("https://a.example", "https", "a.example:443", admin)
    assert origin_allowed("http://lb.internal:9999", "http", "127.0.0.1:8404", admin)
    for origin in (
        "http://evil.example",
        "null",
        "http://127.0.0.1:8405",
        "https://127.0.0.1:8404",
        "http://127.0.0.1",
        "",
        "http://[::1",
    ):
        assert not origin_allowed(origin, "http", "127.0.0.1:8404", admin), origin
