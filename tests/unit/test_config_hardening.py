"""The config keys of issue 9 (limits, client_header_timeout, max_connections, TLS, the https
redirect, ACLs, the admin token) and the pure pieces around them: their defaults, every
validation message, the ACL matching, how TLS files are checked at load, and the head rewrites
(absolute-form target, redirect location).
"""

from __future__ import annotations

import copy
import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbproxy.config import (
    Acl,
    Address,
    Admin,
    ConfigError,
    Listener,
    Timeouts,
    parse_config,
    parse_size,
)
from lbproxy.control.loading import load_config
from lbproxy.core import metrics
from lbproxy.core.snapshot import RuntimeState
from lbproxy.wire.headers import https_location, origin_form
from tests.hardening import make_cert


def doc(**listener: Any) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "bind": "127.0.0.1:5000", "server_group": "rs1", **listener}],
        "server_groups": {"rs1": {"servers": ["127.0.0.1:5001"]}},
    }


def problems(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(d)
    return e.value.problems


def listener(**keys: Any) -> Listener:
    return parse_config(doc(**keys)).listeners[0]


# ------------------------------------------------------------------------------ defaults


def test_defaults() -> None:
    lst = listener()
    assert lst.timeouts == Timeouts(60.0, 60.0, 5.0, 10.0)
    assert lst.timeouts.client_header == 10.0
    assert (lst.max_request_line, lst.max_header_size, lst.max_header_count) == (8192, 32768, 100)
    assert lst.max_connections == 0
    assert (lst.tls, lst.redirect_https, lst.acl) == (None, 0, None)
    assert lst.protocol == "http"
    admin = parse_config(doc()).admin
    assert admin == Admin(Address("127.0.0.1", 8404), "")  # loopback, no token
    assert ipaddress.ip_address(admin.bind.host).is_loopback


def test_listener_runtime_takes_its_own_limits() -> None:
    d = doc(max_request_line="1KiB", max_header_size="2k", max_header_count=7)
    d["listeners"].append({"name": "other", "bind": "127.0.0.1:5002", "server_group": "rs1"})
    snap, _ = RuntimeState(metrics.Registry()).build(parse_config(d))
    small, other = snap.listeners["web"].limits, snap.listeners["other"].limits
    assert (small.max_request_line, small.max_header_size, small.max_header_count) == (
        1024,
        2048,
        7,
    )
    assert (other.max_request_line, other.max_header_size, other.max_header_count) == (
        8192,
        32768,
        100,
    )


# ------------------------------------------------------------------------------ sizes, counts


@pytest.mark.parametrize(
    ("text", "size"),
    [(8192, 8192), ("8192", 8192), ("8KiB", 8192), ("8k", 8192), ("8 KB", 8192), ("1MiB", 1 << 20)],
)
def test_sizes(text: Any, size: int) -> None:
    assert parse_size(text) == size
    assert listener(max_request_line=text, max_header_size="1MiB").max_request_line == size


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_request_line", "1.5KiB", "expected a size like 8192, 8KiB or 1MiB, got '1.5KiB'"),
        ("max_request_line", True, "expected a size like 8192, 8KiB or 1MiB, got true"),
        ("max_request_line", 63, "expected a size 64..1048576 bytes, got 63"),
        ("max_request_line", "2MiB", "expected a size 64..1048576 bytes, got 2097152"),
        ("max_header_size", 1000, "expected a size 1024..1048576 bytes, got 1000"),
        ("max_header_size", "32 GB", "expected a size like 8192, 8KiB or 1MiB, got '32 GB'"),
        ("max_header_count", 0, "expected an integer 1..10000, got 0"),
        ("max_header_count", "100", "expected an integer 1..10000, got '100'"),
        ("max_connections", -1, "expected an integer 0..10000000, got -1"),
        ("max_connections", 1.5, "expected an integer 0..10000000, got 1.5"),
        ("client_header_timeout", 0, "expected a positive duration, got 0"),
        ("client_header_timeout", "soon", "expected a duration like 60s, 500ms or 2m, got 'soon'"),
        ("redirect_https", 0, "expected an integer 1..65535, got 0"),
        ("redirect_https", "443", "expected an integer 1..65535, got '443'"),
    ],
)
def test_bad_values(key: str, value: Any, message: str) -> None:
    assert problems(doc(**{key: value})) == [f"listeners[0].{key}: {message}"]


def test_good_values() -> None:
    lst = listener(client_header_timeout="500ms", max_connections=5000, redirect_https=8443)
    assert (lst.timeouts.client_header, lst.max_connections, lst.redirect_https) == (
        0.5,
        5000,
        8443,
    )
    assert lst.timeouts.idle == 60.0  # the other timeouts keep their defaults


def test_head_size_must_hold_the_request_line() -> None:
    assert problems(doc(max_request_line="64KiB")) == [
        "listeners[0].max_header_size: must be at least max_request_line (65536): "
        "the request line is part of the head"
    ]
    assert listener(max_request_line="16KiB", max_header_size="16KiB").max_header_size == 16384


def test_unknown_key_lists_the_new_ones() -> None:
    (problem,) = problems(doc(max_header=1))
    for key in (
        "client_header_timeout",
        "max_request_line",
        "max_header_size",
        "max_header_count",
        "max_connections",
        "tls",
        "redirect_https",
        "acl",
        "http2",
    ):
        assert key in problem


# ------------------------------------------------------------------------------ https, TLS


def test_https_needs_tls_and_tls_needs_https() -> None:
    assert problems(doc(protocol="https")) == [
        "listeners[0].tls: required with protocol: https (cert and key, or certificates)"
    ]
    assert problems(doc(tls={"cert": "c.pem", "key": "k.pem"})) == [
        "listeners[0].tls: only used with protocol: https"
    ]
    assert problems(doc(protocol="https", tls={"cert": "c.pem"})) == [
        "listeners[0].tls.key: required"
    ]
    assert problems(doc(protocol="https", tls={"cert": "c.pem", "key": "", "ca": "x"})) == [
        "listeners[0].tls.key: expected a file path, got ''",  # in document order
        "listeners[0].tls.ca: unknown key "
        "(allowed: cert, key, certificates, policy, client_ca, client_auth)",
    ]
    assert problems(doc(protocol="https", tls="c.pem")) == [
        "listeners[0].tls: expected a mapping, got 'c.pem'"
    ]


def test_parse_config_does_not_read_the_files() -> None:
    lst = listener(protocol="https", tls={"cert": "/nonexistent/c.pem", "key": "/nonexistent/k"})
    assert lst.tls is not None and (lst.tls.cert, lst.tls.digest) == ("/nonexistent/c.pem", "")


def test_redirect_only_on_http() -> None:
    assert problems(doc(protocol="https", tls={"cert": "c", "key": "k"}, redirect_https=443)) == [
        "listeners[0].redirect_https: only used with protocol: http"
    ]


def test_http2_defaults_on_and_only_on_https() -> None:
    tls = {"cert": "c.pem", "key": "k.pem"}
    assert listener(protocol="https", tls=tls).http2 is True
    assert listener(protocol="https", tls=tls, http2=False).http2 is False
    assert problems(doc(http2=True)) == [
        "listeners[0].http2: only used with protocol: https (HTTP/2 is offered by ALPN)"
    ]
    assert problems(doc(protocol="https", tls=tls, http2="yes")) == [
        "listeners[0].http2: expected true or false, got 'yes'"
    ]


def test_http2_websocket_defaults_off_and_needs_https_with_http2() -> None:
    tls = {"cert": "c.pem", "key": "k.pem"}
    assert listener(protocol="https", tls=tls).http2_websocket is False
    assert listener(protocol="https", tls=tls, http2_websocket=True).http2_websocket is True
    wrong = "listeners[0].http2_websocket: only used with protocol: https and http2 (RFC 8441)"
    assert problems(doc(http2_websocket=True)) == [wrong]
    assert problems(doc(protocol="https", tls=tls, http2=False, http2_websocket=True)) == [wrong]


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    d = tmp_path_factory.mktemp("pems")
    return {n: make_cert(str(d), n) for n in ("a", "b")}


def write_config(tmp_path: Path, tls: dict[str, str]) -> Path:
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(doc(protocol="https", tls=tls)))
    return path


def test_load_checks_the_files_and_resolves_relative_paths(
    tmp_path: Path, pems: dict[str, tuple[str, str]]
) -> None:
    cert, key = pems["a"]
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "c.pem").write_bytes(Path(cert).read_bytes())
    (tmp_path / "tls" / "k.pem").write_bytes(Path(key).read_bytes())
    path = write_config(tmp_path, {"cert": "tls/c.pem", "key": "tls/k.pem"})
    elsewhere = os.getcwd()
    tls = load_config(str(path)).listeners[0].tls
    assert os.getcwd() == elsewhere
    assert tls is not None
    assert (tls.cert, tls.key) == (str(tmp_path / "tls/c.pem"), str(tmp_path / "tls/k.pem"))
    assert len(tls.digest) == 64
    # Same YAML, renewed files: a different config, so a reload re-reads them.
    before = load_config(str(path))
    assert load_config(str(path)) == before
    (tmp_path / "tls" / "c.pem").write_bytes(Path(pems["b"][0]).read_bytes())
    (tmp_path / "tls" / "k.pem").write_bytes(Path(pems["b"][1]).read_bytes())
    after = load_config(str(path))
    assert after != before
    renewed = after.listeners[0].tls
    assert renewed is not None and renewed.digest != tls.digest


def test_load_reports_bad_tls_files(tmp_path: Path, pems: dict[str, tuple[str, str]]) -> None:
    cert_a, key_a = pems["a"]
    _, key_b = pems["b"]
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    cases = [
        (
            {"cert": str(tmp_path / "missing.pem"), "key": key_a},
            f"cannot read certificate {tmp_path / 'missing.pem'}: no such file or directory",
        ),
        ({"cert": str(junk), "key": key_a}, f"certificate {junk} is not a PEM certificate"),
        ({"cert": cert_a, "key": str(junk)}, f"key {junk} is not a PEM key"),
        ({"cert": key_a, "key": cert_a}, f"certificate {key_a} is not a PEM certificate"),
        (
            {"cert": cert_a, "key": key_b},
            f"the key {key_b} does not belong to the certificate {cert_a}",
        ),
    ]
    for tls, message in cases:
        with pytest.raises(ConfigError) as e:
            path = write_config(tmp_path, tls)
            load_config(str(path))
        assert e.value.problems == [f"{path}:6: listeners[0].tls: {message}"]


def test_check_command_reports_a_bad_certificate(tmp_path: Path) -> None:
    path = write_config(tmp_path, {"cert": "nope.pem", "key": "nope-key.pem"})
    r = subprocess.run(
        [sys.executable, "-m", "lbproxy", "--config", str(path), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr == (
        f"lbproxy: {path}:6: listeners[0].tls: cannot read certificate {tmp_path / 'nope.pem'}: "
        "no such file or directory\n"
    )


# ------------------------------------------------------------------------------ ACL


def test_acl_parsing() -> None:
    acl = listener(acl={"mode": "allow", "cidrs": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]}).acl
    assert acl is not None and acl.mode == "allow"
    assert [str(n) for n in acl.cidrs] == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]


@pytest.mark.parametrize(
    ("acl", "message"),
    [
        (
            {"mode": "allow"},
            "listeners[0].acl.cidrs: required (a list like [10.0.0.0/8, '2001:db8::/32'])",
        ),
        (
            {"mode": "block", "cidrs": ["10.0.0.0/8"]},
            "listeners[0].acl.mode: expected one of allow, deny, got 'block'",
        ),
        ({"cidrs": ["10.0.0.0/8"]}, "listeners[0].acl.mode: required"),
        (
            {"mode": "deny", "cidrs": []},
            "listeners[0].acl.cidrs: expected a non-empty list of CIDRs, got an empty list",
        ),
        (
            {"mode": "deny", "cidrs": "10.0.0.0/8"},
            "listeners[0].acl.cidrs: expected a non-empty list of CIDRs, got '10.0.0.0/8'",
        ),
        (
            {"mode": "deny", "cidrs": ["10.0.0.1/8"]},
            "listeners[0].acl.cidrs[0]: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)",
        ),
        (
            {"mode": "deny", "cidrs": ["::1/64"]},
            "listeners[0].acl.cidrs[0]: '::1/64' has host bits set (did you mean ::/64?)",
        ),
        (
            {"mode": "deny", "cidrs": ["10.0.0.0/33"]},
            "listeners[0].acl.cidrs[0]: expected a CIDR "
            "like 10.0.0.0/8 or 2001:db8::/32, got "
            "'10.0.0.0/33'",
        ),
        (
            {"mode": "deny", "cidrs": ["localhost"]},
            "listeners[0].acl.cidrs[0]: expected a CIDR "
            "like 10.0.0.0/8 or 2001:db8::/32, got "
            "'localhost'",
        ),
        (
            {"mode": "deny", "cidrs": [10]},
            "listeners[0].acl.cidrs[0]: expected a CIDR like 10.0.0.0/8 or 2001:db8::/32, got 10",
        ),
        (
            {"mode": "deny", "cidrs": ["1.2.3.0/24"], "ports": [1]},
            "listeners[0].acl.ports: unknown key (allowed: mode, cidrs)",
        ),
    ],
)
def test_acl_errors(acl: dict[str, Any], message: str) -> None:
    assert problems(doc(acl=acl)) == [message]


def test_every_bad_cidr_is_reported() -> None:
    assert problems(doc(acl={"mode": "deny", "cidrs": ["x", "10.0.0.0/8", "y"]})) == [
        "listeners[0].acl.cidrs[0]: expected a CIDR like 10.0.0.0/8 or 2001:db8::/32, got 'x'",
        "listeners[0].acl.cidrs[2]: expected a CIDR like 10.0.0.0/8 or 2001:db8::/32, got 'y'",
    ]


def nets(*cidrs: str) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


@pytest.mark.parametrize(
    ("ip", "matches"),
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("192.0.2.7", True),
        ("192.0.2.8", False),
        ("::1", True),
        ("::2", False),
        ("2001:db8:ffff::1", True),
        ("2001:db9::1", False),
        ("::ffff:10.9.9.9", True),  # IPv4-mapped: judged as IPv4
        ("::ffff:11.0.0.1", False),
        ("fe80::1%eth0", True),  # a scoped link-local address
        ("not an address", False),
    ],
)
def test_acl_matching(ip: str, matches: bool) -> None:
    cidrs = nets("10.0.0.0/8", "192.0.2.7/32", "::1/128", "2001:db8::/32", "fe80::/10")
    assert Acl("allow", cidrs).matches(ip) is matches
    assert Acl("allow", cidrs).allows(ip) is matches
    assert Acl("deny", cidrs).allows(ip) is not matches


def test_acl_catch_alls_are_per_family() -> None:
    assert Acl("deny", nets("0.0.0.0/0")).allows("::1")
    assert not Acl("deny", nets("0.0.0.0/0")).allows("127.0.0.1")
    assert not Acl("deny", nets("::/0")).allows("::1")
    assert Acl("deny", nets("::/0")).allows("127.0.0.1")


def test_acl_equality_ignores_the_index() -> None:
    assert Acl("allow", nets("10.0.0.0/8")) == copy.deepcopy(Acl("allow", nets("10.0.0.0/8")))
    assert Acl("allow", nets("10.0.0.0/8")) != Acl("deny", nets("10.0.0.0/8"))


# ------------------------------------------------------------------------------ admin


def test_admin_token() -> None:
    d = doc()
    d["admin"] = {"token": "s3cret-Token_1"}
    assert parse_config(d).admin == Admin(Address("127.0.0.1", 8404), "s3cret-Token_1")
    for bad in ("", "has space", "tab\there", "ünïcode", 12345):
        d["admin"] = {"token": bad}
        # The message never repeats the value: it is a secret.
        assert problems(d) == [
            "admin.token: expected a non-empty token of visible ASCII characters, no spaces"
        ]


# ------------------------------------------------------------------------------ head rewrites


@pytest.mark.parametrize(
    ("target", "origin"),
    [
        (b"http://a.example", b"/"),
        (b"http://a.example/", b"/"),
        (b"http://a.example/p/q?x=1&y=2", b"/p/q?x=1&y=2"),
        (b"HTTPS://a.example:8443?x", b"/?x"),
        (b"http://[::1]:8080/v6", b"/v6"),
        (b"http://a.example/p#fragment", b"/p"),
        (b"http://a.example#fragment", b"/"),
    ],
)
def test_origin_form(target: bytes, origin: bytes) -> None:
    assert origin_form(target) == origin


@pytest.mark.parametrize(
    ("host", "port", "target", "location"),
    [
        (b"www.example", 8443, b"/a?b=1", "https://www.example:8443/a?b=1"),
        (b"www.example:8080", 8443, b"/", "https://www.example:8443/"),
        (b"www.example:80", 443, b"/x", "https://www.example/x"),
        (b"10.0.0.1:80", 443, b"/", "https://10.0.0.1/"),
        (b"[2001:db8::1]:80", 8443, b"/v6", "https://[2001:db8::1]:8443/v6"),
        (b"[::1]", 443, b"/", "https://[::1]/"),
        (b"www.example", 443, b"*", "https://www.example/"),
    ],
)
def test_https_location(host: bytes, port: int, target: bytes, location: str) -> None:
    assert https_location(host, port, target) == location
