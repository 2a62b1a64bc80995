"""Rebalance after a scale-out, slow start and shed by hand, end to end on loopback.

Clients behave like the chat page: on 1012 (or 1001) they reconnect after a short jitter.
Each backend records every message it receives, so the tests see that nothing a client sent
before its close frame was lost, and the proxy's own counts say where the tunnels are.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from lbproxy.core.rebalance import Load, within
from lbproxy.core.snapshot import ServerState
from tests.support import config_doc, proxy_url, wait_for

RECEIVED = web.AppKey("received", set)


def recording_app(name: str) -> web.Application:
    """A WebSocket backend that remembers every text message and answers ``whoami``."""
    app = web.Application()
    app[RECEIVED] = set()

    async def ws(request: web.Request) -> web.WebSocketResponse:
        resp = web.WebSocketResponse()
        await resp.prepare(request)
        async for msg in resp:
            if msg.type == WSMsgType.TEXT:
                if msg.data == "whoami":
                    await resp.send_str(name)
                else:
                    app[RECEIVED].add(msg.data)
        return resp

    async def whoami(request: web.Request) -> web.Response:
        return web.Response(text=name)

    app.router.add_get("/ws", ws)
    app.router.add_get("/whoami", whoami)
    return app


class Client:
    """One chat-page-like client: connects, sends a numbered message now and then, and on
    1012/1001 reconnects after a short random delay (anything else is a failure)."""

    def __init__(self, index: int, url: str, session: aiohttp.ClientSession) -> None:
        self.index = index
        self.url = url
        self.session = session
        self.sent: list[str] = []  # sent before the client saw (and answered) a close frame
        self.codes: list[int | None] = []  # close codes the proxy sent it
        self.backend = ""
        self.connects = 0
        self.stop = False
        self.task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        seq = 0
        while not self.stop:
            ws = await self.session.ws_connect(self.url)
            self.connects += 1
            await ws.send_str("whoami")
            hello = await ws.receive()
            assert hello.type == WSMsgType.TEXT, hello
            self.backend = hello.data
            while not self.stop:
                try:
                    msg = await asyncio.wait_for(ws.receive(), random.uniform(0.3, 0.9))
                except TimeoutError:
                    if ws.closed:
                        break
                    seq += 1
                    text = f"c{self.index}-{seq}"
                    await ws.send_str(text)
                    self.sent.append(text)
                    continue
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    self.codes.append(ws.close_code)
                    break
            if self.stop:
                await ws.close()
                return
            await ws.close()
            if ws.close_code not in (1012, 1001):
                return  # a failure: the test sees the code
            self.backend = ""
            await asyncio.sleep(random.uniform(0, 0.1))  # the chat page's jitter, shorter


def open_on(server: ServerState) -> int:
    return sum(server.stats.ws_active.values())


def spread(proxy: Proxy) -> list[Load]:
    g = proxy.holder.current.groups["rs1"]
    return [Load(s.id, open_on(s), s.effective) for s in g.available()]


N = 200
RATE = 100


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sticky", [None, "insert"])
async def test_scale_out_rebalances_open_websockets(make_backend, make_proxy, sticky):
    a, b, c = [await make_backend(n, app=recording_app) for n in ("A", "B", "C")]
    group: dict[str, Any] = {
        "scheduler": "wlc",
        "health_check": {"enabled": False},
        "rebalance": {"tolerance": 1.25, "rate": RATE},
    }
    if sticky:
        group["sticky_session"] = {"type": sticky}
    doc = config_doc([a.address, b.address], group=group)
    proxy = await make_proxy(doc)
    url = proxy_url(proxy, path="/ws")
    sessions = [aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) for _ in range(N)]
    clients: list[Client] = []
    try:
        clients = [Client(i, url, sessions[i]) for i in range(N)]
        await wait_for(lambda: all(cl.backend for cl in clients), 20, "every client connected")
        assert sorted({cl.backend for cl in clients}) == ["A", "B"]
        assert within(spread(proxy), 1.25)  # nothing to do yet
        assert not any(cl.codes for cl in clients)

        doc["server_groups"]["rs1"]["servers"].append({"address": c.address})
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        # About 67 moves at RATE a second; the bound is a hang guard.
        await wait_for(
            lambda: within(spread(proxy), 1.25) and open_on(server(proxy, c)) > 0,
            N / RATE + 10,
            "the third server's fair share",
        )
        counts = {s.id: open_on(s) for s in servers(proxy)}
        share = sum(counts.values()) / 3  # a few clients may be reconnecting right now
        assert share / 1.25 <= counts[server(proxy, c).id] <= share * 1.25, counts
        moved = sum(s.stats.ws_rebalanced for s in servers(proxy))
        assert moved >= N / 3 / 1.25
        assert proxy.registry.listener("web").ws_closes["rebalance"] >= moved - 2
        # The rebalance stops once within tolerance: no endless churn.
        before = moved
        await asyncio.sleep(1.5)
        assert sum(s.stats.ws_rebalanced for s in servers(proxy)) - before <= 3
        await wait_for(lambda: all(cl.backend for cl in clients), 20, "every client back")
    finally:
        for cl in clients:
            cl.stop = True
        await asyncio.gather(*(cl.task for cl in clients), return_exceptions=True)
        for s in sessions:
            await s.close()
    codes = [code for cl in clients for code in cl.codes]
    assert codes and set(codes) == {1012}, set(codes)  # never 1006
    for cl in clients:
        assert cl.task.exception() is None, cl.task.exception()
    received = set().union(*(bk.app[RECEIVED] for bk in (a, b, c)))
    lost = [m for cl in clients for m in cl.sent if m not in received]
    assert not lost, f"{len(lost)} messages lost, e.g. {lost[:5]}"


def servers(proxy: Proxy) -> tuple[ServerState, ...]:
    return proxy.holder.current.groups["rs1"].servers


def server(proxy: Proxy, backend: Any) -> ServerState:
    return proxy.holder.current.groups["rs1"].by_id[f"rs1/{backend.address}"]
