"""``lbproxy --check`` validates ``discovery``, ``resolvers`` and ``sticky_session.secret``
(issue 14). A name that does not resolve is not a config error: --check asks no DNS server."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_cli import MODULE, assert_no_traceback, check, write

GOOD = """\
listeners:
  - name: web
    bind: 127.0.0.1:5000
    server_group: rs1
server_groups:
  rs1:
    discovery:
      dns: name-that-does-not-exist.invalid
      port: 5001
      interval: 10s
    sticky_session:
      type: insert
      secret: a-long-enough-shared-secret
  rs2:
    servers: [127.0.0.1:5002]
    discovery:
      dns: _chat._tcp.service.consul
resolvers: [127.0.0.1:53, "::1"]
"""


def test_check_accepts_discovery_and_resolvers(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    r = check(MODULE, path)
    assert (r.returncode, r.stderr) == (0, f"lbproxy: {path}: configuration is valid\n")


def test_check_reports_every_discovery_and_resolver_problem(tmp_path: Path) -> None:
    text = (
        GOOD.replace("      port: 5001\n", "")
        .replace("interval: 10s", "interval: 100ms")
        .replace("dns: _chat._tcp.service.consul", "dns: _chat._tcp.service.consul\n      port: 1")
        .replace('"::1"', "dns.example:53")
        .replace("a-long-enough-shared-secret", "tiny")
    )
    path = write(tmp_path, text)
    r = check(MODULE, path)
    assert r.returncode == 2
    # Each problem with the line it comes from, in the file's order (a key left out is placed
    # at its section's line, after the problems inside that section).
    assert r.stderr.splitlines() == [
        f"lbproxy: {path}:9: server_groups.rs1.discovery.interval: must be at least 1s",
        f"lbproxy: {path}:7: server_groups.rs1.discovery.port: required with an A/AAAA name"
        " (the servers' port)",
        f"lbproxy: {path}:12: server_groups.rs1.sticky_session.secret: expected at least 16"
        " characters",
        f"lbproxy: {path}:17: server_groups.rs2.discovery.port: not used with an SRV name"
        " (the records carry the ports)",
        f"lbproxy: {path}:18: resolvers[1]: a name server is an IP address (ip or ip:port),"
        " got 'dns.example:53'",
    ]
    assert "tiny" not in r.stderr  # a secret is never echoed
    assert_no_traceback(r)
