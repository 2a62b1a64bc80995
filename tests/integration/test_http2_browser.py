"""The chat page over HTTP/2 in headless Chromium through lbproxy (issue 15): the browser
reports ``h2`` for the page and its assets, and the page's WebSocket, which Chromium opens on
a separate HTTP/1.1 connection (lbproxy does not offer RFC 8441's extended CONNECT), works
across two backends. Fails (never skips) when no Chromium is installed."""

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
from tests.backends.cdp import Browser, find_chromium
from tests.hardening import make_cert, openssl_available
from tests.support import config_doc

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


async def test_chat_page_loads_over_http2_and_its_websocket_works(
    make_proxy, bus: MemoryBus, tmp_path: Path
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
    doc["listeners"][0].update(protocol="https", tls={"cert": cert, "key": key})
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
        # The pages came over HTTP/2 connections; the WebSockets live as tunnels that
        # started on HTTP/1.1 connections of the same listener.
        stats = proxy.registry.listeners["web"]
        assert stats.protocols.get("HTTP/2", 0) >= 2
        assert sum(s.ws_total.get("web", 0) for s in proxy.registry.servers.values()) == 2
        assert any(isinstance(c, Http2Connection) for c in proxy.connections())
    finally:
        await browser.close()
        await a.close()
        await b.close()
