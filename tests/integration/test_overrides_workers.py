"""Runtime overrides (``PUT /-/servers/...``) with ``--workers 2`` survive a reload and a
killed worker: after each, no worker sends a request to a server drained through the API
(or given weight 0 through it), and ``GET /-/servers`` still shows the overrides.

The real ``lbproxy --workers 2`` runs as a subprocess (the harness of test_workers.py) with
``admin.token`` set; which worker answered each request is read from /proc, as there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp

from tests.integration.test_workers import (
    START_TIMEOUT,
    Cluster,
    Reply,
    count,
    lb_doc,
    respawned,
    serving,
    spawn,
    write_config,
)
from tests.support import free_port, wait_for

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def doc_with_token(servers: list[str], port: int, admin: int, **top: Any) -> dict[str, Any]:
    doc = lb_doc(servers, port, admin, **top)
    doc["admin"]["token"] = TOKEN
    return doc


async def start(path: Path, servers: list[str]) -> Cluster:
    port, admin = free_port(), free_port()
    write_config(path, doc_with_token(servers, port, admin))
    lb = Cluster(await spawn(path, "--workers", "2"), path, port, admin)

    async def ready() -> bool:
        if lb.proc.returncode is not None:
            raise AssertionError(f"lbproxy exited {lb.proc.returncode}:\n" + "\n".join(lb.lines))
        try:
            st = await lb.status()
        except aiohttp.ClientError:
            return False
        workers_up = len(st["workers"]) == 2 and all(w["serving"] for w in st["workers"])
        up = all(s["state"] == "up" for g in st["server_groups"] for s in g["servers"])
        return workers_up and up

    try:
        await wait_for(ready, START_TIMEOUT, "both workers serving and every server up")
    except BaseException:
        await lb.stop()
        raise
    return lb


async def servers(lb: Cluster) -> dict[str, dict[str, Any]]:
    async with lb.session.get(f"{lb.admin}/-/servers", headers=AUTH) as r:
        assert r.status == 200, await r.text()
        return {x["address"]: x for x in await r.json()}


async def put(lb: Cluster, address: str, body: dict[str, Any], auth: bool = True) -> int:
    url = f"{lb.admin}/-/servers/rs1/{address}"
    async with lb.session.put(url, json=body, headers=AUTH if auth else {}) as r:
        return r.status


async def only_a_serves(lb: Cluster, a: str, n: int = 60) -> list[Reply]:
    """``n`` requests over new connections: all answered by A, and by both workers."""
    pids = await lb.worker_pids()
    replies = await lb.spread(n)
    assert {(r.status, r.body) for r in replies} == {(200, "A")}
    assert {r.pid for r in replies} == set(pids), "both workers answered"
    return replies


async def test_overrides_survive_a_reload_and_a_killed_worker(make_backend, tmp_path):
    a, b, c = [await make_backend(n) for n in "ABC"]
    lb = await start(tmp_path / "lb.yaml", [a.address, b.address, c.address])
    try:
        replies = await lb.spread(60)
        assert {r.body for r in replies} == {"A", "B", "C"}  # all three serve before

        assert await put(lb, b.address, {"admin_state": "drain"}, auth=False) == 401
        assert await put(lb, b.address, {"admin_state": "drain"}) == 200
        assert await put(lb, c.address, {"weight": 0}) == 200
        seen = {x: count(x, "/whoami") for x in (b, c)}

        def set_here(override: dict[str, Any]) -> dict[str, Any]:
            """What was set, checking who set it: the supervisor (this host), the same in
            every worker and after a restart."""
            rest = dict(override)
            assert rest.pop("set_by") == socket.gethostname()
            assert rest.pop("set_at") > 0
            return rest

        def overrides_shown(listing: dict[str, dict[str, Any]]) -> None:
            assert set_here(listing[b.address]["override"]) == {"admin_state": "drain"}
            assert (listing[b.address]["admin_state"], listing[b.address]["draining"]) == (
                "drain",
                True,
            )
            assert set_here(listing[c.address]["override"]) == {"weight": 0}
            assert (listing[c.address]["weight"], listing[c.address]["draining"]) == (0, True)
            assert listing[a.address]["override"] is None

        overrides_shown(await servers(lb))
        await only_a_serves(lb, a.address)

        # A reload that changes something else (each trigger once): the overrides stay.
        port, admin = lb.port, int(lb.admin.rsplit(":", 1)[1])
        servers_now = [a.address, b.address, c.address]
        write_config(
            lb.path,
            doc_with_token(servers_now, port, admin, shutdown_timeout="5s"),
            keep_signature=True,
        )
        lb.proc.send_signal(signal.SIGHUP)

        async def reloads(n: int) -> bool:
            m = await lb.metrics()
            return m.total("lbproxy_config_reloads_total", result="success") == n

        await wait_for(lambda: reloads(1), 10, "the SIGHUP reload")
        write_config(lb.path, doc_with_token(servers_now, port, admin), keep_signature=True)
        async with lb.session.post(f"{lb.admin}/-/reload", json={}, headers=AUTH) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["changed"] is True
        await wait_for(lambda: reloads(2), 10, "the admin reload")
        overrides_shown(await servers(lb))
        await only_a_serves(lb, a.address)

        # A worker killed and restarted gets the overrides in force, as the other kept them.
        pids = await lb.worker_pids()
        os.kill(pids[0], signal.SIGKILL)
        await respawned(lb, 0, pids[0])
        await wait_for(lambda: serving(lb, 0), 10, "worker 0 serving again")
        new = await lb.worker_pids()
        assert new[0] != pids[0] and new[1] == pids[1]
        replies = await only_a_serves(lb, a.address, 80)
        assert new[0] in {r.pid for r in replies}
        overrides_shown(await servers(lb))
        assert {x: count(x, "/whoami") for x in (b, c)} == seen  # not one request since

        # Ready again through the API: every worker (the new one too) sends them traffic.
        assert await put(lb, b.address, {"admin_state": "ready"}) == 200
        assert await put(lb, c.address, {"weight": 100}) == 200
        replies = await lb.spread(60)
        for pid in new:
            assert {r.body for r in replies if r.pid == pid} == {"A", "B", "C"}, pid
    finally:
        with contextlib.suppress(Exception):
            await lb.stop()


async def test_shed_reaches_every_worker(make_backend, tmp_path):
    """``POST .../shed`` under --workers: each worker sheds its share of its own tunnels, and
    the answer sums what they scheduled."""
    a = await make_backend("A")
    lb = await start(tmp_path / "lb.yaml", [a.address])
    try:
        url = f"ws://127.0.0.1:{lb.port}/ws"
        tunnels = [await lb.session.ws_connect(url) for _ in range(16)]
        for ws in tunnels:  # each one established through its worker
            await ws.send_str("hi")
            assert (await ws.receive()).data == "hi"
        await wait_for(
            lambda: _ws_active(lb, a.address, 16), 10, "16 tunnels in the workers' stats"
        )
        shed = f"{lb.admin}/-/servers/rs1/{a.address}/shed"
        async with lb.session.post(shed, json={"count": 1, "over": "0s"}) as r:
            assert r.status == 401  # a write, like PUT: the token is needed
        async with lb.session.post(shed, json={"fraction": 1.0}, headers=AUTH) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["scheduled"] == 16  # both workers' tunnels
        for ws in tunnels:
            msg = await ws.receive(timeout=20)
            assert msg.data == 1012, msg
            await ws.close()
        metrics = await lb.metrics()
        assert (
            metrics.total(
                "lbproxy_websockets_rebalanced_total", server_group="rs1", server=a.address
            )
            == 16
        )
        # Each worker's shed is an event in the supervisor's history (the one served).
        async with lb.session.get(f"{lb.admin}/status/history", headers=AUTH) as r:
            events = [e for e in (await r.json())["events"] if e["kind"] == "rebalance"]
        assert events and all(e["text"].startswith("worker ") for e in events), events
        assert sum(int(e["text"].split("shedding ")[1].split()[0]) for e in events) == 16
    finally:
        await lb.stop()


async def _ws_active(lb: Cluster, address: str, n: int) -> bool:
    return (await servers(lb))[address]["websockets_active"] == n
