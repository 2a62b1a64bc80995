"""TLS from the proxy to its backends (``server_groups.<name>.tls``, issue 26): aiohttp
backends served over TLS with a test CA. Requests, a WebSocket echo (wss to the backend) and
health checks go through TLS; sessions are resumed on new connections; a wrong CA or name
fails the connect (502, counted, passive health); mutual TLS is accepted and refused as
configured; a CA renewed on disk is picked up by the file watcher."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from lbproxy.control.loading import load_config
from lbproxy.control.reload import FileWatcher
from tests.pki import CA
from tests.support import NAME, Backend, backend_app, config_doc, proxy_url, wait_for

TLS_INFO = web.AppKey("tls_info", list)


def tls_app(name: str) -> web.Application:
    """The test backend, plus ``/tls``: what the backend saw of the TLS connection."""
    app = backend_app(name)
    app[TLS_INFO] = []

    async def info(request: web.Request) -> web.Response:
        obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        out: dict[str, Any] = {"tls": obj is not None}
        if obj is not None:
            out["resumed"] = obj.session_reused
            out["client_cert"] = bool(obj.getpeercert(binary_form=True))
            out["sni"] = app[TLS_INFO][-1] if app[TLS_INFO] else None
        return web.json_response(out)

    app.router.add_get("/tls", info)
    return app


async def tls_backend(
    name: str, cert: Any, client_ca: str | None = None, max_version: Any = None
) -> Backend:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert, cert.key)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    if max_version is not None:
        ctx.maximum_version = max_version
    b = Backend(tls_app(name))
    names = b.app[TLS_INFO]  # the SNI of every handshake

    def sni(_obj: ssl.SSLObject, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(server_name)

    ctx.sni_callback = sni
    b.runner = web.AppRunner(b.app, handle_signals=False, shutdown_timeout=0.1)
    await b.runner.setup()
    site = web.TCPSite(b.runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    b.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return b


@pytest.fixture
async def backends():
    started: list[Backend] = []
    yield started
    for b in started:
        await b.stop()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = CA(str(tmp_path), "Backend CA")
    other = CA(str(tmp_path), "Other CA")
    return {
        "ca": ca,
        "other": other,
        "server": ca.issue("backend", "backend.test", dns=("backend.test",), ips=("127.0.0.1",)),
        "client": ca.issue("lb-client", "lbproxy", client=True),
    }


async def test_requests_websocket_and_checks_over_tls_with_sessions_resumed(
    make_proxy, backends, pki
) -> None:
    b = await tls_backend("A", pki["server"])
    backends.append(b)
    doc = config_doc(
        [b.address],
        group={"tls": {"ca": pki["ca"].cert, "server_name": "backend.test"}},
    )
    doc["server_groups"]["rs1"]["keepalive_connections"] = 0  # a new connection each time
    proxy = await make_proxy(doc)  # waits for the health checks: they pass over TLS
    server = proxy.holder.current.groups["rs1"].servers[0]
    assert server.stats.health_checks["success"] >= 1
    assert any(path == "/health" for _, path, _ in b.requests)
    async with aiohttp.ClientSession() as s:
        seen = []
        for _ in range(3):
            async with s.get(proxy_url(proxy, path="/tls")) as r:
                assert r.status == 200
                seen.append(await r.json())
        assert all(x["tls"] and x["sni"] == "backend.test" for x in seen), seen
        assert not seen[0]["resumed"] or server.stats.health_checks["success"] >= 1
        assert seen[-1]["resumed"], seen  # a later new connection resumes the session
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
        await ws.send_str("over wss")
        assert (await ws.receive()).data == "over wss"
        await ws.close()
    assert not any(server.stats.tls_failures.values())


async def test_tls_connections_are_pooled(make_proxy, backends, pki) -> None:
    b = await tls_backend("A", pki["server"])
    backends.append(b)
    doc = config_doc(
        [b.address],
        group={
            "tls": {"ca": pki["ca"].cert, "server_name": "backend.test"},
            "health_check": {"enabled": False},
        },
    )
    proxy = await make_proxy(doc)
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.get(proxy_url(proxy, path="/whoami")) as r:
                assert r.status == 200
    assert b.app[TLS_INFO] == ["backend.test"]  # one handshake: the connection was reused


@pytest.mark.parametrize("wrong", ["ca", "name"])
async def test_a_wrong_ca_or_name_fails_the_connect(
    make_proxy, backends, pki, wrong: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lbproxy")
    b = await tls_backend("A", pki["server"])
    backends.append(b)
    tls = {"ca": pki["ca"].cert, "server_name": "backend.test"}
    if wrong == "ca":
        tls["ca"] = pki["other"].cert
    else:
        tls["server_name"] = "elsewhere.test"
    doc = config_doc([b.address], group={"tls": tls, "health_check": {"enabled": False}})
    proxy = await make_proxy(doc)
    server = proxy.holder.current.groups["rs1"].servers[0]
    async with aiohttp.ClientSession() as s, s.get(proxy_url(proxy, path="/whoami")) as r:
        assert r.status == 502
    assert server.stats.tls_failures["verify"] == 1
    assert server.stats.errors["connect"] == 1
    assert "TLS handshake failed: certificate verify failed" in caplog.text
    assert not [p for _, p, _ in b.requests]  # nothing reached the backend
    metrics = proxy.registry.servers[server.id].tls_failures
    assert metrics["verify"] == 1


async def test_health_checks_fail_over_a_wrong_ca(make_proxy, backends, pki) -> None:
    good = await tls_backend("A", pki["server"])
    backends.append(good)
    doc = config_doc(
        [good.address],
        group={"tls": {"ca": pki["other"].cert, "server_name": "backend.test"}},
    )
    doc["server_groups"]["rs1"]["health_check"]["unhealthy_threshold"] = 1
    from lbproxy.config import parse_config
    from lbproxy.control.app import Proxy

    proxy = Proxy(parse_config(doc))
    await proxy.start()
    try:
        server = proxy.holder.current.groups["rs1"].servers[0]
        await wait_for(lambda: server.stats.tls_failures["verify"] >= 1, what="a failed check")
        await wait_for(lambda: server.health.last_reason is not None, what="a check result")
        assert not server.health.available
        assert "TLS handshake failed: certificate verify failed" in str(server.health.last_reason)
    finally:
        await proxy.close(timeout=0.5)


@pytest.mark.parametrize("version", ["1.2", "1.3"])
async def test_mutual_tls_accepted_and_refused(make_proxy, backends, pki, version: str) -> None:
    """A backend that wants a client certificate gets the proxy's (``cert``, ``key``) and
    serves; without one it refuses. Under TLS 1.2 the refusal ends the handshake (a failed
    connect, counted in tls_failures); under TLS 1.3 the client's handshake is over before the
    server checks, so the refusal is the connection closing before any response: a 502 too."""
    top = ssl.TLSVersion.TLSv1_2 if version == "1.2" else ssl.TLSVersion.TLSv1_3
    b = await tls_backend("A", pki["server"], client_ca=pki["ca"].cert, max_version=top)
    backends.append(b)
    tls = {"ca": pki["ca"].cert, "server_name": "backend.test"}
    mtls = dict(tls, cert=pki["client"].cert, key=pki["client"].key)
    doc = config_doc([b.address], group={"tls": mtls})
    doc["server_groups"]["plain"] = {
        "servers": [b.address],
        "tls": tls,  # no client certificate: the backend refuses it
        "health_check": {"enabled": False},
    }
    doc["listeners"].append({"name": "nocert", "bind": "127.0.0.1:0", "server_group": "plain"})
    proxy = await make_proxy(doc)  # the checks with the certificate pass
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy_url(proxy, path="/tls")) as r:
            assert r.status == 200
            assert (await r.json())["client_cert"]
        async with s.get(proxy_url(proxy, "nocert", "/tls")) as r:
            assert r.status == 502
    refused = proxy.holder.current.groups["plain"].servers[0]
    if version == "1.2":
        assert refused.stats.tls_failures["reset"] == 1, refused.stats.tls_failures
    else:
        assert refused.stats.errors["reset"] == 1, refused.stats.errors
    assert [p for _, p, _ in b.requests if p == "/tls"] == ["/tls"]  # the refused one: none


async def test_a_ca_renewed_on_disk_is_picked_up(make_proxy, backends, pki, tmp_path: Path) -> None:
    b = await tls_backend("A", pki["server"])
    backends.append(b)
    live_ca = tmp_path / "live-ca.pem"
    live_ca.write_bytes(Path(pki["other"].cert).read_bytes())  # the wrong CA at first
    doc = config_doc(
        [b.address],
        group={
            "tls": {"ca": "live-ca.pem", "server_name": "backend.test"},
            "health_check": {"enabled": False},
        },
    )
    path = tmp_path / "lb.yaml"
    path.write_text(yaml.safe_dump(doc))
    proxy = await make_proxy(load_config(str(path)), str(path))
    watcher = FileWatcher(proxy, interval=0.2)
    watcher.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy_url(proxy, path="/whoami")) as r:
                assert r.status == 502
            live_ca.write_bytes(Path(pki["ca"].cert).read_bytes())
            await wait_for(lambda: proxy.registry.reloads.success == 1, 5, "one reload")
            async with s.get(proxy_url(proxy, path="/whoami")) as r:
                assert r.status == 200
                assert await r.text() == b.app[NAME]
    finally:
        await watcher.close()


async def test_verify_false_takes_any_certificate(make_proxy, backends, pki) -> None:
    """``verify: false``: encrypted, the certificate not checked; ``server_name`` still sent."""
    b = await tls_backend("A", pki["server"])
    backends.append(b)
    doc = config_doc([b.address], group={"tls": {"verify": False, "server_name": "x.test"}})
    proxy = await make_proxy(doc)
    async with aiohttp.ClientSession() as s, s.get(proxy_url(proxy, path="/tls")) as r:
        assert r.status == 200
        info = await r.json()
    assert info["tls"] and info["sni"] == "x.test"


async def test_a_failed_handshake_is_retried_on_another_server(make_proxy, backends, pki) -> None:
    """A server whose certificate does not verify is a failed connect: the request goes on to
    the next server (counted as a retry), and passive health takes the bad one out."""
    bad = await tls_backend("bad", pki["other"].issue("o", "backend.test", dns=("backend.test",)))
    good = await tls_backend("good", pki["server"])
    backends += [bad, good]
    doc = config_doc(
        [bad.address, good.address],
        group={
            "tls": {"ca": pki["ca"].cert, "server_name": "backend.test"},
            "health_check": {"enabled": False},
        },
    )
    proxy = await make_proxy(doc)
    servers = {s.label: s for s in proxy.holder.current.groups["rs1"].servers}
    async with aiohttp.ClientSession() as s:
        for _ in range(4):  # round-robin: the bad server's turn comes
            async with s.get(proxy_url(proxy, path="/whoami")) as r:
                assert r.status == 200 and await r.text() == "good"
    assert servers[bad.address].stats.tls_failures["verify"] >= 1
    assert proxy.registry.retries.get("rs1", 0) >= 1
