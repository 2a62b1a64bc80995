"""Draining: WebSockets moved off a server by the proxy itself, frame-safe and spread out;
the runtime server API (/-/servers); close frames at shutdown.

Real backends, real clients, real sockets. Timing windows are generous (a loaded 2-core
machine): spreads are asserted as lower bounds, deadlines with seconds of room.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from lbproxy.config import parse_config
from lbproxy.wire import wsframes
from tests.support import WS_UPGRADE, RawServer, config_doc, proxy_url, start_proxy, wait_for

NO_CHECKS = {"health_check": {"enabled": False}}
JSON = {"Content-Type": "application/json"}  # the admin refuses a write without it (415)
CLOSES = web.AppKey("closes", list)
CONNS = web.AppKey("conns", list)
RECEIVED = web.AppKey("received", list)


def ws_app(name: str) -> web.Application:
    """Echoes ``name:text``; records each WebSocket's close code and what it received, and
    each request's peer port."""
    app = web.Application()
    app[CLOSES] = []
    app[CONNS] = []
    app[RECEIVED] = []

    async def ws(request: web.Request) -> web.WebSocketResponse:
        resp = web.WebSocketResponse()
        await resp.prepare(request)
        async for msg in resp:
            if msg.type == WSMsgType.TEXT:
                app[RECEIVED].append(msg.data)
                await resp.send_str(f"{name}:{msg.data}")
        app[CLOSES].append(resp.close_code)
        return resp

    async def whoami(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        app[CONNS].append(peer[1] if peer else None)
        delay = float(request.query.get("sleep", "0"))
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text=name)

    app.router.add_get("/ws", ws)
    app.router.add_get("/whoami", whoami)
    return app


def doc_for(servers: list[str], **group: Any) -> dict[str, Any]:
    return config_doc(servers, group={**NO_CHECKS, **group})


async def echo(ws: aiohttp.ClientWebSocketResponse, text: str) -> str:
    await ws.send_str(text)
    msg = await ws.receive()
    assert msg.type == WSMsgType.TEXT, msg
    return str(msg.data)


# ------------------------------------------------------------------ drain of a removed server


async def test_removed_server_tunnels_get_1001_spread_over_drain_timeout(make_backend, make_proxy):
    a = await make_backend("A", app=ws_app)
    b = await make_backend("B", app=ws_app)
    window = 4.0
    doc = doc_for([a.address, b.address], drain_timeout=f"{window:g}s")
    proxy = await make_proxy(doc)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        tunnels = [await s.ws_connect(proxy_url(proxy, path="/ws")) for _ in range(40)]
        owners = [(await echo(ws, "hi")).split(":")[0] for ws in tunnels]
        assert owners.count("A") == owners.count("B") == 20
        on_a = [ws for ws, o in zip(tunnels, owners, strict=True) if o == "A"]
        on_b = [ws for ws, o in zip(tunnels, owners, strict=True) if o == "B"]

        closed_at: list[float] = []

        async def until_closed(ws: aiohttp.ClientWebSocketResponse) -> None:
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, wsframes.GOING_AWAY), msg
            closed_at.append(loop.time())
            await ws.close()

        waiters = [asyncio.ensure_future(until_closed(ws)) for ws in on_a]
        # Held from before the reload: the registry forgets a removed server's series once
        # its last connection has ended (the sweep, any time after the drain), the object
        # keeps its counts.
        a_stats = proxy.registry.servers[f"rs1/{a.address}"]
        doc["server_groups"]["rs1"]["servers"] = [{"address": b.address}]
        started = loop.time()
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        await asyncio.wait_for(asyncio.gather(*waiters), timeout=window + 10)
        # Within the window (with room for a loaded machine), and spread: never all at once.
        assert max(closed_at) - started < window + 3
        assert max(closed_at) - min(closed_at) >= window / 2
        # The server saw the proxy's close frame too, with the same code.
        await wait_for(lambda: len(a.app[CLOSES]) == 20, what="A to see 20 closes")
        assert a.app[CLOSES] == [wsframes.GOING_AWAY] * 20
        # B's tunnels were never touched.
        assert [await echo(ws, "still") for ws in on_b] == ["B:still"] * 20
        assert b.app[CLOSES] == []
        assert a_stats.ws_drained == 20
        assert proxy.registry.listener("web").ws_closes["drain"] == 20
        assert proxy.registry.listener("web").ws_close_codes[("proxy", "1001")] == 20
        for ws in on_b:
            await ws.close()


async def test_drain_close_code_1012_and_no_timeout_leaves_tunnels(make_backend, make_proxy):
    """drain_close_code chooses the code; without drain_timeout (the default) a removed
    server's tunnels go on until they end."""
    a = await make_backend("A", app=ws_app)
    b = await make_backend("B", app=ws_app)
    doc = doc_for([a.address, b.address])
    proxy = await make_proxy(doc)
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
        assert await echo(ws, "x") == "A:x"
        doc["server_groups"]["rs1"]["servers"] = [{"address": b.address}]
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        assert await echo(ws, "y") == "A:y"  # not drained: drain_timeout is 0
        ws2 = await s.ws_connect(proxy_url(proxy, path="/ws"))
        assert await echo(ws2, "z") == "B:z"  # new tunnels avoid the removed server
        # Now a drain window on the group (A is still open, removed): a reload that only
        # changes the group does not start a drain of A by itself ...
        doc["server_groups"]["rs1"].update(drain_timeout="200ms", drain_close_code=1012)
        doc["server_groups"]["rs1"]["servers"] = [{"address": a.address}, {"address": b.address}]
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        # ... removing it again does, with the group's code.
        doc["server_groups"]["rs1"]["servers"] = [{"address": b.address}]
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        msg = await asyncio.wait_for(ws.receive(), 10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, wsframes.SERVICE_RESTART)
        await ws.close()
        await wait_for(lambda: a.app[CLOSES] == [1012], what="A to see 1012")
        await ws2.close()


# ------------------------------------------------------------------ frame boundaries


async def test_close_frame_waits_for_the_frame_in_flight(make_proxy, make_admin):
    """A server writing a large fragmented message slowly: the client gets the proxy's close
    frame only after the frame being written, and nothing after it; the server gets its
    close at once (its direction was between frames)."""
    state: dict[str, Any] = {"got": bytearray()}
    got_close = asyncio.Event()
    finish = asyncio.Event()
    first = frame_bytes(1, b"a" * 1000, fin=False)
    second = frame_bytes(0, os.urandom(300_000), fin=False)
    third = frame_bytes(0, b"never", fin=True)

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept(key) + b"\r\n\r\n" + first + second[:50_000]
        )

        async def read_all() -> None:
            while data := await reader.read(65536):
                state["got"] += data
                if wsframes.parse_header(bytes(state["got"])) is not None:
                    got_close.set()

        reading = asyncio.ensure_future(read_all())
        await finish.wait()
        for i in range(50_000, len(second), 25_000):  # the rest of the frame, in pieces
            writer.write(second[i : i + 25_000])
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(third)
        await writer.drain()
        await reading
        writer.close()

    async with RawServer(backend) as srv:
        doc = doc_for([srv.address], drain_timeout="100ms")
        proxy = await make_proxy(doc)
        admin = await make_admin(proxy)
        addr = proxy.listeners.address("web")
        reader, writer = await asyncio.open_connection(addr.host, addr.port)
        writer.write(WS_UPGRADE)
        await reader.readuntil(b"\r\n\r\n")
        received = bytearray(await reader.readexactly(len(first) + 10_000))
        async with aiohttp.ClientSession() as s:
            url = f"http://{admin.address}/-/servers/rs1/{srv.address}"
            async with s.put(url, json={"admin_state": "drain"}) as r:
                assert r.status == 200
        await asyncio.wait_for(got_close.wait(), 10)  # the drain has fired
        h = wsframes.parse_header(bytes(state["got"]))
        assert h is not None and h.opcode == wsframes.OP_CLOSE and h.mask
        finish.set()
        to_client = wsframes.close_frame(1001, masked=False)
        want = first + second + to_client
        received += await asyncio.wait_for(reader.readexactly(len(want) - len(received)), 10)
        assert bytes(received) == want  # the whole frame, then the close, then nothing
        writer.write(wsframes.close_frame(1001, masked=True))  # the client's answer
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and the proxy closes
        writer.close()


def frame_bytes(opcode: int, payload: bytes, *, fin: bool) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 65536:
        return bytes((b0, 126)) + n.to_bytes(2, "big") + payload
    return bytes((b0, 127)) + n.to_bytes(8, "big") + payload


def accept(key: bytes) -> bytes:
    import base64
    import hashlib

    guid = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
    return base64.b64encode(hashlib.sha1(key + guid).digest())


# ------------------------------------------------------------------ shutdown


async def test_shutdown_sends_1001_both_ways(make_backend):
    a = await make_backend("A", app=ws_app)
    proxy = await start_proxy(doc_for([a.address]))
    async with aiohttp.ClientSession() as s:
        tunnels = [await s.ws_connect(proxy_url(proxy, path="/ws")) for _ in range(3)]
        for ws in tunnels:
            assert await echo(ws, "x") == "A:x"
        closing = asyncio.ensure_future(proxy.close(timeout=0.1))
        for ws in tunnels:
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, wsframes.GOING_AWAY)
            await ws.close()
        await closing
    await wait_for(lambda: a.app[CLOSES] == [1001] * 3, what="the server to see 1001s")
    assert proxy.registry.listener("web").ws_closes["shutdown"] == 3


# ------------------------------------------------------------------ the runtime API


async def test_runtime_api_drain_weight_and_reloads(make_backend, make_proxy, make_admin):
    a = await make_backend("A", app=ws_app)
    b = await make_backend("B", app=ws_app)
    doc = doc_for([a.address, b.address], scheduler="wrr")
    proxy = await make_proxy(doc)
    admin = await make_admin(proxy)
    base = f"http://{admin.address}/-/servers"
    async with aiohttp.ClientSession() as s:

        async def names(n: int) -> list[str]:
            out = []
            for _ in range(n):
                async with s.get(proxy_url(proxy, path="/whoami")) as r:
                    out.append(await r.text())
            return out

        async def put(path: str, body: Any, status: int = 200) -> Any:
            async with s.put(f"{base}/{path}", json=body) as r:
                assert r.status == status, await r.text()
                return await r.json()

        async with s.get(base) as r:
            listing = await r.json()
        assert [(x["group"], x["address"], x["admin_state"], x["weight"]) for x in listing] == [
            ("rs1", a.address, "ready", 100),
            ("rs1", b.address, "ready", 100),
        ]
        assert {"state", "draining", "active_connections", "websockets_active"} <= set(listing[0])

        ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
        assert await echo(ws, "t") == "A:t"
        view = await put(f"rs1/{a.address}", {"admin_state": "drain"})
        assert (view["admin_state"], view["draining"], view["websockets_active"]) == (
            "drain",
            True,
            1,
        )
        assert await names(4) == ["B"] * 4  # no new requests
        assert await echo(ws, "u") == "A:u"  # drain_timeout 0: the tunnel stays
        # Survives a reload that keeps the server (the file's weight changes, not the state).
        doc["server_groups"]["rs1"]["servers"][1]["weight"] = 50
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        assert await names(3) == ["B"] * 3
        view = await put(f"rs1/{a.address}", {"admin_state": "ready", "weight": 25})
        assert (view["admin_state"], view["weight"], view["config_weight"]) == ("ready", 25, 100)
        override = dict(view["override"])
        # Who set it (this instance: its host name) and when, with what was set.
        assert override.pop("set_by") == socket.gethostname()
        assert abs(override.pop("set_at") - time.time()) < 60
        assert override == {"admin_state": "ready", "weight": 25}
        got = await names(75)
        # wrr by the weights in force (1:2; smooth wrr may be one off where its cycle began)
        assert abs(got.count("A") - 25) <= 1
        # Weight 0 through the API is draining too.
        view = await put(f"rs1/{a.address}", {"weight": 0})
        assert view["draining"] is True and await names(3) == ["B"] * 3
        # A server that leaves the config loses its overrides; back, it has the file's.
        doc["server_groups"]["rs1"]["servers"] = [{"address": b.address}]
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        doc["server_groups"]["rs1"]["servers"] = [{"address": a.address}, {"address": b.address}]
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        async with s.get(base) as r:
            again = {x["address"]: x for x in await r.json()}
        assert (again[a.address]["weight"], again[a.address]["override"]) == (100, None)
        # Errors, in words.
        err = await put(f"nope/{a.address}", {"admin_state": "drain"}, 404)
        assert "nope" in err["errors"][0]
        err = await put("rs1/127.0.0.1:1", {"admin_state": "drain"}, 404)
        assert "127.0.0.1:1" in err["errors"][0]
        for bad in ({}, [], {"admin_state": "maint"}, {"weight": 101}, {"weight": "5"}, {"x": 1}):
            err = await put(f"rs1/{a.address}", bad, 400)
            assert err["result"] == "error" and err["errors"]
        # the weight is checked as the config file's weight is, with the same words
        err = await put(f"rs1/{a.address}", {"weight": 101}, 400)
        assert err["errors"] == ["weight: expected an integer 0..100, got 101"]
        async with s.put(f"{base}/rs1/{a.address}", data=b"{not json", headers=JSON) as r:
            assert r.status == 400 and "JSON" in (await r.json())["errors"][0]
        await ws.close()


async def test_runtime_api_needs_the_admin_token(make_backend, make_proxy, make_admin):
    a = await make_backend("A", app=ws_app)
    doc = doc_for([a.address])
    doc["admin"]["token"] = "s3cret"
    proxy = await make_proxy(doc)
    admin = await make_admin(proxy)
    url = f"http://{admin.address}/-/servers"
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert r.status == 401
        async with s.put(f"{url}/rs1/{a.address}", json={"admin_state": "drain"}) as r:
            assert r.status == 401
        assert not proxy.state.servers[f"rs1/{a.address}"].draining
        auth = {"Authorization": "Bearer s3cret"}
        async with s.put(f"{url}/rs1/{a.address}", json={"weight": 7}, headers=auth) as r:
            assert r.status == 200 and (await r.json())["weight"] == 7
        async with s.get(url, headers=auth) as r:
            assert r.status == 200 and (await r.json())[0]["weight"] == 7


async def test_draining_server_keepalive_connection_closes_after_its_response(
    make_backend, make_proxy, make_admin
):
    a = await make_backend("A", app=ws_app)
    proxy = await make_proxy(doc_for([a.address]))
    admin = await make_admin(proxy)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy_url(proxy, path="/whoami")) as r:
            assert await r.text() == "A"
        async with s.get(proxy_url(proxy, path="/whoami")) as r:
            assert await r.text() == "A"
        assert a.app[CONNS][0] == a.app[CONNS][1]  # pooled: one backend connection
        slow = asyncio.ensure_future(s.get(proxy_url(proxy, path="/whoami?sleep=0.5")))
        await wait_for(lambda: len(a.app[CONNS]) == 3, what="the slow request to arrive")
        url = f"http://{admin.address}/-/servers/rs1/{a.address}"
        async with s.put(url, json={"admin_state": "drain"}) as r:
            assert r.status == 200
        async with await slow as r:
            assert await r.text() == "A"  # the request in flight finishes
        async with s.put(url, json={"admin_state": "ready"}) as r:
            assert r.status == 200
        async with s.get(proxy_url(proxy, path="/whoami")) as r:
            assert await r.text() == "A"
        # Its connection was closed after the response, not pooled: a new one now.
        assert a.app[CONNS][3] != a.app[CONNS][2]


async def test_status_and_metrics_show_draining(make_backend, make_proxy, make_admin):
    a = await make_backend("A", app=ws_app)
    b = await make_backend("B", app=ws_app)
    doc = doc_for([a.address, b.address])
    proxy = await make_proxy(doc)
    admin = await make_admin(proxy)
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
        assert await echo(ws, "x") == "A:x"
        url = f"http://{admin.address}/-/servers/rs1/{b.address}"
        async with s.put(url, json={"admin_state": "drain"}) as r:
            assert r.status == 200
        doc["server_groups"]["rs1"]["servers"] = [{"address": b.address}]
        assert (await proxy.apply_config(parse_config(doc), "test")).ok  # A removed, open
        async with s.get(f"http://{admin.address}/status") as r:
            st = await r.json()
        servers = {x["address"]: x for x in st["server_groups"][0]["servers"]}
        assert servers[a.address]["removed"] and servers[a.address]["draining"]
        assert servers[b.address]["admin_state"] == "drain" and servers[b.address]["draining"]
        async with s.get(f"http://{admin.address}/") as r:
            page = await r.text()
        assert page.count("DRAINING") == 2
        async with s.get(f"http://{admin.address}/metrics") as r:
            text = await r.text()
        for addr in (a.address, b.address):
            assert (
                f'lbproxy_backend_state{{server="{addr}",server_group="rs1",state="draining"}} 1.0'
                in text
            )
            assert (
                f'lbproxy_backend_state{{server="{addr}",server_group="rs1",state="up"}} 0.0'
                in text
            )
        await ws.close()
