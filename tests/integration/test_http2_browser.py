"""The chat page over HTTP/2 in headless Chromium through lbproxy (issue 15): the browser
reports ``h2`` for the page and its assets, and the page's WebSocket works across two
backends: with ``http2_websocket`` (issue 24) as an RFC 8441 stream of the page's HTTP/2
connection, without it on a separate HTTP/1.1 connection, as lbproxy's own counters and
access log show. Fails (never skips) when no Chromium is installed."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backends.chat.app import ChatServer
from backends.chat.bus import MemoryBus
from lbproxy.proxy.http2 import Http2Connection
from lbproxy.proxy.tunnel import Tunnel
from tests.backends.cdp import Browser, find_chromium
from tests.hardening import make_cert, openssl_available
from tests.support import config_doc, wait_for

pytestmark = pytest.mark.timeout(60)


def spki_hash(cert_path: str) -> str:
    """The base64 sha256 of the certificate's public key, for Chromium's
    --ignore-certificate-errors-spki-list (trust this one self-signed certificate only)."""
    pem = subprocess.run(
        [openssl_available(), "x509", "-pubkey", "-noout", "-in", cert_path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    # A "PUBLIC KEY" PEM is the base64 of the DER SubjectPublicKeyInfo.
    body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    spki = base64.b64decode(body)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    bus = MemoryBus()
    await bus.start()
    yield bus
    await bus.close()


@pytest.mark.parametrize("h2_websocket", [True, False], ids=["rfc8441", "http1-websocket"])
async def test_chat_page_loads_over_http2_and_its_websocket_works(
    make_proxy, bus: MemoryBus, tmp_path: Path, h2_websocket: bool
):
    openssl_available()
    cert, key = make_cert(str(tmp_path), "chat")
    binary = find_chromium()
    if binary is None:
        pytest.fail("chromium not found: install it with `apt-get install -y chromium`")
    a = ChatServer("ECS01", bus)
    b = ChatServer("ECS02", bus)
    await a.start()
    await b.start()
    doc = config_doc([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"])
    doc["listeners"][0].update(
        protocol="https", tls={"cert": cert, "key": key}, http2_websocket=h2_websocket
    )
    log_path = tmp_path / "access.log"
    doc["access_log"] = {"enabled": True, "format": "json", "path": str(log_path)}
    doc["server_groups"]["rs1"]["scheduler"] = "rr"
    proxy = await make_proxy(doc)
    addr = proxy.listeners.address("web")
    page_url = f"https://127.0.0.1:{addr.port}/"
    browser = Browser(
        binary,
        tmp_path / "profile",
        args=(f"--ignore-certificate-errors-spki-list={spki_hash(cert)}",),
    )
    try:
        await browser.start()
        alice = await browser.new_page(page_url)
        await alice.wait_for(
            "document.getElementById('status').textContent.startsWith('connected to ')"
        )
        bob = await browser.new_page(page_url)
        await bob.wait_for(
            "document.getElementById('status').textContent.startsWith('connected to ')"
        )
        protocols = await alice.eval(
            "[performance.getEntriesByType('navigation')[0].nextHopProtocol,"
            " ...performance.getEntriesByType('resource').map(e => e.nextHopProtocol)]"
        )
        assert protocols and set(protocols) == {"h2"}, protocols
        await alice.eval(
            f"""(() => {{
                document.getElementById('user').value = 'alice';
                document.getElementById('text').value = {json.dumps("hello over h2")};
                document.getElementById('composer').requestSubmit();
            }})()"""
        )
        await bob.wait_for("document.querySelectorAll('#messages li.msg').length === 1")
        text = await bob.eval("document.querySelector('#messages li.msg .text').textContent")
        assert text == "hello over h2"
        # The pages came over HTTP/2 connections. With http2_websocket the WebSockets are
        # streams of it (no HTTP/1.1 request at all: the upgrade would be one); without it,
        # tunnels that started on HTTP/1.1 connections of the same listener.
        stats = proxy.registry.listeners["web"]
        assert stats.protocols.get("HTTP/2", 0) >= 2
        assert sum(s.ws_total.get("web", 0) for s in proxy.registry.servers.values()) == 2
        assert any(isinstance(c, Http2Connection) for c in proxy.connections())
        live = [c.protocol for c in proxy.connections() if isinstance(c, Tunnel)]
        if h2_websocket:
            assert live == ["HTTP/2", "HTTP/2"]
            assert "HTTP/1.1" not in stats.protocols, stats.protocols
            h2_conns = [c for c in proxy.connections() if isinstance(c, Http2Connection)]
            # The pages' one HTTP/2 connection carries both WebSocket streams.
            assert sum(1 for c in h2_conns if any(s.carrier for s in c.streams.values())) == 1
        else:
            assert live == ["HTTP/1.1", "HTTP/1.1"]
            assert stats.protocols.get("HTTP/1.1") == 2  # the two upgrades
    finally:
        await browser.close()
        await a.close()
        await b.close()
    await wait_for(lambda: not any(isinstance(c, Tunnel) for c in proxy.connections()))
    proxy.access.close()
    lines = [json.loads(x) for x in log_path.read_text().splitlines()]
    ws = [(x["protocol"], x["status"]) for x in lines if x["type"] == "websocket"]
    assert ws == ([("HTTP/2", 200)] * 2 if h2_websocket else [("HTTP/1.1", 101)] * 2)
