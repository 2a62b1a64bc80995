"""``server_groups.<name>.tls`` and ``.proxy_protocol``, and ``listeners[].proxy_protocol``
(issue 26) without a handshake: validation messages, what the loader refuses in the files (a
bad CA fails ``--check``), the client context each setting builds, the failure reasons, the
files watched, and the pool's keys. Handshakes are in tests/integration/test_backend_tls.py."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbproxy.config import ConfigError, parse_config
from lbproxy.control.loading import load_config
from lbproxy.control.reload import tls_files
from lbproxy.core import metrics
from lbproxy.core.pool import Pool
from lbproxy.proxy import upstream_tls
from tests.pki import CA


def doc(group: dict[str, Any], listener: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "listeners": [
            {"name": "web", "bind": "127.0.0.1:5000", "server_group": "g", **(listener or {})}
        ],
        "server_groups": {"g": {"servers": ["127.0.0.1:5001"], **group}},
    }


def problems(d: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(d)
    return e.value.problems


def test_defaults_are_off() -> None:
    c = parse_config(doc({}))
    assert c.server_groups[0].tls is None and c.server_groups[0].proxy_protocol is None
    assert c.listeners[0].proxy_protocol is None
    t = parse_config(doc({"tls": {}})).server_groups[0].tls
    assert t is not None and t.verify and t.ca is None and t.min_version == "1.2"


def test_validation_messages() -> None:
    assert problems(doc({"proxy_protocol": "v3"})) == [
        "server_groups.g.proxy_protocol: expected one of v1, v2, got 'v3'"
    ]
    assert problems(doc({"tls": {"cert": "a.pem"}})) == [
        "server_groups.g.tls.key: required with cert (mutual TLS needs both)"
    ]
    assert problems(doc({"tls": {"verify": False, "ca": "a.pem"}})) == [
        "server_groups.g.tls.ca: only used with verify: true"
    ]
    sni_only = parse_config(doc({"tls": {"verify": False, "server_name": "a.test"}}))
    assert sni_only.server_groups[0].tls is not None
    assert problems(doc({"tls": {"min_version": "1.1"}})) == [
        "server_groups.g.tls.min_version: expected one of 1.2, 1.3, got '1.1'"
    ]
    assert problems(doc({}, {"proxy_protocol": {"versions": ["v2"]}})) == [
        "listeners[0].proxy_protocol.from: required (a list of the balancers' CIDRs like "
        "[10.0.0.0/8])"
    ]
    assert problems(doc({}, {"proxy_protocol": {"from": [], "versions": []}})) == [
        "listeners[0].proxy_protocol.from: expected a non-empty list of CIDRs, got an empty list",
        "listeners[0].proxy_protocol.versions: expected a non-empty list of v1, v2, got an empty "
        "list",
    ]
    pp = parse_config(doc({}, {"proxy_protocol": {"from": ["10.0.0.0/8", "::1"]}}))
    section = pp.listeners[0].proxy_protocol
    assert section is not None and section.versions == ("v1", "v2") and section.timeout == 5.0
    assert section.allows("10.1.2.3") and section.allows("::1") and not section.allows("11.0.0.1")


def test_the_loader_checks_the_files_and_watches_them(tmp_path: Path) -> None:
    ca = CA(str(tmp_path))
    client = ca.issue("lb", "lbproxy", client=True)
    good = {"ca": ca.cert, "cert": client.cert, "key": client.key}
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(doc({"tls": good})))
    config = load_config(str(path))
    t = config.server_groups[0].tls
    assert t is not None and len(t.digest) == 64
    assert set(tls_files(config)) >= {ca.cert, client.cert, client.key}
    (tmp_path / "junk.pem").write_text("not a certificate")
    for bad, why in (
        ({"ca": str(tmp_path / "missing.pem")}, "cannot read CA"),
        ({"ca": str(tmp_path / "junk.pem")}, "is not PEM"),
        ({"cert": client.cert, "key": ca.cert}, "is not PEM"),
        ({"ciphers": "NO-SUCH-CIPHER"}, "no cipher OpenSSL knows"),
    ):
        path.write_text(yaml.safe_dump(doc({"tls": bad})))
        with pytest.raises(ConfigError, match=f"server_groups.g.tls: .*{why}"):
            load_config(str(path))


def test_the_client_context_follows_the_settings(tmp_path: Path) -> None:
    ca = CA(str(tmp_path))
    t = parse_config(doc({"tls": {"ca": ca.cert, "min_version": "1.3"}})).server_groups[0].tls
    assert t is not None
    ctx, _ = upstream_tls.load(t)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert upstream_tls.context(t) is upstream_tls.context(t)  # one per distinct section
    off = parse_config(doc({"tls": {"verify": False}})).server_groups[0].tls
    assert off is not None
    ctx, _ = upstream_tls.load(off)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


def test_failure_reasons_are_the_metric_labels() -> None:
    verify = ssl.SSLCertVerificationError(1, "certificate verify failed")
    verify.verify_message = "unable to get local issuer certificate"
    cases = {
        "verify": verify,
        "reset": ConnectionResetError(),
        "other": upstream_tls.TlsError("gone"),
    }
    for reason, exc in cases.items():
        assert upstream_tls.failure_reason(exc) == reason
        assert reason in metrics.BACKEND_TLS_FAILURE_REASONS
    assert "unable to get local issuer" in upstream_tls.describe(verify)


class Conn:
    def __init__(self, key: str) -> None:
        self.key = key
        self.closed = False
        self.idle_since = 0.0
        self.reused = False

    def close(self) -> None:
        self.closed = True


def test_the_pool_hands_out_only_connections_of_the_key_asked_for() -> None:
    pool = Pool()
    a, b, plain = Conn("client-a"), Conn("client-b"), Conn("")
    for c in (a, b, plain):
        pool.put(c, 0.0, 10)
    assert pool.take(1.0, 60, "client-a") is a
    assert pool.take(1.0, 60, "client-a") is None
    assert pool.take(1.0, 60) is plain
    assert pool.idle == [b]  # another client's stays for it
    # Full of other clients' connections: the oldest goes, the newest is kept.
    c, d = Conn("client-c"), Conn("client-d")
    pool.put(c, 2.0, 2)
    pool.put(d, 3.0, 2)
    assert b.closed and pool.idle == [c, d]
    # Full of connections of its own key: the newcomer is closed, as before keys.
    e = Conn("client-d")
    pool.put(Conn("client-d"), 4.0, 2)
    pool.put(e, 4.0, 2)
    assert e.closed
