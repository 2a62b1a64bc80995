"""IPv6 listeners and backends (issue 14) get the coverage IPv4 has: HTTP through a listener
on ``[::]`` and on ``[::1]`` to a backend on ``[::1]``, the access log's client address,
X-Forwarded-For / X-Real-IP / X-Forwarded-Host, health checks, and a WebSocket tunnel.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from lbproxy.control.app import Proxy
from tests.support import config_doc, wait_for


def v6_url(proxy: Proxy, path: str) -> str:
    port = proxy.listeners.address("web").port
    return f"http://[::1]:{port}{path}"


@pytest.mark.parametrize("bind", ["[::]:0", "[::1]:0"])
async def test_ipv6_listener_and_backend_http_ws_and_access_log(
    make_backend, make_proxy, tmp_path: Path, bind: str
) -> None:
    b = await make_backend("V6", host="::1")
    assert b.address.startswith("[::1]:")
    log = tmp_path / "access.log"
    doc = config_doc([b.address], listener={"bind": bind})
    doc["access_log"] = {"enabled": True, "format": "json", "path": str(log)}
    proxy = await make_proxy(doc)  # waits for the backend's first health check over IPv6
    server = proxy.snapshot.groups["rs1"].servers[0]
    assert server.id == f"rs1/{b.address}" and server.health.available

    async with aiohttp.ClientSession() as s:
        async with s.get(
            v6_url(proxy, "/headers"), headers={"X-Forwarded-For": "2001:db8::7"}
        ) as r:
            assert r.status == 200
            seen = {k.lower(): v for k, v in (await r.json())["headers"]}
        assert seen["x-forwarded-for"] == "2001:db8::7, ::1"
        assert seen["x-real-ip"] == "::1"
        port = proxy.listeners.address("web").port
        assert seen["x-forwarded-host"] == f"[::1]:{port}"
        async with s.ws_connect(v6_url(proxy, "/ws").replace("http", "ws")) as ws:
            await ws.send_str("whoami")
            assert (await ws.receive()).data == "V6"
            await ws.send_bytes(b"\x00" * 100_000)
            assert (await ws.receive()).data == b"\x00" * 100_000
    assert proxy.registry.servers[server.id].ws_total == {"web": 1}

    def lines() -> list[dict[str, object]]:
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    await wait_for(lambda: len(lines()) == 2, what="a line for the request and the tunnel")
    http, tunnel = lines()
    assert http["type"] == "http" and tunnel["type"] == "websocket"
    for line in (http, tunnel):
        assert str(line["client"]).startswith("[::1]:")  # as IPv4's 127.0.0.1:port
        assert line["server"] == b.address
