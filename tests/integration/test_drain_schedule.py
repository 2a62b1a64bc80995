"""The drain schedule per tunnel: the k-th of n tunnels (oldest first) is closed at
``window * (k + 1/2) / n`` after the drain began (drain.py, README "Draining").

Each tunnel's close is timed by its own client, relative to the moment just before the
reload that starts the drain (never after the drain's own start, so a time measured here is
never less than the proxy's). A close before its slot is a bug: the lower bounds have only
the timers' granularity as room. A close after it is what load does: the upper bounds are
wide (still narrower than the gap to the slot after next, so the order shows).
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType

from lbproxy.config import parse_config
from lbproxy.wire import wsframes
from tests.support import config_doc, proxy_url

N = 6
WINDOW = 6.0  # one slot a second: 0.5, 1.5, ... 5.5
EARLY = 0.05  # timer and clock granularity
LATE = 1.9  # load; below two slots, so no tunnel can take the place of the one after next


async def test_each_tunnel_closes_in_its_slot_oldest_first(make_backend, make_proxy):
    a, b = await make_backend("A"), await make_backend("B")
    doc = config_doc(
        [a.address], group={"health_check": {"enabled": False}, "drain_timeout": f"{WINDOW:g}s"}
    )
    proxy = await make_proxy(doc)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        tunnels = []
        for i in range(N):  # one after the other: the i-th opened is the i-th oldest
            ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
            await ws.send_str(f"t{i}")
            assert (await ws.receive()).data == f"t{i}"
            tunnels.append(ws)
        closed_at: list[float | None] = [None] * N

        async def until_closed(k: int, ws: aiohttp.ClientWebSocketResponse) -> None:
            msg = await ws.receive()
            closed_at[k] = loop.time()
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, wsframes.GOING_AWAY), msg

        waiters = [asyncio.ensure_future(until_closed(k, ws)) for k, ws in enumerate(tunnels)]
        doc["server_groups"]["rs1"]["servers"] = [{"address": b.address}]
        started = loop.time()
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        await asyncio.wait_for(asyncio.gather(*waiters), WINDOW + 30)
        for ws in tunnels:
            await ws.close()

    offsets = [t - started for t in closed_at if t is not None]
    assert len(offsets) == N
    slots = [WINDOW * (k + 0.5) / N for k in range(N)]
    for k, (got, slot) in enumerate(zip(offsets, slots, strict=True)):
        assert got >= slot - EARLY, f"tunnel {k} closed early: {got:.3f}s, slot {slot:.3f}s"
        assert got <= slot + LATE, f"tunnel {k} closed late: {got:.3f}s, slot {slot:.3f}s"
    assert proxy.registry.listener("web").ws_closes["drain"] == N
