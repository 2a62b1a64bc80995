"""A fleet of lbproxy instances (issue 14): nothing shared between them is needed.

Two real ``python -m lbproxy`` processes listen on the same free port of 127.0.0.2 and
127.0.0.3 (as two hosts behind one DNS name or a shared virtual IP would), in front of the
same two Socket.IO chat servers sharing a real Redis. The instances share only their config:
the servers and ``sticky_session.secret``.

Clients reach them as one host name, ``fleet.test``, whose resolver (the client side's
aiohttp resolver, standing for DNS round-robin) answers 127.0.0.2 and 127.0.0.3 in turn, and
every request opens a new connection, so consecutive requests of one Socket.IO session
alternate between the instances: the handshake through one, the next long-poll and the
WebSocket upgrade through the other. Only the insert cookie keeps a session on its server
(Engine.IO sid pinning is off), so every session that completes shows that a cookie set by
one instance is honoured by the other: with round-robin alone, half of the requests would
reach a server that does not know the session and be refused with 400.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from lbproxy.core.sticky import server_token
from tests.integration import test_socketio
from tests.integration.test_socketio import Client, SioServer
from tests.integration.test_workers import Cluster, spawn, write_config
from tests.support import config_doc, free_port, wait_for

pytestmark = pytest.mark.timeout(90)

# The fixtures, shared: Redis and two Socket.IO servers "A" and "B" using it.
redis_server = test_socketio.redis_server
sio_servers = test_socketio.sio_servers
SECRET = "fleet-secret-shared-by-every-instance"
HOSTS = ("127.0.0.2", "127.0.0.3")


class RoundRobinName(AbstractResolver):
    """``fleet.test`` -> each instance in turn (one address per answer, as a client that
    takes the first of a rotating DNS answer would see)."""

    def __init__(self, start: int) -> None:
        self.turn = itertools.cycle(HOSTS[start:] + HOSTS[:start])
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        assert host == "fleet.test", host
        ip = next(self.turn)
        self.asked.append(ip)
        return [
            ResolveResult(
                hostname=host, host=ip, port=port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        pass


@pytest.fixture
async def fleet(
    sio_servers: list[SioServer], tmp_path: Path
) -> AsyncIterator[tuple[int, list[Cluster]]]:
    port = free_port()  # the same port on both addresses, not a fixed one
    started: list[Cluster] = []
    try:
        for host in HOSTS:
            admin = free_port()
            doc = config_doc(
                [s.address for s in sio_servers],
                listener={"bind": f"{host}:{port}", "idle_timeout": "10s"},
                group={
                    "scheduler": "rr",
                    "sticky_session": {"type": "insert", "secret": SECRET},
                },
                admin={"bind": f"127.0.0.1:{admin}"},
            )
            path = tmp_path / f"lb-{host}.yaml"
            write_config(path, doc)
            started.append(Cluster(await spawn(path), path, port, admin))

        async def ready(c: Cluster) -> bool:
            if c.proc.returncode is not None:
                raise AssertionError(f"lbproxy exited {c.proc.returncode}:\n" + "\n".join(c.lines))
            try:
                st = await c.status()
            except aiohttp.ClientError:
                return False
            servers = st["server_groups"][0]["servers"]
            return bool(st["listeners"]) and all(s["state"] == "up" for s in servers)

        for c in started:
            await wait_for(lambda c=c: ready(c), 20, "an instance serving, servers up")
        yield port, started
    finally:
        for c in started:
            await c.stop()


def fleet_client(index: int, resolver: RoundRobinName) -> Client:
    """A Client keeping cookies, a new connection per request, fleet.test resolved in turn."""
    client = Client(index, cookies=True)
    connector = aiohttp.TCPConnector(force_close=True, resolver=resolver, use_dns_cache=False)
    client.session = aiohttp.ClientSession(connector=connector)
    client.sio.eio.http = client.session
    client.sio.eio.external_http = True  # Client.close closes it
    return client


async def requests_by_code(c: Cluster) -> collections.Counter[str]:
    m = await c.metrics()
    out: collections.Counter[str] = collections.Counter()
    for s in m.samples:
        if s.name == "lbproxy_requests_total":
            out[s.labels["code"]] += int(s.value)
    return out


async def test_two_instances_serve_one_socketio_deployment_with_nothing_shared(
    fleet: tuple[int, list[Cluster]], sio_servers: list[SioServer]
) -> None:
    port, instances = fleet
    # Half of the sessions start on each instance.
    resolvers = [RoundRobinName(i % 2) for i in range(8)]
    clients = [fleet_client(i, r) for i, r in enumerate(resolvers)]
    url = f"http://fleet.test:{port}"
    try:
        for c in clients:  # one after another: each session's requests alternate
            await c.connect(url)
        assert [c.errors for c in clients] == [[]] * 8
        await wait_for(
            lambda: all(c.sio.transport() == "websocket" for c in clients),
            what="every client to upgrade to websocket",
        )
        for c in clients:
            c.backend = await c.sio.call("whoami", timeout=5)
        assert {c.backend for c in clients} == {"A", "B"}
        for c in clients:
            await c.sio.emit("chat", {"from": c.index, "text": f"hello {c.index}"})
        await wait_for(
            lambda: all(len(c.received) == 8 for c in clients),
            timeout=10,
            what="every client to receive all 8 messages",
        )
        for c in clients:
            assert sorted(m["from"] for m in c.received) == list(range(8))
    finally:
        await asyncio.gather(*(c.close() for c in clients))

    # Every connection was resolved anew, so each session's requests alternated: the
    # handshake through one instance, the upgrade (and any long-poll) through the other.
    for r in resolvers:
        assert len(r.asked) >= 2 and set(r.asked) == set(HOSTS), r.asked
    assert {r.asked[0] for r in resolvers} == set(HOSTS)
    # Both instances carried handshakes and upgrades, and neither was ever refused.
    for inst in instances:
        codes = await requests_by_code(inst)
        assert codes["200"] > 0 and codes["101"] > 0, codes
        assert set(codes) <= {"200", "101"}, codes
    for s in sio_servers:
        assert set(s.statuses()) <= {"200", "101"}, s.output()


async def test_an_insert_cookie_set_by_one_instance_is_honoured_by_the_other(
    fleet: tuple[int, list[Cluster]], sio_servers: list[SioServer]
) -> None:
    port, _ = fleet
    ids = {f"rs1/{s.address}": s.name for s in sio_servers}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        async with session.get(f"http://{HOSTS[0]}:{port}/health") as r:
            assert r.status == 200
            token = r.cookies["SERVERID"].value
            first = r.headers["X-Backend"]
        # Keyed with the shared secret, not the built-in key.
        by_token = {server_token(sid, SECRET): name for sid, name in ids.items()}
        assert by_token[token] == first
        assert token not in {server_token(sid) for sid in ids}
        # Round-robin on the other instance would alternate; the cookie pins every request.
        seen = []
        for _ in range(6):
            async with session.get(
                f"http://{HOSTS[1]}:{port}/health", headers={"Cookie": f"SERVERID={token}"}
            ) as r:
                assert r.status == 200
                assert "SERVERID" not in r.cookies  # understood: nothing to replace
                seen.append(r.headers["X-Backend"])
        assert seen == [first] * 6
        other = {"A": "B", "B": "A"}[first]
        seen = []
        for _ in range(2):
            async with session.get(f"http://{HOSTS[1]}:{port}/health") as r:
                seen.append(r.headers["X-Backend"])
        assert sorted(seen) == sorted([first, other])  # without the cookie: round-robin
