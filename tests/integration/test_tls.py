"""TLS listeners through a live proxy (issue 9), with self-signed certificates made by the
``openssl`` CLI for each test.

- ``protocol: https`` serves HTTPS and WSS end to end (the WebSocket hand-over moves the TLS
  transport to the tunnel) and tells backends ``X-Forwarded-Proto: https``;
- a reload re-reads the certificate: new connections see the new one while an open WSS
  tunnel goes on; a reload with a broken certificate changes nothing;
- a client that does not finish its TLS handshake within client_header_timeout is dropped,
  and one speaking plain HTTP to the TLS port harms nothing (both counted by reason);
- the ACL refuses a client before its handshake costs anything;
- ``redirect_https`` answers 301 to ``https://<the Host the client used>:<port><target>``.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from cryptography import x509
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.control.app import Proxy
from lbproxy.control.loading import load_config
from lbproxy.control.metric_families import Collector
from tests.hardening import closed_without_answer, exchange, make_cert, openssl_available
from tests.support import free_port, read_response, wait_for


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    openssl_available()
    d = tmp_path_factory.mktemp("certs")
    # "two" lives a day longer: a renewal, as lbproxy_tls_certificate_expiry_... sees it
    return {name: make_cert(str(d), name, days=days) for name, days in (("one", 2), ("two", 3))}


def client_context(*cafiles: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for cafile in cafiles:
        ctx.load_verify_locations(cafile)
    return ctx


def der(cert_path: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(Path(cert_path).read_text())


def https_doc(backend: str, cert: str, key: str, **listener: object) -> dict:
    return {
        "listeners": [
            {
                "name": "secure",
                "bind": "127.0.0.1:0",
                "protocol": "https",
                "server_group": "rs1",
                "tls": {"cert": cert, "key": key},
                **listener,
            }
        ],
        "server_groups": {"rs1": {"servers": [backend], "health_check": {"enabled": False}}},
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }


async def start_from_file(make_proxy, path: Path, doc: dict) -> Proxy:
    path.write_text(yaml.safe_dump(doc))
    proxy: Proxy = await make_proxy(load_config(str(path)), str(path))
    return proxy


def base(proxy: Proxy, scheme: str = "https", listener: str = "secure") -> str:
    return f"{scheme}://{proxy.listeners.address(listener)}"


async def peer_cert(proxy: Proxy) -> bytes:
    """The DER certificate a new TLS connection to the proxy is shown."""
    a = proxy.listeners.address("secure")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    _, writer = await asyncio.open_connection(a.host, a.port, ssl=ctx)
    try:
        cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert cert is not None
        return bytes(cert)
    finally:
        writer.close()


async def test_https_and_wss_end_to_end(make_backend, make_proxy, certs, tmp_path, caplog):
    a = await make_backend("A")
    cert, key = certs["one"]
    proxy = await start_from_file(make_proxy, tmp_path / "lb.yaml", https_doc(a.address, cert, key))
    ctx = client_context(cert)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base(proxy)}/whoami", ssl=ctx) as r:
            assert (r.status, await r.text()) == (200, "A")
        async with s.get(f"{base(proxy)}/headers", ssl=ctx) as r:
            seen = {k.lower(): v for k, v in (await r.json())["headers"]}
        assert seen["x-forwarded-proto"] == "https"
        async with s.post(f"{base(proxy)}/upload", data=b"u" * 3_000_000, ssl=ctx) as r:
            assert (await r.json())["bytes"] == 3_000_000
        async with s.ws_connect(f"{base(proxy, 'wss')}/ws", ssl=ctx, max_msg_size=0) as ws:
            await ws.send_str("hello over tls")
            assert (await ws.receive()).data == "hello over tls"
            big = bytes(range(256)) * 16384  # 4 MiB in one frame, both ways through TLS
            await ws.send_bytes(big)
            assert (await ws.receive(timeout=10)).data == big
            await ws.send_str("close:4001")
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4001
    tunnels = proxy.registry.servers[f"rs1/{a.address}"].ws_total
    assert tunnels == {"secure": 1}
    await wait_for(lambda: proxy.registry.listeners["secure"].ws_closes["server"] == 1)
    # No half-close asked of a TLS transport (asyncio warns: it cannot do one).
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()]


def expiries(proxy: Proxy) -> dict[tuple[str, str], float]:
    """lbproxy_tls_certificate_expiry_timestamp_seconds as /metrics renders it."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(Collector(proxy.registry))
    (family,) = [
        f
        for f in text_string_to_metric_families(generate_latest(reg).decode())
        if f.name == "lbproxy_tls_certificate_expiry_timestamp_seconds"
    ]
    return {(s.labels["listener"], s.labels["certificate"]): s.value for s in family.samples}


def not_after(cert_path: str) -> float:
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    return cert.not_valid_after_utc.timestamp()


async def test_reload_rereads_the_certificate_and_keeps_open_tunnels(
    make_backend, make_proxy, certs, tmp_path
):
    a = await make_backend("A")
    live_cert, live_key = str(tmp_path / "live-cert.pem"), str(tmp_path / "live-key.pem")
    one, two = certs["one"], certs["two"]
    Path(live_cert).write_bytes(Path(one[0]).read_bytes())
    Path(live_key).write_bytes(Path(one[1]).read_bytes())
    proxy = await start_from_file(
        make_proxy, tmp_path / "lb.yaml", https_doc(a.address, "live-cert.pem", "live-key.pem")
    )
    assert await peer_cert(proxy) == der(one[0])
    assert expiries(proxy) == {("secure", live_cert): not_after(one[0])}
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(f"{base(proxy, 'wss')}/ws", ssl=client_context(one[0]))
        await ws.send_str("before")
        assert (await ws.receive()).data == "before"

        # The renewed certificate: same paths, same YAML, new files.
        Path(live_cert).write_bytes(Path(two[0]).read_bytes())
        Path(live_key).write_bytes(Path(two[1]).read_bytes())
        result = await proxy.reload("test")
        assert (result.ok, result.changed) == (True, True)
        assert result.message == "listeners changed: secure"
        assert await peer_cert(proxy) == der(two[0])
        # The renewed certificate's expiry, from the reload on.
        assert expiries(proxy) == {("secure", live_cert): not_after(two[0])}
        assert not_after(two[0]) != not_after(one[0])
        async with s.get(f"{base(proxy)}/whoami", ssl=client_context(two[0])) as r:
            assert await r.text() == "A"
        await ws.send_str("after")  # the tunnel made with the old certificate goes on
        assert (await ws.receive()).data == "after"

        # A broken certificate: the reload fails and the running one stays.
        Path(live_cert).write_text("not a certificate\n")
        result = await proxy.reload("test")
        assert not result.ok
        assert result.problems == (
            f"{tmp_path / 'lb.yaml'}:10: listeners[0].tls: certificate {live_cert} is not a PEM"
            " certificate",
        )
        assert await peer_cert(proxy) == der(two[0])
        await ws.send_str("still")
        assert (await ws.receive()).data == "still"
        await ws.close()


async def test_unfinished_handshake_is_dropped_at_client_header_timeout(
    make_backend, make_proxy, certs, tmp_path
):
    a = await make_backend("A")
    cert, key = certs["one"]
    proxy = await start_from_file(
        make_proxy,
        tmp_path / "lb.yaml",
        https_doc(a.address, cert, key, client_header_timeout="300ms"),
    )
    addr = proxy.listeners.address("secure")
    # Before the connect: the proxy (in this loop) may accept, and start its clock, before
    # open_connection returns here.
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    assert await closed_without_answer(reader, 10)  # no ClientHello: no handshake
    # Not before the 300 ms; the upper bound is a hang guard (the idle timeout is 60 s).
    assert 0.28 <= time.monotonic() - started < 0.3 + 8
    writer.close()

    stats = proxy.registry.listeners["secure"]
    await wait_for(lambda: stats.tls_failures["timeout"] == 1)

    resp, raw = await exchange(addr.host, addr.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert resp is None or not raw.startswith(b"HTTP/1.1 200")  # plain HTTP gets nowhere
    await wait_for(lambda: stats.tls_failures["other"] == 1)
    assert stats.tls_failures == {
        "client_certificate": 0,
        "protocol": 0,
        "timeout": 1,
        "other": 1,
    }
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{base(proxy)}/whoami", ssl=client_context(cert)) as r,
    ):
        assert await r.text() == "A"


async def test_acl_refuses_before_the_handshake(make_backend, make_proxy, certs, tmp_path):
    a = await make_backend("A")
    cert, key = certs["one"]
    proxy = await start_from_file(
        make_proxy,
        tmp_path / "lb.yaml",
        https_doc(a.address, cert, key, acl={"mode": "deny", "cidrs": ["127.0.0.1"]}),
    )
    addr = proxy.listeners.address("secure")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection(addr.host, addr.port, ssl=client_context(cert))
    stats = proxy.registry.listeners["secure"]
    assert stats.connections_refused["acl"] == 1
    assert stats.connections_total == 0


async def test_redirect_https(make_backend, make_proxy, certs, tmp_path):
    a = await make_backend("A")
    cert, key = certs["one"]
    tls_port = free_port()
    doc = https_doc(a.address, cert, key, bind=f"127.0.0.1:{tls_port}")
    doc["listeners"].append(
        {
            "name": "web",
            "bind": "127.0.0.1:0",
            "server_group": "rs1",
            "redirect_https": tls_port,
        }
    )
    proxy = await start_from_file(make_proxy, tmp_path / "lb.yaml", doc)
    web = proxy.listeners.address("web")

    async def location(raw: bytes) -> str | None:
        resp, _ = await exchange(web.host, web.port, raw)
        assert resp is not None and resp.status == 301
        assert resp.header("Connection") == "close"
        return resp.header("Location")

    assert (
        await location(b"GET /a/b?c=1 HTTP/1.1\r\nHost: www.example:8080\r\n\r\n")
        == f"https://www.example:{tls_port}/a/b?c=1"
    )
    assert (
        await location(b"POST /form HTTP/1.1\r\nHost: [::1]\r\nContent-Length: 3\r\n\r\nabc")
        == f"https://[::1]:{tls_port}/form"
    )
    assert (
        await location(b"GET http://abs.example/x HTTP/1.1\r\nHost: other\r\n\r\n")
        == f"https://abs.example:{tls_port}/x"
    )
    assert await location(b"GET /old HTTP/1.0\r\n\r\n") == f"https://127.0.0.1:{tls_port}/old"
    assert a.requests == []  # a redirect never reaches a backend

    async with (  # a client following it lands on https
        aiohttp.ClientSession() as s,
        s.get(f"http://{web}/whoami", ssl=client_context(cert)) as r,
    ):
        assert (r.status, await r.text()) == (200, "A")
        assert str(r.url) == f"https://127.0.0.1:{tls_port}/whoami"
        assert [h.status for h in r.history] == [301]


async def test_plain_listener_answers_http_not_tls(make_backend, make_proxy):
    """A config without TLS keeps plain HTTP (the accept path is shared)."""
    a = await make_backend("A")
    proxy = await make_proxy(
        {
            "listeners": [{"name": "web", "bind": "127.0.0.1:0", "server_group": "rs1"}],
            "server_groups": {"rs1": {"servers": [a.address], "health_check": {"enabled": False}}},
            "admin": {"bind": "127.0.0.1:0"},
            "access_log": {"enabled": False},
        }
    )
    addr = proxy.listeners.address("web")
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert (await read_response(reader)).body == b"A"
    writer.close()
