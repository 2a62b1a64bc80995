"""DNS discovery with ``--workers`` (issue 14): the supervisor resolves, once for all workers,
and hands every new set to each of them; they rebuild their snapshot from it as from a config.
Real processes (``python -m lbproxy --workers 2``), a real DNS server in this process.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.dns_server import DnsServer
from tests.integration import test_workers
from tests.integration.test_workers import Cluster, names
from tests.support import Backend, free_port, wait_for

MakeBackend = Callable[..., Awaitable[Backend]]
start_lbproxy = test_workers.start_lbproxy  # the fixture, shared
SPREAD = 24  # requests, each on a new connection, to see which workers serve


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    server = await DnsServer().start()
    yield server
    server.close()


async def discovered_up(c: Cluster, expected: set[str]) -> bool:
    st: dict[str, Any] = await c.status()
    servers = st["server_groups"][0]["servers"]
    got = {s["id"] for s in servers if s["state"] == "up" and s["discovered"]}
    return got == expected and len(servers) == len(expected)


async def test_supervisor_resolves_once_and_every_worker_follows(
    dns_server: DnsServer, make_backend: MakeBackend, start_lbproxy: Any
) -> None:
    port = free_port()
    await make_backend("B2", port, host="127.0.0.2")
    await make_backend("B3", port, host="127.0.0.3")
    dns_server.set("chat.test", "A", ["127.0.0.2"], ttl=1)
    group = {
        "servers": [],
        "discovery": {"dns": "chat.test", "port": port, "interval": "1s", "timeout": "300ms"},
        "health_check": {"interval": "100ms", "timeout": "1s", "path": "/health"},
    }
    c: Cluster = await start_lbproxy([], workers=2, group=group, resolvers=[dns_server.address])
    first = {f"rs1/127.0.0.2:{port}"}
    await wait_for(lambda: discovered_up(c, first), 15, "the first server found")
    # 24 new connections: the kernel spreads them over the workers by a hash of each
    # connection's addresses, so all of them on one of two is a 1 in 2^23 chance (with 12 it
    # was 1 in 2^11, and happened once in a loaded run).
    replies = await c.spread(SPREAD)
    assert names(replies) == ["B2"] * SPREAD
    assert len({r.pid for r in replies}) == 2, "both workers serve the discovered server"

    dns_server.set("chat.test", "A", ["127.0.0.3"], ttl=1)
    second = {f"rs1/127.0.0.3:{port}"}
    await wait_for(lambda: discovered_up(c, second), 15, "the new set")
    replies = await c.spread(SPREAD)
    assert names(replies) == ["B3"] * SPREAD
    assert len({r.pid for r in replies}) == 2

    # One process asks (about once a second with TTL 1), not one per worker as well.
    dns_server.queries.clear()
    await wait_for(lambda: dns_server.count("chat.test", "A") >= 3, 10, "3 lookups")
    times = [t for n, q, t in dns_server.queries if n == "chat.test" and q == "A"]
    assert times[-1] - times[0] >= 1.9, times  # three workers' loops would ask 3x as often
    m = await c.metrics()
    assert m.total("lbproxy_dns_lookups_total", server_group="rs1", result="ok") >= 3
    assert m.total("lbproxy_backend_discovered", server=f"127.0.0.3:{port}") == 1

    # A restarted worker starts from the supervisor's set (it comes with the config).
    victim = replies[0].pid
    assert victim is not None
    os.kill(victim, signal.SIGKILL)

    async def restarted() -> bool:
        st = await c.status()
        return all(w["serving"] for w in st["workers"]) and victim not in await c.worker_pids()

    await wait_for(restarted, 15, "the killed worker replaced")
    await wait_for(lambda: discovered_up(c, second), 15, "health sent to the new worker")
    replies = await c.spread(SPREAD)
    assert names(replies) == ["B3"] * SPREAD
    assert len({r.pid for r in replies}) == 2
    assert c.logged("could not apply") == 0
