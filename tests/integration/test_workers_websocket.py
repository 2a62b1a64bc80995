"""WebSockets in multi-worker mode (issue 12): tunnels spread over both workers survive
reloads that cycle server sets, and a drain or a runtime override reaches every worker.

The real ``lbproxy --workers 2`` runs as a subprocess (the harness of test_workers.py);
which worker holds a tunnel is read from /proc, as there.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType

from tests.integration.test_workers import Cluster, lb_doc, socket_owners, write_config
from tests.support import wait_for

NO_CHECKS = {"health_check": {"enabled": False}}


async def open_tunnels(
    lb: Cluster, s: aiohttp.ClientSession, n: int
) -> list[tuple[aiohttp.ClientWebSocketResponse, str, int]]:
    """``n`` tunnels: (socket, the backend's name, the worker pid holding it)."""
    out = []
    for _ in range(n):
        ws = await s.ws_connect(f"http://127.0.0.1:{lb.port}/ws")
        await ws.send_str("whoami")
        msg = await ws.receive()
        assert msg.type == WSMsgType.TEXT
        out.append((ws, str(msg.data), ws.get_extra_info("sockname")[1]))
    owners = socket_owners(lb.port, await lb.worker_pids())
    return [(ws, name, owners[port]) for ws, name, port in out]


async def talk(ws: aiohttp.ClientWebSocketResponse, text: str) -> str:
    await ws.send_str(text)
    msg = await ws.receive()
    assert msg.type == WSMsgType.TEXT, msg
    return str(msg.data)


async def test_tunnels_on_both_workers_survive_reloads_that_cycle_servers(
    make_backend, start_lbproxy
):
    a, b, c = [await make_backend(n) for n in "ABC"]
    lb = await start_lbproxy([a.address, b.address], group=NO_CHECKS)
    async with aiohttp.ClientSession() as s:
        tunnels = await open_tunnels(lb, s, 24)
        assert len({pid for _, _, pid in tunnels}) == 2, "both workers hold tunnels"
        sets = [[c.address], [a.address, c.address], [b.address], [a.address, b.address]]
        for i in range(8):  # full swaps included: the tunnels' servers leave the config
            doc = lb_doc(sets[i % 4], lb.port, int(lb.admin.rsplit(":", 1)[1]), NO_CHECKS)
            write_config(lb.path, doc, keep_signature=True)
            status, body = await lb.reload()
            assert (status, body["result"]) == (200, "ok"), body
            for j, (ws, _, _) in enumerate(tunnels):
                assert await talk(ws, f"{i}-{j}") == f"{i}-{j}"
        for ws, _, _ in tunnels:
            await ws.close()


async def test_a_drain_reaches_the_tunnels_of_every_worker(make_backend, start_lbproxy):
    a, b = await make_backend("A"), await make_backend("B")
    group = {**NO_CHECKS, "drain_timeout": "1s"}
    lb = await start_lbproxy([a.address, b.address], group=group)
    async with aiohttp.ClientSession() as s:
        tunnels = await open_tunnels(lb, s, 24)
        on_a = [(ws, pid) for ws, name, pid in tunnels if name == "A"]
        on_b = [ws for ws, name, _ in tunnels if name == "B"]
        assert len({pid for _, pid in on_a}) == 2, "A's tunnels are on both workers"
        async with s.get(f"{lb.admin}/-/servers") as r:
            listing = {x["address"]: x for x in await r.json()}
        assert listing[a.address]["websockets_active"] == len(on_a)
        url = f"{lb.admin}/-/servers/rs1/{a.address}"
        async with s.put(url, json={"admin_state": "drain"}) as r:
            assert r.status == 200, await r.text()
        for ws, _ in on_a:
            msg = await asyncio.wait_for(ws.receive(), 15)
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
            await ws.close()
        for ws in on_b:
            assert await talk(ws, "still") == "still"
        # Every worker sends new requests elsewhere.
        replies = await lb.spread(12)
        assert {r.body for r in replies} == {"B"}
        assert len({r.pid for r in replies}) == 2

        async def drained() -> bool:
            m = await lb.metrics()
            return m.total("lbproxy_websockets_drained_total", server=a.address) == len(on_a)

        await wait_for(drained, 10, "the drained tunnels counted over both workers")
        # Ready again: every worker sends it traffic again.
        async with s.put(url, json={"admin_state": "ready"}) as r:
            assert r.status == 200
        replies = await lb.spread(12)
        assert {r.body for r in replies} == {"A", "B"}
        for ws in on_b:
            await ws.close()
