"""HTTPS listener parity with CLB (issue 15, certificates and policies) over real TLS, with
certificates made in the test by ``tests.pki`` (the ``cryptography`` package):

- several certificates: the one whose names (SAN, wildcards included) match the client's SNI
  is served, the first to clients without SNI or with an unknown name; a reload re-reads them;
- ``policy``: each CLB policy accepts the versions and ciphers it lists and refuses the others
  (what this machine's OpenSSL can negotiate: TLS 1.0 and 1.1 only at security level 0, which
  the 1_0/1_1 policies set; 3DES is not built into Debian's OpenSSL 3);
- mutual TLS, required and optional: a verified client's subject and fingerprint reach the
  backend, a client without a valid certificate fails the handshake and is counted, the
  X-Client-Cert-* headers can never be set by a client, on any listener; WSS still works;
- a certificate chosen by SNI keeps the listener's client-certificate check;
- a reload applies a new policy and client_auth to new connections; open ones keep theirs.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import warnings
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from lbproxy.control import metric_families
from lbproxy.control.app import Proxy
from lbproxy.control.loading import load_config
from tests.pki import CA, Issued
from tests.support import read_response, wait_for


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = str(tmp_path_factory.mktemp("pki"))
    ca = CA(d)
    other = CA(d, "Other CA")
    return {
        "ca": ca,
        "a": ca.issue("a", "a.test", dns=("a.test",), ips=("127.0.0.1",)),
        "b": ca.issue("b", "b.test", dns=("*.b.test", "b.test")),
        "c": ca.issue("c", "c.test", dns=("c.test",)),
        "c2": ca.issue("c2", "c.test", dns=("c.test",)),
        "rsa": ca.issue("rsa", "rsa.test", dns=("rsa.test",), ips=("127.0.0.1",), kind="rsa"),
        "alice": ca.issue("alice", "alice", client=True, org="Acme"),
        "mallory": other.issue("mallory", "alice", client=True, org="Acme"),
    }


def https(name: str, tls: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "bind": "127.0.0.1:0",
        "protocol": "https",
        "server_group": "rs1",
        "tls": tls,
        **extra,
    }


async def start(make_proxy, tmp_path: Path, backend: str, *listeners: dict[str, Any]) -> Proxy:
    doc = {
        "listeners": list(listeners),
        "server_groups": {"rs1": {"servers": [backend], "health_check": {"enabled": False}}},
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(doc))
    proxy: Proxy = await make_proxy(load_config(str(path)), str(path))
    return proxy


def pair(issued: Issued) -> dict[str, str]:
    return {"cert": issued.cert, "key": issued.key}


def trusting(ca: CA, client: Issued | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca.cert)
    if client is not None:
        ctx.load_cert_chain(client.cert, client.key)
    return ctx


async def handshake(proxy: Proxy, listener: str, ctx: ssl.SSLContext, sni: str | None) -> bytes:
    """The DER certificate the listener shows a client sending ``sni`` (None: no SNI)."""
    a = proxy.listeners.address(listener)
    _, writer = await asyncio.open_connection(
        a.host, a.port, ssl=ctx, server_hostname=sni if sni is not None else ""
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)
    finally:
        writer.close()


async def get(
    proxy: Proxy,
    listener: str,
    ctx: ssl.SSLContext | None,
    path: str,
    *extra: bytes,
    sni: str | None = None,
) -> tuple[int, bytes]:
    """One request over a fresh connection (TLS when ``ctx``); (status, body)."""
    a = proxy.listeners.address(listener)
    kw: dict[str, Any] = {}
    if ctx is not None:
        kw = {"ssl": ctx, "server_hostname": sni or ""}
    reader, writer = await asyncio.open_connection(a.host, a.port, **kw)
    try:
        head = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n"
        writer.write(head + b"".join(h + b"\r\n" for h in extra) + b"\r\n")
        resp = await read_response(reader)
        return resp.status, resp.body
    finally:
        writer.close()


def seen_headers(body: bytes) -> dict[str, list[str]]:
    import json

    out: dict[str, list[str]] = {}
    for k, v in json.loads(body)["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


# ------------------------------------------------------------------------------ SNI


async def test_sni_chooses_the_certificate_and_a_reload_rereads_them(
    make_backend, make_proxy, pki, tmp_path
):
    backend = await make_backend("A")
    a, b, c, c2, ca = pki["a"], pki["b"], pki["c"], pki["c2"], pki["ca"]
    live_c = {"cert": str(tmp_path / "c-live.pem"), "key": str(tmp_path / "c-live.key")}
    Path(live_c["cert"]).write_bytes(Path(c.cert).read_bytes())
    Path(live_c["key"]).write_bytes(Path(c.key).read_bytes())
    tls = {"certificates": [pair(a), pair(b), live_c]}
    proxy = await start(make_proxy, tmp_path, backend.address, https("secure", tls))
    ctx = trusting(ca)  # check_hostname on: a wrong certificate fails the handshake
    assert await handshake(proxy, "secure", ctx, "a.test") == a.der
    assert await handshake(proxy, "secure", ctx, "b.test") == b.der
    assert await handshake(proxy, "secure", ctx, "x.b.test") == b.der  # wildcard
    assert await handshake(proxy, "secure", ctx, "X.B.TEST") == b.der  # names are caseless
    assert await handshake(proxy, "secure", ctx, "c.test") == c.der
    lax = trusting(ca)
    lax.check_hostname = False
    assert await handshake(proxy, "secure", lax, "y.x.b.test") == a.der  # one label only
    assert await handshake(proxy, "secure", lax, "unknown.test") == a.der  # default: the first
    assert await handshake(proxy, "secure", ctx, None) == a.der  # no SNI (an IP): the first
    # The request goes through whichever certificate was served.
    assert await get(proxy, "secure", ctx, "/whoami", sni="x.b.test") == (200, b"A")

    # A renewed third certificate, same paths: a reload serves it to new handshakes.
    Path(live_c["cert"]).write_bytes(Path(c2.cert).read_bytes())
    Path(live_c["key"]).write_bytes(Path(c2.key).read_bytes())
    result = await proxy.reload("test")
    assert (result.ok, result.changed) == (True, True)
    assert await handshake(proxy, "secure", ctx, "c.test") == c2.der
    assert await handshake(proxy, "secure", ctx, "x.b.test") == b.der


# ------------------------------------------------------------------------------ policies

POLICY_NAMES = (
    "tls_cipher_policy_1_0",
    "tls_cipher_policy_1_1",
    "tls_cipher_policy_1_2",
    "tls_cipher_policy_1_2_strict",
    "tls_cipher_policy_1_2_strict_with_1_3",
)
V = ssl.TLSVersion
# client offer -> the listeners that accept it ("default": no policy key).
PROBES: list[tuple[str, V, str | None, set[str]]] = [
    ("TLS 1.0", V.TLSv1, None, {"tls_cipher_policy_1_0"}),
    ("TLS 1.1", V.TLSv1_1, None, {"tls_cipher_policy_1_0", "tls_cipher_policy_1_1"}),
    (
        "TLS 1.2 static RSA",
        V.TLSv1_2,
        "AES128-GCM-SHA256",
        {"tls_cipher_policy_1_0", "tls_cipher_policy_1_1", "tls_cipher_policy_1_2"},
    ),
    ("TLS 1.2 ECDHE CBC SHA-1", V.TLSv1_2, "ECDHE-RSA-AES128-SHA", set(POLICY_NAMES)),
    ("TLS 1.2 ECDHE GCM", V.TLSv1_2, "ECDHE-RSA-AES256-GCM-SHA384", {*POLICY_NAMES, "default"}),
    ("TLS 1.3", V.TLSv1_3, None, {"tls_cipher_policy_1_2_strict_with_1_3", "default"}),
]


def offering(version: V, cipher: str | None) -> ssl.SSLContext:
    """A client that offers exactly ``version`` (and ``cipher`` if given)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers(f"{cipher or 'DEFAULT'}:@SECLEVEL=0")
    return ctx


async def test_each_policy_accepts_what_it_lists_and_refuses_the_rest(
    make_backend, make_proxy, pki, tmp_path
):
    backend = await make_backend("A")
    rsa = pair(pki["rsa"])  # static RSA key exchange needs an RSA certificate
    listeners = [https(name, {**rsa, "policy": name}) for name in POLICY_NAMES]
    listeners.append(https("default", rsa))
    proxy = await start(make_proxy, tmp_path, backend.address, *listeners)
    names = [lst["name"] for lst in listeners]
    refused = dict.fromkeys(names, 0)
    for what, version, cipher, accepted in PROBES:
        for name in names:
            a = proxy.listeners.address(name)
            ctx = offering(version, cipher)
            if name in accepted:
                reader, writer = await asyncio.open_connection(a.host, a.port, ssl=ctx)
                so = writer.get_extra_info("ssl_object")
                assert (
                    so.version()
                    == {
                        V.TLSv1: "TLSv1",
                        V.TLSv1_1: "TLSv1.1",
                        V.TLSv1_2: "TLSv1.2",
                        V.TLSv1_3: "TLSv1.3",
                    }[version]
                ), (what, name)
                if cipher is not None:
                    assert so.cipher()[0] == cipher, (what, name)
                writer.write(b"GET /whoami HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                assert (await read_response(reader)).body == b"A", (what, name)
                writer.close()
            else:
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    await asyncio.open_connection(a.host, a.port, ssl=ctx)
                refused[name] += 1
    stats = proxy.registry.listeners
    await wait_for(
        lambda: all(stats[n].tls_failures["protocol"] == refused[n] for n in names),
        what=f"protocol failures counted: {refused}",
    )
    assert refused == {
        "tls_cipher_policy_1_0": 1,  # TLS 1.3
        "tls_cipher_policy_1_1": 2,  # TLS 1.0, 1.3
        "tls_cipher_policy_1_2": 3,  # TLS 1.0, 1.1, 1.3
        "tls_cipher_policy_1_2_strict": 4,  # TLS 1.0, 1.1, 1.3, static RSA
        "tls_cipher_policy_1_2_strict_with_1_3": 3,  # TLS 1.0, 1.1, static RSA
        "default": 4,  # TLS 1.0, 1.1, static RSA, CBC with SHA-1
    }


# ------------------------------------------------------------------------------ mutual TLS


async def refused_handshake(proxy: Proxy, listener: str, ctx: ssl.SSLContext, sni: str) -> None:
    """The client's handshake fails. Under TLS 1.3 the client finishes its side before the
    server has checked the certificate: then the refusal shows as the connection ending
    before any answer."""
    a = proxy.listeners.address(listener)
    try:
        reader, writer = await asyncio.open_connection(a.host, a.port, ssl=ctx, server_hostname=sni)
    except (ssl.SSLError, ConnectionError):
        return
    try:
        writer.write(b"GET /whoami HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert await reader.read() == b""
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.close()


async def test_mutual_tls_required(make_backend, make_proxy, pki, tmp_path):
    backend = await make_backend("A")
    a, b, ca, alice, mallory = pki["a"], pki["b"], pki["ca"], pki["alice"], pki["mallory"]
    tls = {"certificates": [pair(a), pair(b)], "client_ca": ca.cert}  # client_auth: required
    proxy = await start(make_proxy, tmp_path, backend.address, https("secure", tls))
    fingerprint = hashlib.sha256(alice.der).hexdigest()

    # A verified client: its subject and fingerprint reach the backend, whatever it claims.
    status, body = await get(
        proxy,
        "secure",
        trusting(ca, alice),
        "/headers",
        b"X-Client-Cert-Subject: CN=root",
        b"X-Client-Cert-Fingerprint: 00",
        sni="a.test",
    )
    assert status == 200
    seen = seen_headers(body)
    assert seen["x-client-cert-subject"] == ["O=Acme,CN=alice"]
    assert seen["x-client-cert-fingerprint"] == [fingerprint]
    # The certificate chosen by SNI asks for the client certificate just the same.
    status, body = await get(proxy, "secure", trusting(ca, alice), "/headers", sni="x.b.test")
    assert status == 200 and seen_headers(body)["x-client-cert-fingerprint"] == [fingerprint]

    # No certificate, or one from another CA: the handshake fails, on either certificate.
    before = len(backend.requests)
    for client, sni in ((None, "a.test"), (mallory, "a.test"), (None, "x.b.test")):
        await refused_handshake(proxy, "secure", trusting(ca, client), sni)
    stats = proxy.registry.listeners["secure"]
    await wait_for(lambda: stats.tls_failures["client_certificate"] == 3)
    assert len(backend.requests) == before
    reg = CollectorRegistry()
    reg.register(metric_families.Collector(proxy.registry))
    text = generate_latest(reg).decode()
    assert (
        'lbproxy_tls_handshake_failures_total{listener="secure",reason="client_certificate"} 3.0'
        in text
    )

    # WSS through the listener: the upgrade carries the client's identity too.
    async with (
        aiohttp.ClientSession() as s,
        s.ws_connect(
            f"wss://{proxy.listeners.address('secure')}/ws", ssl=trusting(ca, alice)
        ) as ws,
    ):
        await ws.send_str("hello mtls")
        assert (await ws.receive()).data == "hello mtls"
        big = bytes(range(256)) * 4096
        await ws.send_bytes(big)
        assert (await ws.receive(timeout=10)).data == big
    _, path, upgrade_headers = backend.requests[-1]
    assert path == "/ws"
    assert upgrade_headers["X-Client-Cert-Fingerprint"] == fingerprint


async def test_mutual_tls_optional_and_headers_never_spoofable(
    make_backend, make_proxy, pki, tmp_path
):
    backend = await make_backend("A")
    a, ca, alice, mallory = pki["a"], pki["ca"], pki["alice"], pki["mallory"]
    proxy = await start(
        make_proxy,
        tmp_path,
        backend.address,
        https("optional", {**pair(a), "client_ca": ca.cert, "client_auth": "optional"}),
        https("plain-tls", pair(a)),
        {"name": "web", "bind": "127.0.0.1:0", "server_group": "rs1"},
        {"name": "raw", "bind": "127.0.0.1:0", "server_group": "rs1", "x_forwarded_for": False},
    )
    spoof = (b"X-Client-Cert-Subject: CN=root", b"x-client-cert-fingerprint: 00")

    # Optional: a client with a verified certificate is named to the backend...
    status, body = await get(proxy, "optional", trusting(ca, alice), "/headers", *spoof)
    seen = seen_headers(body)
    assert (status, seen["x-client-cert-subject"]) == (200, ["O=Acme,CN=alice"])
    assert seen["x-client-cert-fingerprint"] == [hashlib.sha256(alice.der).hexdigest()]
    # ... one without a certificate is served, and nothing it claims reaches the backend ...
    status, body = await get(proxy, "optional", trusting(ca), "/headers", *spoof)
    seen = seen_headers(body)
    assert status == 200 and "x-client-cert-subject" not in seen
    assert "x-client-cert-fingerprint" not in seen
    # ... and one with a certificate that does not verify is refused (as nginx's optional).
    await refused_handshake(proxy, "optional", trusting(ca, mallory), "a.test")
    stats = proxy.registry.listeners["optional"]
    await wait_for(lambda: stats.tls_failures["client_certificate"] == 1)

    # Every other listener removes them too: TLS without client_auth, plain HTTP, and a
    # listener that passes X-Forwarded-* through untouched.
    for name, ctx in (("plain-tls", trusting(ca, alice)), ("web", None), ("raw", None)):
        status, body = await get(proxy, name, ctx, "/headers", *spoof)
        seen = seen_headers(body)
        assert status == 200, name
        assert "x-client-cert-subject" not in seen and "x-client-cert-fingerprint" not in seen


async def test_a_reload_applies_a_new_policy_and_client_auth_to_new_connections(
    make_backend, make_proxy, pki, tmp_path
):
    backend = await make_backend("A")
    a, ca, alice = pki["a"], pki["ca"], pki["alice"]
    proxy = await start(make_proxy, tmp_path, backend.address, https("secure", pair(a)))
    tls13 = offering(V.TLSv1_3, None)
    assert await get(proxy, "secure", tls13, "/whoami") == (200, b"A")
    addr = proxy.listeners.address("secure")
    reader, writer = await asyncio.open_connection(
        addr.host, addr.port, ssl=offering(V.TLSv1_3, None)
    )

    doc = yaml.safe_load((tmp_path / "lb.yaml").read_text())
    doc["listeners"][0]["tls"].update(policy="tls_cipher_policy_1_2", client_ca=ca.cert)
    (tmp_path / "lb.yaml").write_text(yaml.safe_dump(doc))
    result = await proxy.reload("test")
    assert (result.ok, result.message) == (True, "listeners changed: secure")

    with pytest.raises((ssl.SSLError, ConnectionError)):  # TLS 1.3 is no longer spoken
        await asyncio.open_connection(addr.host, addr.port, ssl=offering(V.TLSv1_3, None))
    await refused_handshake(proxy, "secure", offering(V.TLSv1_2, None), "a.test")  # no cert
    stats = proxy.registry.listeners["secure"]
    await wait_for(lambda: stats.tls_failures["client_certificate"] == 1)
    assert stats.tls_failures["protocol"] == 1  # the TLS 1.3 client
    status, body = await get(proxy, "secure", trusting(ca, alice), "/headers", sni="a.test")
    assert status == 200 and seen_headers(body)["x-client-cert-subject"] == ["O=Acme,CN=alice"]
    # The connection opened before the reload goes on with what it started with.
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert (await read_response(reader)).body == b"A"
    assert writer.get_extra_info("ssl_object").version() == "TLSv1.3"
    writer.close()
