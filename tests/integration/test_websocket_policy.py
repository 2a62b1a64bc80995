"""listeners[].websocket: message policies enforced on real tunnels (issues 16 and 19).

Real aiohttp clients and backends through the proxy: a client sending a message over
``max_message_size`` gets close 1009 and its server 1001; a client over the message rate gets
1008; server-to-client traffic is never limited; a well-behaved client on the same listener
goes on unaffected throughout. Under ``max_message_size`` permessage-deflate is never
negotiated (a message compressing to a few KB would pass a limit on frame lengths), while a
listener without one negotiates it end to end.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from lbproxy.config import parse_config
from tests.integration.test_access_log import wait_lines
from tests.integration.test_drain import CLOSES, RECEIVED, echo, ws_app
from tests.support import RawServer, config_doc, proxy_url, read_request_head, wait_for

NO_CHECKS = {"health_check": {"enabled": False}}


def policy_doc(servers: list[str], **policy: object) -> dict[str, object]:
    return config_doc(servers, listener={"websocket": policy}, group=NO_CHECKS)


async def test_too_big_gets_1009_and_its_server_1001(make_backend, make_proxy):
    a = await make_backend("A", app=ws_app)
    proxy = await make_proxy(policy_doc([a.address], max_message_size="1KiB"))
    async with aiohttp.ClientSession() as s:
        good = await s.ws_connect(proxy_url(proxy, path="/ws"))
        bad = await s.ws_connect(proxy_url(proxy, path="/ws"))
        assert await echo(bad, "x" * 1024) == "A:" + "x" * 1024  # exactly the limit passes
        await bad.send_str("y" * 1025)
        msg = await asyncio.wait_for(bad.receive(), 10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
        await bad.close()
        await wait_for(lambda: a.app[CLOSES] == [1001], what="the server to see 1001")
        assert await echo(good, "fine") == "A:fine"
        stats = proxy.registry.listener("web")
        assert stats.ws_policy == {
            "max_message_size": 1,
            "messages_per_second": 0,
            "extension": 0,
        }
        assert stats.ws_closes["policy"] == 1
        await good.close()


async def test_over_the_message_rate_gets_1008(make_backend, make_proxy):
    a = await make_backend("A", app=ws_app)
    proxy = await make_proxy(policy_doc([a.address], messages_per_second=2, burst=5))
    async with aiohttp.ClientSession() as s:
        good = await s.ws_connect(proxy_url(proxy, path="/ws"))
        flood = await s.ws_connect(proxy_url(proxy, path="/ws"))
        for i in range(50):  # far past the burst, faster than 2 per second
            await flood.send_str(f"m{i}")
        msg = await asyncio.wait_for(flood.receive(), 10)
        while msg.type == WSMsgType.TEXT:  # echoes that made it before the close
            msg = await asyncio.wait_for(flood.receive(), 10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1008)
        await flood.close()
        await wait_for(lambda: a.app[CLOSES] == [1001], what="the server to see 1001")
        # The burst reached the server (a refill of a token or two on a slow machine at
        # most), the rest did not.
        got = a.app[RECEIVED]
        assert 5 <= len(got) <= 8 and got == [f"m{i}" for i in range(len(got))]
        assert await echo(good, "calm") == "A:calm"
        assert proxy.registry.listener("web").ws_policy["messages_per_second"] == 1
        await good.close()


async def test_server_to_client_is_never_limited(make_backend, make_proxy):
    a = await make_backend("A")  # the default test backend echoes whatever it gets
    proxy = await make_proxy(policy_doc([a.address], max_message_size=100_000))
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
        await ws.send_str("x" * 100_000)
        msg = await ws.receive()
        assert msg.type == WSMsgType.TEXT and len(msg.data) == 100_000
        await ws.close()


async def test_a_reload_changes_the_policy_of_new_tunnels_only(make_backend, make_proxy):
    a = await make_backend("A", app=ws_app)
    doc = policy_doc([a.address], max_message_size=100)
    proxy = await make_proxy(doc)
    async with aiohttp.ClientSession() as s:
        old = await s.ws_connect(proxy_url(proxy, path="/ws"))
        doc["listeners"][0]["websocket"] = {"max_message_size": 1000}  # type: ignore[index]
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        new = await s.ws_connect(proxy_url(proxy, path="/ws"))
        assert await echo(new, "z" * 500) == "A:" + "z" * 500
        await old.send_str("z" * 500)  # the tunnel keeps the policy it started with
        msg = await asyncio.wait_for(old.receive(), 10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
        await old.close()
        await new.close()


# ------------------------------------------------------------------ permessage-deflate (RFC 7692)

OFFERS = web.AppKey("offers", list)
BIG = "a" * 4_000_000  # 4 MB that deflate makes a few KB (under aiohttp's 4 MiB message limit)


def deflate_app(name: str) -> web.Application:
    """A backend accepting permessage-deflate when offered; records each WebSocket's offer and
    what it negotiated, the lengths of the messages it received, its close code; echoes."""
    app = web.Application()
    app[OFFERS] = []
    app[RECEIVED] = []
    app[CLOSES] = []

    async def ws(request: web.Request) -> web.WebSocketResponse:
        resp = web.WebSocketResponse(compress=True)
        await resp.prepare(request)
        app[OFFERS].append((request.headers.get("Sec-WebSocket-Extensions"), resp.compress))
        async for msg in resp:
            if msg.type == WSMsgType.TEXT:
                app[RECEIVED].append(len(msg.data))
                await resp.send_str(msg.data)
        app[CLOSES].append(resp.close_code)
        return resp

    app.router.add_get("/ws", ws)
    return app


async def test_no_policy_negotiates_deflate_end_to_end(make_backend, make_proxy):
    a = await make_backend("A", app=deflate_app)
    proxy = await make_proxy(config_doc([a.address], group=NO_CHECKS))
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"), compress=15)
        assert ws.compress == 15
        await ws.send_str(BIG)
        msg = await asyncio.wait_for(ws.receive(), 30)
        assert msg.type == WSMsgType.TEXT and msg.data == BIG
        await ws.close()
    ((offer, negotiated),) = a.app[OFFERS]
    assert offer is not None and "permessage-deflate" in offer and negotiated == 15
    assert a.app[RECEIVED] == [len(BIG)]
    stats = proxy.registry.listener("web")
    await wait_for(lambda: stats.ws_closes["client"] == 1, what="the tunnel to close")
    assert stats.bytes_in < 100_000  # it crossed compressed, a few KiB for 4 MiB


async def test_max_message_size_holds_a_deflatable_message_to_its_size(
    make_backend, make_proxy, tmp_path: Path
):
    """The client offers deflate, the backend would accept it: the offer never reaches the
    backend, the 4 MiB goes as plain frames and gets 1009 before a byte of it passes."""
    a = await make_backend("A", app=deflate_app)
    doc = policy_doc([a.address], max_message_size="64KiB")
    log = tmp_path / "access.log"
    doc["access_log"] = {"enabled": True, "format": "json", "path": str(log)}
    proxy = await make_proxy(doc)
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"), compress=15)
        assert ws.compress == 0  # no extension negotiated: what the client sees
        assert await echo(ws, "hello") == "hello"
        await ws.send_str(BIG)
        msg = await asyncio.wait_for(ws.receive(), 30)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
        await ws.close()
    await wait_for(lambda: a.app[CLOSES] == [1001], what="the server to see 1001")
    assert a.app[OFFERS] == [(None, 0)]
    assert a.app[RECEIVED] == [5]  # "hello" only, nothing of the big one
    stats = proxy.registry.listener("web")
    assert stats.ws_policy == {"max_message_size": 1, "messages_per_second": 0, "extension": 0}
    assert stats.ws_closes["policy"] == 1
    assert stats.ws_close_codes[("proxy", "1009")] == 1
    (line,) = await wait_lines(log, 1)
    entry = json.loads(line)
    assert (entry["type"], entry["close_reason"], entry["close_code"]) == (
        "websocket",
        "policy",
        "1009",
    )
    assert entry["messages_in"] == 1


async def test_a_rate_only_policy_keeps_deflate(make_backend, make_proxy):
    a = await make_backend("A", app=deflate_app)
    proxy = await make_proxy(policy_doc([a.address], messages_per_second=100, burst=100))
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"), compress=15)
        assert ws.compress == 15
        assert await echo(ws, "z" * 100_000) == "z" * 100_000
        await ws.close()
    assert a.app[OFFERS][0][1] == 15


async def test_a_compressed_frame_nobody_negotiated_gets_1002(make_backend, make_proxy):
    """A client compressing anyway (RSV1 set) under max_message_size: a protocol error, the
    frame never reaches the server, counted as the policy's ``extension``."""
    a = await make_backend("A", app=deflate_app)
    proxy = await make_proxy(policy_doc([a.address], max_message_size="64KiB"))
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
        assert ws.compress == 0
        await ws.send_str("b" * 10_000, compress=15)  # a deflated frame, RSV1 set
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1002)
        await ws.close()
    await wait_for(lambda: a.app[CLOSES] == [1001], what="the server to see 1001")
    assert a.app[RECEIVED] == []
    stats = proxy.registry.listener("web")
    assert stats.ws_policy == {"max_message_size": 0, "messages_per_second": 0, "extension": 1}
    assert stats.ws_closes["policy"] == 1


def accept_key(key: str) -> str:
    magic = key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    return base64.b64encode(hashlib.sha1(magic).digest()).decode()


async def test_a_backend_accepting_deflate_unoffered_gets_502(make_proxy):
    """A backend answering 101 with permessage-deflate though the proxy dropped the offer
    (a protocol violation): no tunnel, the client gets 502, the backend a protocol error."""
    seen: list[dict[str, str]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, fields = await read_request_head(reader)
        head = {k.lower(): v for k, v in fields}
        seen.append(head)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_key(head["sec-websocket-key"]).encode() + b"\r\n"
            b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        )
        await writer.drain()
        await reader.read()  # until the proxy closes

    bad = await RawServer(handler).start()
    try:
        proxy = await make_proxy(policy_doc([bad.address], max_message_size="64KiB"))
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                await s.ws_connect(proxy_url(proxy, path="/ws"), compress=15)
        assert err.value.status == 502
        assert "sec-websocket-extensions" not in seen[0]
        assert proxy.registry.servers[f"rs1/{bad.address}"].errors["protocol"] == 1
        assert proxy.registry.listener("web").ws_closes == dict.fromkeys(
            proxy.registry.listener("web").ws_closes, 0
        )
    finally:
        await bad.stop()
