"""Certificates renewed on disk are picked up without a reload (issue 14): the file watcher
watches the TLS files of the running config as it watches the config file.

A certificate manager rewrites the certificate, then the key: the watcher must not load the
new certificate with the old key (a failed reload), but wait for the pair to settle.
"""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
import pytest

from lbproxy.control.reload import FileWatcher
from tests.hardening import make_cert, openssl_available
from tests.integration.test_tls import (
    base,
    client_context,
    der,
    https_doc,
    peer_cert,
    start_from_file,
)
from tests.support import wait_for


async def test_a_certificate_renewed_in_place_is_used_without_a_reload(
    make_backend, make_proxy, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lbproxy")
    openssl_available()
    one = make_cert(str(tmp_path), "one")
    two = make_cert(str(tmp_path), "two")
    a = await make_backend("A")
    cert, key = tmp_path / "live-cert.pem", tmp_path / "live-key.pem"
    cert.write_bytes(Path(one[0]).read_bytes())
    key.write_bytes(Path(one[1]).read_bytes())
    doc = https_doc(a.address, "live-cert.pem", "live-key.pem")
    proxy = await start_from_file(make_proxy, tmp_path / "lb.yaml", doc)
    watcher = FileWatcher(proxy, interval=0.5)
    watcher.start()
    try:
        assert await peer_cert(proxy) == der(one[0])
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(f"{base(proxy, 'wss')}/ws", ssl=client_context(one[0]))
            # The manager writes the certificate first...
            cert.write_bytes(Path(two[0]).read_bytes())
            await wait_for(
                lambda: "TLS file changed" in caplog.text, 5, "the watcher to see the certificate"
            )
            # ...then the key, a moment later.
            key.write_bytes(Path(two[1]).read_bytes())
            await wait_for(lambda: proxy.registry.reloads.success == 1, 5, "one reload")
            assert await peer_cert(proxy) == der(two[0])
            async with s.get(f"{base(proxy)}/whoami", ssl=client_context(two[0])) as r:
                assert await r.text() == "A"
            await ws.send_str("after")  # an open WSS tunnel goes on
            assert (await ws.receive()).data == "after"
            await ws.close()
        assert proxy.registry.reloads.failure == 0  # never the new certificate with the old key
        assert "reload (certificate change): applied: listeners changed: secure" in caplog.text
    finally:
        await watcher.close()
