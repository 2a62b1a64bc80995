"""Rebalance after a scale-out, slow start and shed by hand, end to end on loopback.

Clients behave like the chat page: on 1012 (or 1001) they reconnect after a short jitter.
Each backend records every message it receives, so the tests see that nothing a client sent
before its close frame was lost, and the proxy's own counts say where the tunnels are.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from lbproxy.core.rebalance import Load, within
from lbproxy.core.snapshot import ServerState
from tests.support import config_doc, proxy_url, raw_websocket, wait_for

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
        self.cookie = ""  # the insert cookie the proxy set ("name=value"), sent back
        self.repinned = 0  # answers that set it (the first, and each re-pin)
        self.stop = False
        self.task = asyncio.ensure_future(self.run())

    async def run(self) -> None:
        seq = 0
        while not self.stop:
            # The insert cookie kept by hand: a cookie jar does not take one from a 101.
            headers = {"Cookie": self.cookie} if self.cookie else {}
            ws = await self.session.ws_connect(self.url, headers=headers)
            set_cookie = ws._response.headers.get("Set-Cookie")
            if set_cookie:
                self.cookie = set_cookie.split(";", 1)[0]
                self.repinned += 1
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
    sessions = [aiohttp.ClientSession() for _ in range(N)]
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
        if sticky:
            assert all(cl.cookie for cl in clients)
            # The moved clients were pinned anew (a second Set-Cookie), not sent back.
            assert sum(cl.repinned - 1 for cl in clients) >= open_on(server(proxy, c)) - 2
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


# ------------------------------------------------------------------ shed by hand


async def test_shed_api_closes_a_share_over_a_window(make_backend, make_proxy, make_admin):
    a = await make_backend("A", app=recording_app)
    b = await make_backend("B", app=recording_app)
    doc = config_doc([a.address, b.address], group={"health_check": {"enabled": False}})
    doc["server_groups"]["rs1"]["servers"][1]["weight"] = 0  # everything on A
    proxy = await make_proxy(doc)
    admin = await make_admin(proxy)
    base = f"http://{admin.address}/-/servers"
    async with aiohttp.ClientSession() as s:
        tunnels = [await s.ws_connect(proxy_url(proxy, path="/ws")) for _ in range(10)]
        await wait_for(lambda: open_on(server(proxy, a)) == 10, what="10 tunnels on A")

        async def post(path: str, body: Any, status: int) -> Any:
            async with s.post(f"{base}/{path}/shed", json=body) as r:
                assert r.status == status, await r.text()
                return await r.json()

        assert (await post(f"nope/{a.address}", {"count": 1}, 404))["errors"] == [
            "no server group 'nope'"
        ]
        assert (await post("rs1/127.0.0.1:1", {"count": 1}, 404))["errors"] == [
            "no server '127.0.0.1:1' in group 'rs1'"
        ]
        bad = await post(f"rs1/{a.address}", {"fraction": 2}, 400)
        assert bad["errors"] == ["fraction: expected a number above 0 and at most 1, got 2"]
        await post(f"rs1/{a.address}", {"fraction": 0.5, "count": 1}, 400)
        headers = {"Content-Type": "application/json"}
        async with s.post(f"{base}/rs1/{a.address}/shed", data=b"{", headers=headers) as r:
            assert r.status == 400
            assert (await r.json())["errors"][0].startswith("the body is not JSON")

        got = await post(f"rs1/{a.address}", {"fraction": 0.5, "over": "3s"}, 200)
        assert got == {
            "result": "ok",
            "server": f"rs1/{a.address}",
            "fraction": 0.5,
            "scheduled": 5,
            "over": 3.0,
            "fleet": False,  # no cluster: this instance alone
        }
        async with s.get(f"http://{admin.address}/status") as r:
            (group,) = (await r.json())["server_groups"]
        assert group["rebalance"]["in_progress"] is True
        async with s.get(f"http://{admin.address}/") as r:
            assert "Rebalance in progress" in await r.text()
        async with s.get(f"http://{admin.address}/status/history") as r:
            events = (await r.json())["events"]
        assert [e["text"] for e in events if e["kind"] == "rebalance"] == [
            f"shedding 5 WebSockets of rs1/{a.address} over 3s"
        ]
        # The idle-longest first: the first five opened (none has sent anything since).
        closes = await asyncio.gather(*(asyncio.wait_for(ws.receive(), 20) for ws in tunnels[:5]))
        assert {(m.type, m.data) for m in closes} == {(WSMsgType.CLOSE, 1012)}
        assert server(proxy, a).stats.ws_rebalanced == 5
        await wait_for(lambda: open_on(server(proxy, a)) == 5, what="five left")
        assert all(not ws.closed for ws in tunnels[5:])
        async with s.get(base) as r:
            view = {x["address"]: x for x in await r.json()}
        assert view[a.address]["websockets_active"] == 5
        async with s.get(f"http://{admin.address}/status") as r:
            (group,) = (await r.json())["server_groups"]
        assert group["rebalance"] == {
            "enabled": False,
            "tolerance": None,
            "within_tolerance": None,
            "in_progress": False,
        }
        assert group["servers"][0]["websockets_rebalanced"] == 5
        for ws in tunnels:
            await ws.close()


async def test_a_move_loses_no_message_the_client_sent_before_its_close(
    make_backend, make_proxy, tmp_path
):
    """The client keeps sending while the proxy's 1012 is on its way: whatever it sent before
    it saw the close frame reaches the server (the server's 1001 takes the place of the
    client's close frame)."""
    a = await make_backend("A", app=recording_app)
    doc = config_doc([a.address], group={"health_check": {"enabled": False}})
    log = tmp_path / "access.log"
    doc["access_log"] = {"enabled": True, "format": "json", "path": str(log)}
    proxy = await make_proxy(doc)
    async with aiohttp.ClientSession() as s:
        for round_ in range(5):
            ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
            sent: list[str] = []
            seen_close = asyncio.Event()

            async def sender(
                ws: Any = ws, sent: list[str] = sent, ev: Any = seen_close, r: int = round_
            ) -> None:
                i = 0
                while not ev.is_set() and not ws.closed:
                    text = f"r{r}-{i}-" + "x" * 200
                    await ws.send_str(text)
                    sent.append(text)
                    i += 1
                    if i % 20 == 0:
                        await asyncio.sleep(0)  # let the receiver see the close

            async def receiver(ws: Any = ws, ev: Any = seen_close) -> Any:
                msg = await ws.receive()
                ev.set()
                return msg

            task = asyncio.ensure_future(sender())
            await wait_for(lambda sent=sent: len(sent) > 200, what="the client sending")
            rx = asyncio.ensure_future(receiver())
            assert proxy.servers.shed(server(proxy, a), None, 1, 0.0) == 1
            msg = await asyncio.wait_for(rx, 20)
            await asyncio.wait_for(task, 20)
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1012)
            await wait_for(
                lambda sent=sent: set(sent) <= a.app[RECEIVED], 10, "every message sent before"
            )
    # Each move is logged as such, with the code the client got.
    await wait_for(
        lambda: log.exists() and len(log.read_text().splitlines()) == 5, 10, "5 access-log lines"
    )
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert {(x["close_reason"], x["close_code"]) for x in lines} == {("rebalance", "1012")}


async def test_tunnels_told_to_go_are_not_moved_again_while_their_clients_answer(
    make_backend, make_proxy
):
    """A moved tunnel stays open until its client answers the close frame (up to
    WS_CLOSE_FRAME_WAIT, 10 s): the next rounds must not count it as load still to move, or
    a slow network makes the rebalance move far more than the excess."""
    a, b = [await make_backend(n, app=recording_app) for n in ("A", "B")]
    group: dict[str, Any] = {
        "scheduler": "wlc",
        "health_check": {"enabled": False},
        "rebalance": {"tolerance": 1.25, "rate": 100},
    }
    doc = config_doc([a.address], group=group)
    proxy = await make_proxy(doc)
    tunnels = [await raw_websocket(proxy) for _ in range(20)]
    try:
        doc["server_groups"]["rs1"]["servers"].append({"address": b.address})
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        first = server(proxy, a)
        mover = proxy.servers.mover
        # 20 on A, none on B: the first round moves A's excess (to about the fair 10).
        await wait_for(
            lambda: first.stats.ws_rebalanced > 0 and "rs1" not in mover.rounds,
            10,
            "the first round's moves",
        )
        moved = first.stats.ws_rebalanced
        assert 5 <= moved <= 10, moved
        # Two more looks of the mover (its timer is re-armed at each), within the clients'
        # 10 s: the tunnels told to go are still open on A, and none is moved again.
        looks: list[object] = [mover.timer]

        def looked() -> bool:
            if mover.timer is not looks[-1]:
                looks.append(mover.timer)
            return len(looks) >= 3

        await wait_for(looked, 6, "two more looks")
        assert open_on(first) == 20  # none of the clients has answered: still in transit
        assert first.stats.ws_rebalanced == moved, (moved, first.stats.ws_rebalanced)
    finally:
        for _, writer in tunnels:
            writer.close()
