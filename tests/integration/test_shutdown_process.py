"""SIGTERM to a real ``python -m lbproxy`` (one process, and ``--workers 2``) with many open
WebSockets: every client gets a close frame with 1001 (Going Away), and every backend the
masked 1001 in its place; none sees the connection just end (a 1006 in a browser).

The harness is test_workers.py's (``start_lbproxy``); which worker holds a tunnel is read
from /proc, as there, so that with two workers both are shown to close theirs cleanly.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.integration.test_workers import socket_owners
from tests.support import wait_for

CLIENTS = 16
CLOSES = web.AppKey("closes", list)


def recording_ws_app(name: str) -> web.Application:
    """Echoes text; records the close code each WebSocket ended with (None: no close frame)."""
    app = web.Application()
    app[CLOSES] = []

    async def ws(request: web.Request) -> web.WebSocketResponse:
        resp = web.WebSocketResponse()
        await resp.prepare(request)
        async for msg in resp:
            if msg.type == WSMsgType.TEXT:
                await resp.send_str(msg.data)
        app[CLOSES].append(resp.close_code)
        return resp

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/ws", ws)
    app.router.add_route("*", "/health", health)
    return app


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_sends_every_client_a_1001_close_frame(make_backend, start_lbproxy, workers):
    a = await make_backend("A", app=recording_ws_app)
    lb = await start_lbproxy([a.address], workers=workers, shutdown_timeout="1s")
    async with aiohttp.ClientSession() as s:
        clients = []
        for i in range(CLIENTS):
            ws = await s.ws_connect(f"http://127.0.0.1:{lb.port}/ws")
            await ws.send_str(f"hi {i}")
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert (msg.type, msg.data) == (WSMsgType.TEXT, f"hi {i}")
            clients.append(ws)
        if workers == 2:
            pids = await lb.worker_pids()
            owners = socket_owners(lb.port, pids)
            held = {owners.get(ws.get_extra_info("sockname")[1]) for ws in clients}
            assert held == set(pids), "both workers hold tunnels"

        lb.proc.send_signal(signal.SIGTERM)
        # The clients never close by themselves: the proxy must, after shutdown_timeout.
        msgs = await asyncio.wait_for(asyncio.gather(*(ws.receive() for ws in clients)), 15)
        # A connection that just ends would be CLOSED (or ERROR) with close_code 1006.
        assert [(m.type, m.data) for m in msgs] == [(WSMsgType.CLOSE, 1001)] * CLIENTS
        assert [ws.close_code for ws in clients] == [1001] * CLIENTS
        for ws in clients:
            await ws.close()
    assert await lb.exit_code(timeout=15) == 0
    await wait_for(lambda: len(a.app[CLOSES]) == CLIENTS, 10, "every backend WebSocket to end")
    assert a.app[CLOSES] == [1001] * CLIENTS
    assert lb.logged("Traceback") == 0
