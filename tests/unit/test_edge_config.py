"""The config keys of issue 16 (a public chat endpoint): CLB's forwarding headers,
per-client limits and trusted proxies, the bandwidth cap and gzip. Their defaults, every
validation message with its YAML path, and what they build.
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbproxy.config import (
    GZIP_TYPES,
    ClientLimits,
    ConfigError,
    Forwarding,
    Gzip,
    Listener,
    parse_bandwidth,
    parse_config,
)
from lbproxy.control.loading import load_config

REPO = Path(__file__).resolve().parents[2]


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


def test_defaults_are_off() -> None:
    lst = listener()
    assert lst.forwarding == Forwarding(None, False, False, False, "")
    assert lst.trusted_proxies is None
    assert lst.limits is None
    assert lst.bandwidth == 0
    assert lst.gzip is None


# ------------------------------------------------------------------------------ forwarding


def test_forwarding_keys() -> None:
    lst = listener(
        x_forwarded_proto=False,
        x_forwarded_port=True,
        x_forwarded_client_srcport=True,
        slb_ip=True,
        slb_id="lb-bp1abc",
    )
    assert lst.forwarding == Forwarding(False, True, True, True, "lb-bp1abc")
    # x_forwarded_proto left out follows x_forwarded_for (what lbproxy always did)
    assert listener(x_forwarded_for=False).forwarding.proto is None
    assert listener(x_forwarded_proto=True).forwarding.proto is True


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("x_forwarded_proto", "yes", "expected true or false, got 'yes'"),
        ("x_forwarded_port", 1, "expected true or false, got 1"),
        ("x_forwarded_client_srcport", None, "expected true or false, got nothing"),
        ("slb_ip", "on", "expected true or false, got 'on'"),
        ("slb_id", "", "expected a name of visible ASCII characters, got ''"),
        ("slb_id", True, "expected a name of visible ASCII characters, got true"),
        ("slb_id", "lb 1", "expected a name without spaces, at most 256 characters, got 'lb 1'"),
        ("slb_id", "lb\r\nX: 1", "expected a name of visible ASCII characters, got 'lb\\r\\nX: 1'"),
        ("slb_id", "lb-é", "expected a name of visible ASCII characters, got 'lb-é'"),
    ],
)
def test_forwarding_errors(key: str, value: Any, message: str) -> None:
    assert problems(doc(**{key: value})) == [f"listeners[0].{key}: {message}"]


# ------------------------------------------------------------------------------ limits


def test_limits() -> None:
    lst = listener(
        limits={"connections_per_client": 3, "requests_per_second": 2.5, "burst": 7},
        trusted_proxies=["10.0.0.0/8", "::1"],
    )
    assert lst.limits == ClientLimits(3, 2.5, 7, 65536)
    assert lst.trusted_proxies is not None
    assert lst.trusted_proxies.matches("10.1.2.3") and not lst.trusted_proxies.matches("::2")
    assert lst.trusted_proxies.cidrs == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    # burst defaults to one second's worth, at least 1
    assert listener(limits={"requests_per_second": 2.5}).limits == ClientLimits(0, 2.5, 3)
    assert listener(limits={"requests_per_second": 0.1}).limits == ClientLimits(0, 0.1, 1)
    assert listener(limits={"connections_per_client": 1, "table_size": 16}).limits == (
        ClientLimits(1, 0.0, 1, 16)
    )
    assert (
        listener(limits={"connections_per_client": 1}, trusted_proxies=[]).trusted_proxies is None
    )


@pytest.mark.parametrize(
    ("keys", "found"),
    [
        (
            {"limits": {}},
            [
                "listeners[0].limits: limits nothing: set connections_per_client and/or"
                " requests_per_second"
            ],
        ),
        ({"limits": 5}, ["listeners[0].limits: expected a mapping, got 5"]),
        (
            {"limits": {"rate": 5}},
            [
                "listeners[0].limits.rate: unknown key (allowed: connections_per_client,"
                " requests_per_second, burst, table_size, scope, on_cluster_failure)",
                "listeners[0].limits: limits nothing: set connections_per_client and/or"
                " requests_per_second",
            ],
        ),
        (
            {"limits": {"connections_per_client": -1}},
            ["listeners[0].limits.connections_per_client: expected an integer 0..1000000, got -1"],
        ),
        (
            {"limits": {"requests_per_second": 0}},
            [
                "listeners[0].limits.requests_per_second: expected a number of requests per"
                " second 0..1000000, got 0"
            ],
        ),
        (
            {"limits": {"requests_per_second": "10/s"}},
            [
                "listeners[0].limits.requests_per_second: expected a positive number of"
                " requests per second, got '10/s'"
            ],
        ),
        (
            {"limits": {"connections_per_client": 2, "burst": 5}},
            ["listeners[0].limits.burst: only used with requests_per_second"],
        ),
        (
            {"limits": {"requests_per_second": 1, "burst": 0}},
            ["listeners[0].limits.burst: expected an integer 1..1000000, got 0"],
        ),
        (
            {"limits": {"requests_per_second": 1, "table_size": 2}},
            ["listeners[0].limits.table_size: expected an integer 16..10000000, got 2"],
        ),
        (
            {"trusted_proxies": ["10.0.0.0/8"]},
            ["listeners[0].trusted_proxies: only used with limits (it picks the client address)"],
        ),
        (
            {"limits": {"requests_per_second": 1}, "trusted_proxies": "10.0.0.0/8"},
            [
                "listeners[0].trusted_proxies: expected a list of CIDRs like [10.0.0.0/8],"
                " got '10.0.0.0/8'"
            ],
        ),
        (
            {"limits": {"requests_per_second": 1}, "trusted_proxies": ["10.0.0.1/8", "x"]},
            [
                "listeners[0].trusted_proxies[0]: '10.0.0.1/8' has host bits set"
                " (did you mean 10.0.0.0/8?)",
                "listeners[0].trusted_proxies[1]: expected a CIDR like 10.0.0.0/8 or"
                " 2001:db8::/32, got 'x'",
            ],
        ),
    ],
)
def test_limits_errors(keys: dict[str, Any], found: list[str]) -> None:
    assert problems(doc(**keys)) == found


# ------------------------------------------------------------------------------ bandwidth


@pytest.mark.parametrize(
    ("value", "rate"),
    [
        ("10MiB/s", 10 << 20),
        ("10MiB", 10 << 20),
        ("512KiB/s", 512 << 10),
        ("1.5MiB/s", 3 << 19),
        ("1G/s", 1 << 30),
        (1048576, 1 << 20),
        ("2048", 2048),
    ],
)
def test_bandwidth(value: Any, rate: int) -> None:
    assert parse_bandwidth(value) == rate
    assert listener(bandwidth=value).bandwidth == rate


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "fast",
            "expected a bandwidth like 10MiB/s, 512KiB/s or 1048576 (bytes per second), got 'fast'",
        ),
        (
            "10Mbps",
            "expected a bandwidth like 10MiB/s, 512KiB/s or 1048576 (bytes per second),"
            " got '10Mbps'",
        ),
        (
            True,
            "expected a bandwidth like 10MiB/s, 512KiB/s or 1048576 (bytes per second), got true",
        ),
        (100, "expected a bandwidth of at least 1KiB/s, got 100"),
        (0, "expected a bandwidth of at least 1KiB/s, got 0"),
    ],
)
def test_bandwidth_errors(value: Any, message: str) -> None:
    assert problems(doc(bandwidth=value)) == [f"listeners[0].bandwidth: {message}"]


# ------------------------------------------------------------------------------ gzip


def test_gzip() -> None:
    assert listener(gzip=False).gzip is None
    assert listener(gzip=True).gzip == Gzip(GZIP_TYPES, 1024)
    lst = listener(gzip=True, gzip_types=["Text/CSV", "application/wasm"], gzip_min_length="4KiB")
    assert lst.gzip == Gzip(GZIP_TYPES | {"text/csv", "application/wasm"}, 4096)
    # CLB's list, and text/javascript (RFC 9239)
    assert "image/svg+xml" in GZIP_TYPES and "text/javascript" in GZIP_TYPES
    assert len(GZIP_TYPES) == 12


@pytest.mark.parametrize(
    ("keys", "found"),
    [
        ({"gzip": "on"}, ["listeners[0].gzip: expected true or false, got 'on'"]),
        ({"gzip_types": ["text/csv"]}, ["listeners[0].gzip_types: only used with gzip: true"]),
        (
            {"gzip": False, "gzip_min_length": 10},
            ["listeners[0].gzip_min_length: only used with gzip: true"],
        ),
        (
            {"gzip": True, "gzip_types": "text/csv"},
            [
                "listeners[0].gzip_types: expected a list of media types like [text/csv],"
                " got 'text/csv'"
            ],
        ),
        (
            {"gzip": True, "gzip_types": ["text/csv; charset=utf-8"]},
            [
                "listeners[0].gzip_types: expected media types like text/csv (no parameters),"
                " got 'text/csv; charset=utf-8'"
            ],
        ),
        (
            {"gzip": True, "gzip_types": ["text"]},
            [
                "listeners[0].gzip_types: expected media types like text/csv (no parameters),"
                " got 'text'"
            ],
        ),
        (
            {"gzip": True, "gzip_min_length": "big"},
            ["listeners[0].gzip_min_length: expected a size like 8192, 8KiB or 1MiB, got 'big'"],
        ),
        (
            {"gzip": True, "gzip_min_length": "2GiB"},
            ["listeners[0].gzip_min_length: expected a size like 8192, 8KiB or 1MiB, got '2GiB'"],
        ),
    ],
)
def test_gzip_errors(keys: dict[str, Any], found: list[str]) -> None:
    assert problems(doc(**keys)) == found


# ------------------------------------------------------------------------------ the files


def test_every_new_key_in_full_yaml() -> None:
    full = yaml.safe_load((REPO / "config" / "full.yaml").read_text())
    keys = set().union(*(lst.keys() for lst in full["listeners"]))
    for key in (
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
    ):
        assert key in keys  # and accepted: full.yaml loads (test_config)
    limits = [lst["limits"] for lst in full["listeners"] if "limits" in lst]
    (unknown,) = problems(doc(limits={"connections_per_client": 1, "zzzz": 1}))
    allowed = unknown.split("allowed: ", 1)[1].removesuffix(")").split(", ")
    assert set().union(*(m.keys() for m in limits)) == set(allowed)


def test_the_demo_turns_gzip_on() -> None:
    demo = load_config(str(REPO / "config" / "lb.yaml"))
    assert demo.listeners[0].gzip == Gzip(GZIP_TYPES, 1024)


def test_check_reports_every_problem_with_its_path(tmp_path: Path) -> None:
    bad = doc(
        slb_id="a b",
        limits={"requests_per_second": -1},
        bandwidth="lots",
        gzip_types=["text/csv"],
    )
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    run = subprocess.run(
        [sys.executable, "-m", "lbproxy", "--config", str(path), "--check"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert run.returncode == 2
    for place in (
        "listeners[0].slb_id:",
        "listeners[0].limits.requests_per_second:",
        "listeners[0].bandwidth:",
        "listeners[0].gzip_types:",
    ):
        assert place in run.stderr + run.stdout
