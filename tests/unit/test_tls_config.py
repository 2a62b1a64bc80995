"""The ``tls`` keys of issue 15 (several certificates, ``policy``, ``client_ca`` and
``client_auth``) and the pieces of ``tls`` that need no handshake: every validation message,
what ``load_config`` (and so ``--check``) refuses in the files, the SNI choice among
certificate names, the client-certificate header values, the handshake failure reasons and
that clients can never send the X-Client-Cert-* headers themselves.

Handshakes themselves are in tests/integration/test_tls_sni_policy_mtls.py.
"""

from __future__ import annotations

import hashlib
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lbproxy.config import Certificate, ConfigError, Tls, parse_config
from lbproxy.control.loading import load_config
from lbproxy.core import metrics
from lbproxy.proxy import tls
from lbproxy.wire import headers
from lbproxy.wire.http1 import Limits, parse_request_head
from tests.pki import CA


def doc(tls_doc: Any) -> dict[str, Any]:
    return {
        "listeners": [
            {
                "name": "secure",
                "bind": "127.0.0.1:5443",
                "protocol": "https",
                "server_group": "rs1",
                "tls": tls_doc,
            }
        ],
        "server_groups": {"rs1": {"servers": ["127.0.0.1:5001"]}},
    }


def problems(tls_doc: Any) -> list[str]:
    with pytest.raises(ConfigError) as e:
        parse_config(doc(tls_doc))
    return e.value.problems


def parsed(tls_doc: Any) -> Tls:
    t = parse_config(doc(tls_doc)).listeners[0].tls
    assert t is not None
    return t


# ------------------------------------------------------------------------------ parsing


def test_single_and_list_forms_and_defaults() -> None:
    one = parsed({"cert": "c.pem", "key": "k.pem"})
    assert one == Tls(certificates=(Certificate("c.pem", "k.pem"),))
    assert (one.policy, one.client_ca, one.client_auth) == (None, None, None)
    assert (one.cert, one.key, one.files) == ("c.pem", "k.pem", ("c.pem", "k.pem"))
    many = parsed(
        {
            "certificates": [{"cert": "a.pem", "key": "a.key"}, {"cert": "b.pem", "key": "b.key"}],
            "policy": "tls_cipher_policy_1_2_strict",
            "client_ca": "ca.pem",
            "client_auth": "optional",
        }
    )
    assert many.certificates == (Certificate("a.pem", "a.key"), Certificate("b.pem", "b.key"))
    assert (many.cert, many.key) == ("a.pem", "a.key")  # the first is the default
    assert (many.policy, many.client_ca, many.client_auth) == (
        "tls_cipher_policy_1_2_strict",
        "ca.pem",
        "optional",
    )
    assert many.files == ("a.pem", "a.key", "b.pem", "b.key", "ca.pem")
    # A client CA alone asks for client certificates: required, the safe reading.
    assert parsed({"cert": "c", "key": "k", "client_ca": "ca.pem"}).client_auth == "required"


def test_every_policy_name_is_accepted() -> None:
    for name in (
        "tls_cipher_policy_1_0",
        "tls_cipher_policy_1_1",
        "tls_cipher_policy_1_2",
        "tls_cipher_policy_1_2_strict",
        "tls_cipher_policy_1_2_strict_with_1_3",
    ):
        assert parsed({"cert": "c", "key": "k", "policy": name}).policy == name


def test_validation_messages() -> None:
    names = ", ".join(tls.POLICIES)
    assert problems({"cert": "c", "key": "k", "policy": "tls_cipher_policy_1_3"}) == [
        f"listeners[0].tls.policy: expected one of {names}, got 'tls_cipher_policy_1_3'"
    ]
    assert problems({"cert": "c", "key": "k", "client_auth": "required"}) == [
        "listeners[0].tls.client_auth: needs client_ca (the CAs client certificates chain to)"
    ]
    assert problems({"cert": "c", "key": "k", "client_ca": "ca", "client_auth": "yes"}) == [
        "listeners[0].tls.client_auth: expected one of required, optional, got 'yes'"
    ]
    assert problems({"cert": "c", "key": "k", "client_ca": ""}) == [
        "listeners[0].tls.client_ca: expected a file path, got ''"
    ]
    assert problems({"cert": "c", "key": "k", "certificates": [{"cert": "a", "key": "b"}]}) == [
        "listeners[0].tls: either cert and key, or certificates: not both"
    ]
    assert problems({"certificates": []}) == [
        "listeners[0].tls.certificates: expected a non-empty list of {cert, key}, got an empty list"
    ]
    assert problems({"certificates": "a.pem"}) == [
        "listeners[0].tls.certificates: expected a non-empty list of {cert, key}, got 'a.pem'"
    ]
    assert problems(
        {"certificates": [{"cert": "a", "key": "b"}, {"cert": "c"}, "d", {"cert": "e", "k": 1}]}
    ) == [
        "listeners[0].tls.certificates[1].key: required",
        "listeners[0].tls.certificates[2]: expected a mapping, got 'd'",
        "listeners[0].tls.certificates[3].k: unknown key (allowed: cert, key)",
        "listeners[0].tls.certificates[3].key: required",
    ]


# ------------------------------------------------------------------------------ files at load


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = str(tmp_path_factory.mktemp("pki"))
    ca = CA(d)
    return {
        "ca": ca,
        "a": ca.issue("a", "a.test", dns=("a.test",)),
        "b": ca.issue("b", "b.test", dns=("*.b.test", "b.test")),
        "nosan": ca.issue("nosan", "Legacy.Test"),
        "client": ca.issue("client", "alice", client=True),
    }


def write(tmp_path: Path, tls_doc: dict[str, Any]) -> str:
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(doc(tls_doc)))
    return str(path)


def test_load_reads_every_file_and_its_digest_covers_them(
    tmp_path: Path, pki: dict[str, Any]
) -> None:
    a, b, ca = pki["a"], pki["b"], pki["ca"]
    for name, src in (("a.pem", a.cert), ("a.key", a.key), ("b.pem", b.cert), ("b.key", b.key)):
        (tmp_path / name).write_bytes(Path(src).read_bytes())
    (tmp_path / "ca.pem").write_bytes(Path(ca.cert).read_bytes())
    path = write(
        tmp_path,
        {
            "certificates": [{"cert": "a.pem", "key": "a.key"}, {"cert": "b.pem", "key": "b.key"}],
            "client_ca": "ca.pem",
        },
    )
    t = load_config(path).listeners[0].tls
    assert t is not None
    assert t.files == tuple(
        str(tmp_path / n) for n in ("a.pem", "a.key", "b.pem", "b.key", "ca.pem")
    )
    loaded = tls.load(t)
    assert loaded.digest == t.digest and len(t.digest) == 64
    assert loaded.names == (("a.test",), ("*.b.test", "b.test"))
    # A renewed second certificate, or a new client CA, changes the config: a reload re-reads.
    (tmp_path / "b.pem").write_bytes(Path(a.cert).read_bytes())
    (tmp_path / "b.key").write_bytes(Path(a.key).read_bytes())
    t2 = load_config(path).listeners[0].tls
    assert t2 is not None and t2.digest != t.digest
    (tmp_path / "ca.pem").write_bytes(Path(ca.cert).read_bytes() + b"\n")
    t3 = load_config(path).listeners[0].tls
    assert t3 is not None and t3.digest != t2.digest


def test_load_reports_bad_files_of_the_new_keys(tmp_path: Path, pki: dict[str, Any]) -> None:
    a, b = pki["a"], pki["b"]
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    not_a_cert = tmp_path / "fake.pem"
    not_a_cert.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    missing = tmp_path / "missing.pem"
    pair_a = {"cert": a.cert, "key": a.key}
    cases = [
        (
            {"certificates": [pair_a, {"cert": b.cert, "key": a.key}]},
            f"the key {a.key} does not belong to the certificate {b.cert}",
        ),
        (
            {"certificates": [pair_a, {"cert": str(missing), "key": b.key}]},
            f"cannot read certificate {missing}: no such file or directory",
        ),
        (
            {"certificates": [pair_a, {"cert": str(not_a_cert), "key": b.key}]},
            f"certificate {not_a_cert} cannot be read: ",
        ),
        (
            {**pair_a, "client_ca": str(missing)},
            f"cannot read client CA {missing}: no such file or directory",
        ),
        ({**pair_a, "client_ca": str(junk)}, f"client CA {junk} is not a PEM certificate"),
        (
            {**pair_a, "client_ca": str(not_a_cert), "client_auth": "optional"},
            f"client CA {not_a_cert} cannot be loaded: ",
        ),
    ]
    for tls_doc, message in cases:
        with pytest.raises(ConfigError) as e:
            path = write(tmp_path, tls_doc)
            load_config(path)
        [problem] = e.value.problems
        assert problem.startswith(f"{path}:6: listeners[0].tls: {message}"), problem


def test_check_command_reports_a_bad_client_ca(tmp_path: Path, pki: dict[str, Any]) -> None:
    a = pki["a"]
    path = write(tmp_path, {"cert": a.cert, "key": a.key, "client_ca": "nope-ca.pem"})
    r = subprocess.run(
        [sys.executable, "-m", "lbproxy", "--config", path, "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert r.stderr == (
        f"lbproxy: {path}:6: listeners[0].tls: cannot read client CA {tmp_path / 'nope-ca.pem'}: "
        "no such file or directory\n"
    )


def test_a_certificate_without_san_serves_its_common_name(pki: dict[str, Any]) -> None:
    nosan, a = pki["nosan"], pki["a"]
    loaded = tls.load(
        Tls(certificates=(Certificate(a.cert, a.key), Certificate(nosan.cert, nosan.key)))
    )
    assert loaded.names == (("a.test",), ("legacy.test",))


# ------------------------------------------------------------------------------ SNI choice


def test_sni_choice() -> None:
    ctxs = [ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER) for _ in range(4)]
    default, one, wild, later = ctxs
    sni = tls.Sni(
        ctxs,
        [
            ("default.test",),
            ("one.test", "*.one.test"),
            ("*.wild.test", "x.one.test"),
            ("one.test",),
        ],
    )
    assert sni.choose(None) is None and sni.choose("") is None  # no SNI: the default
    assert sni.choose("unknown.test") is None
    assert sni.choose("default.test") is default
    assert sni.choose("ONE.test.") is one  # case and a trailing dot do not matter
    assert sni.choose("a.one.test") is one  # wildcard: one label
    assert sni.choose("x.one.test") is wild  # an exact name beats a wildcard
    assert sni.choose("a.b.one.test") is None  # a wildcard covers one label only
    assert sni.choose("wild.test") is None  # ... and not the bare domain
    assert sni.choose("deep.wild.test") is wild
    assert sni.choose("one.test") is one and one is not later  # a tie: the earlier one


# ------------------------------------------------------------------------------ policies


def test_policies_map_clb_names_to_versions() -> None:
    v = ssl.TLSVersion
    got = {name: (p.minimum, p.maximum) for name, p in tls.POLICIES.items()}
    assert got == {
        "tls_cipher_policy_1_0": (v.TLSv1, v.TLSv1_2),
        "tls_cipher_policy_1_1": (v.TLSv1_1, v.TLSv1_2),
        "tls_cipher_policy_1_2": (v.TLSv1_2, v.TLSv1_2),
        "tls_cipher_policy_1_2_strict": (v.TLSv1_2, v.TLSv1_2),
        "tls_cipher_policy_1_2_strict_with_1_3": (v.TLSv1_2, v.TLSv1_3),
    }
    strict = tls.POLICIES["tls_cipher_policy_1_2_strict"].ciphers.split(":")
    assert all(c.startswith("ECDHE-") for c in strict)  # strict: forward secrecy only
    assert "AES128-GCM-SHA256" in tls.POLICIES["tls_cipher_policy_1_2"].ciphers.split(":")


# ------------------------------------------------------------------------------ headers


class FakePeer:
    """Stands in for an SSLObject's getpeercert (the real ones are in the integration tests)."""

    def __init__(self, der: bytes | None) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool = False) -> bytes | None:
        assert binary_form
        return self.der


def test_client_cert_header_values(tmp_path: Path) -> None:
    ca = CA(str(tmp_path))
    alice = ca.issue("alice", "alice", client=True, org="Acme, Inc.")
    sneaky = ca.issue("sneaky", "x\r\nX-Client-Cert-Fingerprint: 00\u00e9", client=True)
    assert tls.client_cert_headers(None) == ()
    assert tls.client_cert_headers(FakePeer(None)) == ()  # type: ignore[arg-type]
    assert tls.client_cert_headers(FakePeer(alice.der)) == (  # type: ignore[arg-type]
        b"X-Client-Cert-Subject: O=Acme\\, Inc.,CN=alice",
        b"X-Client-Cert-Fingerprint: " + hashlib.sha256(alice.der).hexdigest().encode(),
    )
    subject, _ = tls.client_cert_headers(FakePeer(sneaky.der))  # type: ignore[arg-type]
    # No line break can get out of a subject; non-ASCII is \XX escaped UTF-8 (RFC 4514).
    assert subject == b"X-Client-Cert-Subject: CN=x\\0D\\0AX-Client-Cert-Fingerprint: 00\\C3\\A9"


def test_clients_cannot_send_client_cert_headers() -> None:
    raw = (
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Client-Cert-Subject: CN=admin\r\n"
        b"x-client-cert-fingerprint: 00\r\nX-Other: 1\r\n\r\n"
    )
    req = parse_request_head(raw, Limits())
    assert req is not None
    for forwarded in (True, False):  # whatever the listener's x_forwarded_for
        head = headers.upstream_request_head(
            req,
            client_ip="127.0.0.1",
            scheme=b"https",
            forwarded=forwarded,
            default_host=b"b",
            upgrade=False,
            extra=(b"X-Client-Cert-Subject: CN=real",),
        )
        lines = head.lower().split(b"\r\n")
        assert b"x-client-cert-subject: cn=real" in lines
        assert not [x for x in lines if x.startswith(b"x-client-cert-fingerprint")]
        assert b"x-client-cert-subject: cn=admin" not in lines
        assert b"x-other: 1" in lines


# ------------------------------------------------------------------------------ failures


def test_failure_reasons_are_the_metric_labels() -> None:
    def err(reason: str) -> ssl.SSLError:
        e = ssl.SSLError(1, reason)
        e.reason = reason  # type: ignore[misc]
        return e

    assert tls.failure_reason(ssl.SSLCertVerificationError(1, "x")) == "client_certificate"
    assert tls.failure_reason(err("PEER_DID_NOT_RETURN_A_CERTIFICATE")) == "client_certificate"
    assert tls.failure_reason(err("UNSUPPORTED_PROTOCOL")) == "protocol"
    assert tls.failure_reason(err("NO_SHARED_CIPHER")) == "protocol"
    assert tls.failure_reason(err("HTTP_REQUEST")) == "other"
    assert tls.failure_reason(ConnectionAbortedError("SSL handshake is taking longer")) == (
        "timeout"
    )
    assert tls.failure_reason(ConnectionResetError()) == "other"
    reasons = {"client_certificate", "protocol", "timeout", "other"}
    assert set(metrics.TLS_FAILURE_REASONS) == reasons
    stats = metrics.ListenerStats("secure")
    assert stats.tls_failures == dict.fromkeys(metrics.TLS_FAILURE_REASONS, 0)
