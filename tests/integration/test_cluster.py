"""A fleet through Redis (``cluster:``, issue 22): a real redis-server and three in-process
instances on 127.0.0.2, 127.0.0.3 and 127.0.0.4, in front of two real backends A and B.

- an override set through one instance reaches the others and a restarted one;
- /-/cluster, /status, the page and the metrics show the fleet, a differing config flagged;
- wlc counts the tunnels the other instances carry;
- the rebalance evens out the fleet's spread, each instance moving its part of the excess;
- a shed asked through one instance reaches the others: the same fraction of each one's
  tunnels, or a count split by the tunnels each holds (with --workers: each worker its part);
- Redis stopped (frozen, then killed and restarted empty) under load: no request fails or
  waits on it, the instances say ``degraded``, and overrides and counts come back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lbproxy.config.top import parse_config
from lbproxy.control.admin import AdminServer
from lbproxy.control.app import Proxy
from lbproxy.core.rebalance import Load, within
from tests.backends.redis_server import REDIS_MISSING, RedisServer, find_redis_server, free_port
from tests.integration.test_rebalance import Client, open_on, recording_app
from tests.pki import CA
from tests.support import Backend, config_doc, proxy_url, start_proxy, wait_for

pytestmark = pytest.mark.timeout(120)

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=10, ws_close=5)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    binary = find_redis_server()
    if binary is None:
        pytest.fail(REDIS_MISSING, pytrace=False)
    server = RedisServer(binary, free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.proc.send_signal(signal.SIGCONT)  # a test may leave it frozen
        server.stop()


class Fleet:
    def __init__(self, redis: RedisServer, backends: list[Backend]) -> None:
        self.redis = redis
        self.backends = backends
        self.proxies: list[Proxy] = []
        self.admins: list[AdminServer] = []

    def doc(
        self, i: int, scheduler: str = "rr", group: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        return config_doc(
            [b.address for b in self.backends],
            listener={"bind": f"{HOSTS[i]}:0"},
            group={"scheduler": scheduler, **(group or {})},
            cluster={"redis": self.redis.url, "name": f"lb-{i}", "prefix": "t22:"},
        )

    async def start(
        self, i: int, scheduler: str = "rr", digest: str = "", group: dict[str, Any] | None = None
    ) -> Proxy:
        config = parse_config(self.doc(i, scheduler, group))
        if digest:
            config = dataclasses.replace(config, digest=digest)
        proxy = await start_proxy(config)
        admin = AdminServer(proxy)
        await admin.start()
        if i < len(self.proxies):
            self.proxies[i], self.admins[i] = proxy, admin
        else:
            self.proxies.append(proxy)
            self.admins.append(admin)
        return proxy

    async def stop(self, i: int) -> None:
        await self.admins[i].close()
        await self.proxies[i].close(timeout=0.5)

    async def close(self) -> None:
        for i in range(len(self.proxies)):
            if not self.proxies[i].closing():
                await self.stop(i)


@pytest.fixture
async def fleet(redis: RedisServer, make_backend: Any) -> AsyncIterator[Fleet]:
    backends = [await make_backend("A"), await make_backend("B")]
    f = Fleet(redis, backends)
    try:
        yield f
    finally:
        await f.close()


def sid(fleet: Fleet, name: str) -> str:
    b = next(b for b in fleet.backends if b.name == name)
    return f"rs1/{b.address}"


def server(proxy: Proxy, server_id: str) -> Any:
    return proxy.state.servers[server_id]


async def put(admin: AdminServer, server_id: str, body: dict[str, Any]) -> dict[str, Any]:
    url = f"{admin.url}/-/servers/{server_id}"
    async with aiohttp.ClientSession() as s, s.put(url, json=body) as r:
        assert r.status == 200, await r.text()
        out: dict[str, Any] = await r.json()
        return out


async def get_json(admin: AdminServer, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(f"{admin.url}{path}") as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def who_answers(proxy: Proxy, n: int) -> collections.Counter[str]:
    out: collections.Counter[str] = collections.Counter()
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(proxy_url(proxy, path="/whoami")) as r:
                assert r.status == 200
                out[await r.text()] += 1
    return out


async def test_a_drain_set_through_one_instance_reaches_the_others_and_a_restarted_one(
    fleet: Fleet,
) -> None:
    for i in range(3):
        await fleet.start(i)
    b = sid(fleet, "B")
    view = await put(fleet.admins[0], b, {"admin_state": "drain"})
    assert view["override"]["set_by"] == "lb-0"
    assert view["draining"] is True
    # The others take it from Redis (about twice a second); the bound here is a hang guard.
    await wait_for(
        lambda: all(server(p, b).draining for p in fleet.proxies), 2.0, "B draining everywhere"
    )
    for p in fleet.proxies[1:]:
        assert await who_answers(p, 10) == {"A": 10}
    listed = await get_json(fleet.admins[2], "/-/servers")
    shown = next(s for s in listed if s["id"] == b)
    assert shown["override"]["admin_state"] == "drain"
    assert shown["override"]["set_by"] == "lb-0"  # who set it, and when
    assert abs(shown["override"]["set_at"] - time.time()) < 60
    # A restarted instance reads the fleet's overrides before its listeners accept.
    await fleet.stop(2)
    fresh = await fleet.start(2)
    assert server(fresh, b).draining
    assert fresh.servers.who(b) is not None and fresh.servers.who(b)[0] == "lb-0"  # type: ignore[index]
    assert await who_answers(fresh, 10) == {"A": 10}
    # And back to ready through another instance: everyone follows.
    await put(fleet.admins[1], b, {"admin_state": "ready"})
    await wait_for(
        lambda: not any(server(p, b).draining for p in fleet.proxies), 2.0, "B ready everywhere"
    )


async def test_the_fleet_view_lists_every_live_instance(fleet: Fleet) -> None:
    await fleet.start(0)
    await fleet.start(1)
    await fleet.start(2, digest="another-config")
    await wait_for(
        lambda: all(p.fleet is not None and len(p.fleet.instances) == 3 for p in fleet.proxies),
        3.0,
        "every instance to see three",
    )
    async with aiohttp.ClientSession() as s:  # some traffic to show
        for _ in range(5):
            async with s.get(proxy_url(fleet.proxies[0], path="/whoami")) as r:
                assert r.status == 200
    view = await get_json(fleet.admins[0], "/-/cluster")
    assert view["name"] == "lb-0" and view["state"] == "ok"
    assert view["redis"]["up"] is True
    assert [i["name"] for i in view["instances"]] == ["lb-0", "lb-1", "lb-2"]
    by_name = {i["name"]: i for i in view["instances"]}
    assert by_name["lb-0"]["self"] and not by_name["lb-1"]["self"]
    assert HOSTS[1] in by_name["lb-1"]["address"]
    assert {i["config_differs"] for i in view["instances"]} == {False, True}
    assert by_name["lb-2"]["config_differs"] is True
    for i in view["instances"]:
        assert i["version"] and i["build"]
        assert i["uptime"] >= 0 and 0 <= i["last_seen"] < 10
        assert {"connections", "tunnels", "requests_per_second"} <= i.keys()
    status = await get_json(fleet.admins[1], "/status")
    assert status["cluster"]["name"] == "lb-1"
    assert len(status["cluster"]["instances"]) == 3
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{fleet.admins[0].url}/") as r:
            page = await r.text()
        async with s.get(f"{fleet.admins[0].url}/metrics") as r:
            metrics = await r.text()
    assert "Cluster" in page and "data-instance='lb-2'" in page and "differs" in page
    assert "lbproxy_cluster_instances 3.0" in metrics
    assert "lbproxy_cluster_redis_up 1.0" in metrics
    # An instance that stops leaves the view (at once; a dead one after the expiry).
    await fleet.stop(2)
    await wait_for(
        lambda: len(fleet.proxies[0].fleet.instances) == 2,  # type: ignore[union-attr]
        3.0,
        "lb-2 gone from the view",
    )


async def test_cluster_needs_the_config_for_the_view(
    make_backend: Any, make_proxy: Any, make_admin: Any
) -> None:
    backend = await make_backend("A")
    proxy = await make_proxy(config_doc([backend.address]))
    admin = await make_admin(proxy)
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{admin.url}/-/cluster") as r:
            assert r.status == 404
            assert "no cluster" in (await r.json())["errors"][0]
        async with s.get(f"{admin.url}/metrics") as r:
            assert "\nlbproxy_cluster_redis_up " not in await r.text()
    assert proxy.fleet is None


async def open_tunnels(
    session: aiohttp.ClientSession, proxy: Proxy, n: int
) -> tuple[list[aiohttp.ClientWebSocketResponse], collections.Counter[str]]:
    out: list[aiohttp.ClientWebSocketResponse] = []
    where: collections.Counter[str] = collections.Counter()
    for _ in range(n):
        ws = await session.ws_connect(proxy_url(proxy, path="/ws"))
        await ws.send_str("whoami")
        where[(await ws.receive(timeout=10)).data] += 1
        out.append(ws)
    return out, where


async def test_fleet_wlc_balances_by_the_fleets_counts(fleet: Fleet) -> None:
    """B drained through instance 0 while 40 tunnels open through it (all on A); B made
    ready; 40 more through instance 1 go mostly to B, as one balancer would send them.
    Each instance alone (the counts unshared) would split them 20/20."""
    p0 = await fleet.start(0, "wlc")
    p1 = await fleet.start(1, "wlc")
    a, b = sid(fleet, "A"), sid(fleet, "B")
    await put(fleet.admins[0], b, {"admin_state": "drain"})
    async with aiohttp.ClientSession() as s:
        first, where0 = await open_tunnels(s, p0, 40)
        assert where0 == {"A": 40}
        await put(fleet.admins[0], b, {"admin_state": "ready"})
        await wait_for(
            lambda: not server(p1, b).draining and server(p1, a).fleet_active == 40,
            3.0,
            "instance 1 to see B ready and instance 0's 40 tunnels on A",
        )
        second, where1 = await open_tunnels(s, p1, 40)
        assert where1["B"] >= 36, where1
        for ws in first + second:
            await ws.close()


async def load(proxies: list[Proxy], stop: asyncio.Event) -> tuple[int, list[str], float]:
    """Requests through every instance until ``stop``: (count, failures, slowest)."""
    failures: list[str] = []
    done = 0
    slowest = 0.0

    async def one(p: Proxy) -> None:
        nonlocal done, slowest
        # A hang guard per request: one that waited this long on anything is a failure.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    async with s.get(proxy_url(p, path="/whoami")) as r:
                        await r.read()
                        if r.status != 200:
                            failures.append(f"{r.status}")
                except (aiohttp.ClientError, TimeoutError) as exc:
                    failures.append(f"{p.fleet.name if p.fleet else '?'}: {exc!r}")
                slowest = max(slowest, time.monotonic() - t)
                done += 1

    await asyncio.gather(*(one(p) for p in proxies for _ in range(2)))
    return done, failures, slowest


async def test_redis_frozen_then_killed_and_restarted_under_load(fleet: Fleet) -> None:
    for i in range(3):
        await fleet.start(i)
    b = sid(fleet, "B")
    await put(fleet.admins[0], b, {"weight": 7})
    await wait_for(lambda: all(server(p, b).weight == 7 for p in fleet.proxies), 2.0, "weight 7")
    stop = asyncio.Event()
    loader = asyncio.get_running_loop().create_task(load(fleet.proxies, stop))
    links = [p.fleet for p in fleet.proxies]
    assert all(link is not None for link in links)
    proc = fleet.redis.proc
    assert proc is not None
    # Frozen: every command times out (the link's, never a request's).
    proc.send_signal(signal.SIGSTOP)
    await wait_for(lambda: not any(lk.up for lk in links), 5.0, "every link degraded")  # type: ignore[union-attr]
    view = await get_json(fleet.admins[1], "/-/cluster")
    assert view["state"] == "degraded"
    proc.send_signal(signal.SIGCONT)
    await wait_for(lambda: all(lk.up for lk in links), 5.0, "every link back")  # type: ignore[union-attr]
    # Killed: its data gone with it (no persistence). An override set meanwhile applies at once
    # here and reaches Redis, then the others, once it is back.
    await fleet.redis.stop_async()
    await wait_for(lambda: not any(lk.up for lk in links), 5.0, "every link degraded")  # type: ignore[union-attr]
    async with aiohttp.ClientSession() as s, s.get(f"{fleet.admins[0].url}/metrics") as r:
        assert "lbproxy_cluster_redis_up 0.0" in await r.text()
    await put(fleet.admins[2], b, {"admin_state": "drain"})
    assert server(fleet.proxies[2], b).draining
    assert not server(fleet.proxies[0], b).draining
    await fleet.redis.start_async()
    await wait_for(
        lambda: all(server(p, b).draining and server(p, b).weight == 7 for p in fleet.proxies),
        3.0,
        "the overrides back on every instance",
    )
    await wait_for(
        lambda: all(len(lk.instances) == 3 for lk in links),  # type: ignore[union-attr]
        3.0,
        "three instances seen again",
    )
    stop.set()
    done, failures, slowest = await loader
    assert failures == []
    assert done > 50
    # A hang guard, not a speed check: no request waited on Redis's timeouts.
    assert slowest < 5.0


async def hammer(proxies: list[Proxy], seconds: float) -> tuple[int, int, float]:
    """One client (127.0.0.1) sending as fast as it can through every instance for
    ``seconds``: (admitted, refused with 429, elapsed)."""
    admitted = refused = 0
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(p: Proxy) -> None:
        nonlocal admitted, refused
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
            while loop.time() - start < seconds:
                async with s.get(proxy_url(p, path="/whoami")) as r:
                    await r.read()
                    if r.status == 200:
                        admitted += 1
                    else:
                        assert r.status == 429
                        refused += 1

    await asyncio.gather(*(one(p) for p in proxies for _ in range(2)))
    return admitted, refused, loop.time() - start


async def start_limited(fleet: Fleet, limits: dict[str, Any], n: int = 3) -> list[Proxy]:
    out = []
    for i in range(n):
        doc = fleet.doc(i)
        doc["listeners"][0]["limits"] = limits
        proxy = await start_proxy(parse_config(doc))
        fleet.proxies.append(proxy)
        admin = AdminServer(proxy)
        await admin.start()
        fleet.admins.append(admin)
        out.append(proxy)
    return out


async def test_a_cluster_scope_rate_limit_holds_across_three_instances(fleet: Fleet) -> None:
    """20 requests/s (burst 20) for one client through three instances: about 20/s in all
    (each instance alone would let about 60/s through)."""
    rate, burst = 20, 20
    proxies = await start_limited(
        fleet, {"requests_per_second": rate, "burst": burst, "scope": "cluster"}
    )
    admitted, refused, elapsed = await hammer(proxies, 3.0)
    allowed = burst + rate * elapsed  # one balancer would pass this many
    # The batches let a little more through between them (see client_limits): a bound well
    # under the 3x that three unshared buckets give (3 * allowed).
    assert admitted <= 1.5 * allowed, (admitted, refused, elapsed)
    assert admitted >= 0.6 * rate * elapsed, (admitted, refused, elapsed)
    assert refused > admitted  # the client kept trying much faster than allowed


async def test_cluster_scope_on_redis_failure_open_and_closed(fleet: Fleet) -> None:
    opened = (await start_limited(fleet, {"requests_per_second": 5, "scope": "cluster"}, 1))[0]
    doc = fleet.doc(1)
    doc["listeners"][0]["limits"] = {
        "requests_per_second": 1000,
        "scope": "cluster",
        "on_cluster_failure": "closed",
    }
    closed = await start_proxy(parse_config(doc))
    fleet.proxies.append(closed)
    fleet.admins.append(AdminServer(closed))
    await fleet.admins[-1].start()
    assert (await hammer([closed], 0.2))[1] == 0  # Redis up: 1000/s is far off
    await fleet.redis.stop_async()
    links = [opened.fleet, closed.fleet]
    await wait_for(lambda: not any(lk.up for lk in links), 5.0, "both degraded")  # type: ignore[union-attr]
    admitted, refused, _ = await hammer([closed], 0.3)
    assert admitted == 0 and refused > 0  # closed: refused while Redis is away
    admitted, refused, _ = await hammer([opened], 0.3)
    assert admitted >= 5  # open: the local bucket decides (burst 5)
    # Refusals for want of Redis are counted as such. Not exactly ``refused``: a batch round
    # that tries Redis again lets the rate table decide for a moment (its 429s are not
    # fallbacks), and the count has been seen a few percent above the 429s the clients read.
    assert closed.registry.listener("web").cluster_fallbacks["closed"] > 0
    await wait_for(
        lambda: opened.registry.listener("web").cluster_fallbacks["open"] > 0,
        2.0,
        "open fallbacks counted",
    )
    await fleet.redis.start_async()
    await wait_for(lambda: all(lk.up for lk in links), 5.0, "both back")  # type: ignore[union-attr]
    await asyncio.sleep(0.3)  # a rate batch clears the refusal (a wait on an event below)
    await wait_for(lambda: not closed.ctx.edges.of("web").rates.refuse, 2.0, "refusal lifted")
    assert (await hammer([closed], 0.2))[0] > 0


async def test_cluster_scope_connections_per_client_count_across_the_fleet(fleet: Fleet) -> None:
    p0, p1 = await start_limited(fleet, {"connections_per_client": 2, "scope": "cluster"}, 2)
    async with aiohttp.ClientSession() as s:
        first, _ = await open_tunnels(s, p0, 2)
        counts = p1.ctx.edges.of("web").connections
        await wait_for(
            lambda: (counts.fleet or {}).get("127.0.0.1") == 2, 3.0, "instance 1 to see 2 open"
        )
        # The third connection of this client, through the other instance: closed at once.
        with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError)):
            await s.ws_connect(
                proxy_url(p1, path="/ws"), timeout=aiohttp.ClientWSTimeout(ws_close=5)
            )
        assert p1.registry.listener("web").connections_refused["connections_per_client"] == 1
        await first[0].close()
        await wait_for(lambda: not (counts.fleet or {}).get("127.0.0.1", 0) > 1, 3.0, "one closed")
        again, _ = await open_tunnels(s, p1, 1)
        for ws in first[1:] + again:
            await ws.close()


async def test_a_client_at_its_limit_through_this_instance_alone_may_reconnect_here(
    fleet: Fleet,
) -> None:
    """A client whose connections are all through this instance is "full" in the fleet's
    set; that must not count as connections elsewhere: one closed here and one opened again
    at once (a browser, a pool) is let in, without waiting for the next batch."""
    (p0,) = await start_limited(fleet, {"connections_per_client": 2, "scope": "cluster"}, 1)
    await wait_for(lambda: p0.fleet is not None, 5.0, "the fleet link")
    link = p0.fleet
    assert link is not None
    counts = p0.ctx.edges.of("web").connections
    async with aiohttp.ClientSession() as s:
        first, _ = await open_tunnels(s, p0, 2)
        # Two batches after both are open: one of them saw the client at its limit here.
        seen = link.limits.commands
        await wait_for(lambda: link.limits.commands >= seen + 2, 5.0, "two connection batches")
        assert (counts.fleet or {}).get("127.0.0.1", 0) == 0  # nothing of it elsewhere
        await first[0].close()
        await wait_for(lambda: counts.open.get("127.0.0.1", 0) == 1, 5.0, "one closed here")
        again, _ = await open_tunnels(s, p0, 1)
        assert p0.registry.listener("web").connections_refused["connections_per_client"] == 0
        for ws in [first[1], *again]:
            await ws.close()


async def test_an_instance_with_workers_is_part_of_the_fleet(
    fleet: Fleet, start_lbproxy: Any
) -> None:
    """``--workers 2``: each worker is a member (``<name>.<pid>``: its counts, its limits);
    the supervisor applies the fleet's overrides (and hands them to the workers) and shows
    the fleet."""
    p0 = await fleet.start(0)
    b = sid(fleet, "B")
    cluster = {"redis": fleet.redis.url, "name": "lbw", "prefix": "t22:"}
    c = await start_lbproxy([x.address for x in fleet.backends], workers=2, cluster=cluster)
    pids = set(await c.worker_pids())

    async def members() -> set[str]:
        view = await get_json(fleet.admins[0], "/-/cluster")
        return {i["name"] for i in view["instances"]}

    want = {"lb-0"} | {f"lbw.{pid}" for pid in pids}

    async def all_members() -> bool:
        return await members() == want

    await wait_for(all_members, 3.0, "lb-0 and both workers in the view")

    async def supervisor_sees_all() -> bool:
        # Its own view refreshes on its own timer: it may lag lb-0's by a refresh.
        async with c.session.get(f"{c.admin}/-/cluster") as r:
            theirs = await r.json()
        assert theirs["name"] == "lbw"
        return {i["name"] for i in theirs["instances"]} == want

    await wait_for(supervisor_sees_all, 3.0, "the supervisor's view to list the same members")
    await put(fleet.admins[0], b, {"admin_state": "drain"})

    async def drained() -> bool:
        st = await c.status()
        (shown,) = [s for s in st["server_groups"][0]["servers"] if s["id"] == b]
        return bool(shown["draining"]) and shown["override"]["set_by"] == "lb-0"

    await wait_for(drained, 2.0, "the workers' supervisor to apply lb-0's drain")
    replies = await c.spread(20)
    assert {r.body for r in replies} == {"A"}, replies
    assert server(p0, b).draining

    # Sheds both ways: a count through lb-0 (which holds none) is split over the workers by
    # their tunnels, each worker shedding its part; a fraction through the supervisor reaches
    # lb-0.
    a = sid(fleet, "A")
    link0 = p0.fleet
    assert link0 is not None

    def workers_hold(n: int) -> bool:
        held = [i.websockets.get(a, 0) for i in link0.instances if i.name.startswith("lbw.")]
        return sum(held) == n

    async def shed(base: str, body: dict[str, Any]) -> dict[str, Any]:
        async with c.session.post(f"{base}/-/servers/{a}/shed", json=body) as r:
            assert r.status == 200, await r.text()
            out: dict[str, Any] = await r.json()
            return out

    async with aiohttp.ClientSession() as s:
        url = f"http://127.0.0.1:{c.port}/ws"
        through_c = [await s.ws_connect(url) for _ in range(8)]
        ends = [asyncio.ensure_future(ws.receive()) for ws in through_c]
        await wait_for(lambda: workers_hold(8), 5.0, "lb-0 to see the workers' 8 tunnels on A")
        got = await shed(fleet.admins[0].url, {"count": 4})
        assert (got["scheduled"], got["fleet"], sum(got["parts"].values())) == (0, True, 4), got
        assert set(got["parts"]) <= {f"lbw.{pid}" for pid in pids}, got
        await wait_for(lambda: sum(t.done() for t in ends) == 4, 10.0, "the workers' 4 closes")
        assert [t.result().data for t in ends if t.done()] == [1012] * 4
        mine, _ = await open_tunnels(s, p0, 4)
        mine_ends = [asyncio.ensure_future(ws.receive()) for ws in mine]
        got = await shed(c.admin, {"fraction": 0.5})
        assert got["fleet"] is True, got
        await wait_for(lambda: sum(t.done() for t in mine_ends) == 2, 10.0, "lb-0's 2 closes")
        assert server(p0, a).stats.ws_rebalanced == 2
        for t in ends + mine_ends:
            t.cancel()
        for ws in through_c + mine:
            await ws.close()


async def test_a_redis_password_works_and_is_never_shown(
    tmp_path: Path, make_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    binary = find_redis_server()
    if binary is None:
        pytest.fail(REDIS_MISSING, pytrace=False)
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        *("--requirepass", "s3cret-pw"),
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
    )
    backend = await make_backend("A")
    started: list[Proxy] = []
    try:
        for i, password in enumerate(("s3cret-pw", "wrong-pw")):
            url = f"redis://:{password}@127.0.0.1:{port}/0"
            doc = config_doc([backend.address], cluster={"redis": url, "name": f"pw-{i}"})
            started.append(await start_proxy(parse_config(doc)))
        good, bad = (p.fleet for p in started)
        assert good is not None and bad is not None
        await wait_for(lambda: good.up and len(good.instances) == 1, 5.0, "the good one joined")
        assert not bad.up  # refused by Redis: degraded, serving on its own
        for view in (good.view(), bad.view()):
            assert view["redis"]["url"] == f"redis://***@127.0.0.1:{port}/0"
        assert "s3cret-pw" not in caplog.text and "wrong-pw" not in caplog.text
        assert "cluster: Redis unreachable" in caplog.text
    finally:
        for p in started:
            await p.close(timeout=0.5)
        proc.terminate()
        await proc.wait()


async def test_rediss_reaches_a_tls_redis(tmp_path: Path, make_backend: Any) -> None:
    """``rediss://``: the link speaks TLS to Redis, the server's certificate checked against
    the CA named in the URL (``?ssl_ca_certs=``, a redis-py connection option)."""
    binary = find_redis_server()
    if binary is None:
        pytest.fail(REDIS_MISSING, pytrace=False)
    ca = CA(str(tmp_path))
    leaf = ca.issue("redis", "127.0.0.1", ips=("127.0.0.1",))
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary,
        *("--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
        *("--tls-cert-file", leaf.cert, "--tls-key-file", leaf.key),
        *("--tls-ca-cert-file", ca.cert, "--tls-auth-clients", "no"),
        *("--save", "", "--appendonly", "no"),
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
    )
    backend = await make_backend("A")
    proxy: Proxy | None = None
    try:
        url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca.cert}"
        doc = config_doc([backend.address], cluster={"redis": url, "name": "tls-0"})
        proxy = await start_proxy(parse_config(doc))
        link = proxy.fleet
        assert link is not None
        await wait_for(lambda: link.up and len(link.instances) == 1, 5.0, "joined over TLS")
        # A plain client on the TLS port gets nothing: the link really spoke TLS.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"PING\r\n")
        with contextlib.suppress(ConnectionError):
            assert not (await asyncio.wait_for(reader.read(100), 5)).startswith(b"+PONG")
        writer.close()
    finally:
        if proxy is not None:
            await proxy.close(timeout=0.5)
        proc.terminate()
        await proc.wait()


async def test_the_rebalance_evens_out_the_fleet_s_spread(
    redis: RedisServer, make_backend: Any
) -> None:
    """lb-0 holds 20 tunnels, all on A; lb-1 holds 20, all on B (the fleet: 20/20). C is
    added by a reload on both: the fleet's excess is about 6 off A and 6 off B, lb-0 moves
    A's and lb-1 B's, and the fleet's spread reaches tolerance. Each instance evening out
    only its own tunnels would move 13 each (its 20 on one server spread over three)."""
    a, b, c = [await make_backend(n, app=recording_app) for n in ("A", "B", "C")]
    fleet = Fleet(redis, [a, b])
    group = {"health_check": {"enabled": False}}
    clients: list[Client] = []
    sessions: list[aiohttp.ClientSession] = []
    try:
        p0 = await fleet.start(0, "wlc", group=group)
        p1 = await fleet.start(1, "wlc", group=group)
        sa, sb = f"rs1/{a.address}", f"rs1/{b.address}"

        async def connect(p: Proxy, n: int) -> None:
            url = proxy_url(p, path="/ws")
            for _ in range(n):
                sessions.append(aiohttp.ClientSession())
                clients.append(Client(len(clients), url, sessions[-1]))
            await wait_for(lambda: all(cl.backend for cl in clients), 20, "clients connected")

        await put(fleet.admins[0], sb, {"admin_state": "drain"})
        await wait_for(lambda: server(p1, sb).draining, 3.0, "B draining on lb-1")
        await connect(p0, 20)
        await put(fleet.admins[0], sb, {"admin_state": "ready"})
        await put(fleet.admins[0], sa, {"admin_state": "drain"})
        await wait_for(
            lambda: server(p1, sa).draining and not server(p1, sb).draining, 3.0, "A drained"
        )
        await connect(p1, 20)
        await put(fleet.admins[0], sa, {"admin_state": "ready"})
        await wait_for(lambda: not server(p1, sa).draining, 3.0, "A ready on lb-1")
        assert [open_on(server(p, s)) for p in (p0, p1) for s in (sa, sb)] == [20, 0, 0, 20]

        grown = {**group, "rebalance": {"tolerance": 1.25, "rate": 50}}
        for i, p in enumerate((p0, p1)):
            doc = fleet.doc(i, "wlc", grown)
            doc["server_groups"]["rs1"]["servers"].append({"address": c.address})
            assert (await p.apply_config(parse_config(doc), "test")).ok
        sc = f"rs1/{c.address}"

        def fleet_spread() -> list[Load]:
            g = p0.holder.current.groups["rs1"]
            return [
                Load(s.id, sum(open_on(server(p, s.id)) for p in (p0, p1)), s.effective)
                for s in g.available()
            ]

        def settled() -> bool:
            return (
                within(fleet_spread(), 1.25)
                and all(cl.backend for cl in clients)
                and not any(p.servers.mover.rounds for p in (p0, p1))
            )

        await wait_for(settled, 30, "the fleet's spread within tolerance")
        on_c = [open_on(server(p, sc)) for p in (p0, p1)]
        assert on_c[0] > 0 and on_c[1] > 0, on_c  # both instances moved their part
        moved = [sum(s.stats.ws_rebalanced for s in p.state.servers.values()) for p in (p0, p1)]
        # Each its part (about 6), not the 13 of its own spread; slack for counts half a
        # second old between the records.
        assert all(n <= 10 for n in moved) and sum(moved) <= 16, moved
        assert server(p0, sb).stats.ws_rebalanced == 0  # lb-0 holds nothing on B
        assert server(p1, sa).stats.ws_rebalanced == 0
    finally:
        for cl in clients:
            cl.stop = True
        await asyncio.gather(*(cl.task for cl in clients), return_exceptions=True)
        for s in sessions:
            await s.close()
        await fleet.close()
    for cl in clients:
        assert cl.task.exception() is None, cl.task.exception()
        assert set(cl.codes) <= {1012}


async def test_a_shed_through_one_instance_reaches_the_others(fleet: Fleet) -> None:
    """lb-0 and lb-1 each hold 10 tunnels on A. ``fraction: 0.5`` through lb-0: lb-1 closes
    5 of its own too (1012, the shed's code). Then lb-0 holds 15 and lb-1 5: ``count: 8``
    through lb-0 is split 6 and 2 by those counts. Without the fleet lb-1 would close none.
    With Redis frozen a shed applies on the instance asked alone, and says so."""
    p0 = await fleet.start(0)
    p1 = await fleet.start(1)
    a, b = sid(fleet, "A"), sid(fleet, "B")
    await put(fleet.admins[0], b, {"admin_state": "drain"})
    await wait_for(lambda: server(p1, b).draining, 3.0, "B draining on lb-1")
    link0 = p0.fleet
    assert link0 is not None

    def seen_by_lb0(name: str, n: int) -> bool:
        return any(i.name == name and i.websockets.get(a, 0) == n for i in link0.instances)

    async def shed(body: dict[str, Any]) -> dict[str, Any]:
        url = f"{fleet.admins[0].url}/-/servers/{a}/shed"
        async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
            assert r.status == 200, await r.text()
            out: dict[str, Any] = await r.json()
            return out

    def closed(tasks: list[asyncio.Task[aiohttp.WSMessage]]) -> list[Any]:
        return [t.result().data for t in tasks if t.done()]

    async with aiohttp.ClientSession() as s:
        ws0, where0 = await open_tunnels(s, p0, 10)
        ws1, where1 = await open_tunnels(s, p1, 10)
        assert where0 == where1 == {"A": 10}
        ends0 = [asyncio.ensure_future(ws.receive()) for ws in ws0]
        ends1 = [asyncio.ensure_future(ws.receive()) for ws in ws1]

        got = await shed({"fraction": 0.5, "over": "1s"})
        assert got == {
            "result": "ok",
            "server": a,
            "fraction": 0.5,
            "scheduled": 5,
            "over": 1.0,
            "fleet": True,
        }
        await wait_for(lambda: len(closed(ends1)) == 5, 10.0, "lb-1 to shed 5 of its own")
        await wait_for(lambda: len(closed(ends0)) == 5, 10.0, "lb-0 to shed 5")
        assert closed(ends0) + closed(ends1) == [1012] * 10
        await wait_for(lambda: not p1.servers.mover.sheds, 10.0, "lb-1's shed finished")
        assert server(p1, a).stats.ws_rebalanced == 5  # once, not again on a later exchange

        more, _ = await open_tunnels(s, p0, 10)
        ends0 += [asyncio.ensure_future(ws.receive()) for ws in more]
        await wait_for(
            lambda: seen_by_lb0("lb-1", 5) and seen_by_lb0("lb-0", 15), 5.0, "the fleet's counts"
        )
        got = await shed({"count": 8})
        assert got["parts"] == {"lb-0": 6, "lb-1": 2}, got
        assert (got["count"], got["scheduled"], got["fleet"]) == (8, 6, True)
        await wait_for(lambda: len(closed(ends1)) == 7, 10.0, "lb-1 to shed its 2")
        await wait_for(lambda: len(closed(ends0)) == 11, 10.0, "lb-0 to shed its 6")
        await wait_for(lambda: not p1.servers.mover.sheds, 10.0, "lb-1's shed finished")
        assert server(p1, a).stats.ws_rebalanced == 7
        assert server(p0, a).stats.ws_rebalanced == 11

        # Redis frozen: the shed applies on the instance asked only, all of it.
        assert fleet.redis.proc is not None
        fleet.redis.proc.send_signal(signal.SIGSTOP)
        await wait_for(lambda: not link0.up, 10.0, "lb-0 to see Redis down")
        got = await shed({"count": 2})
        assert (got["scheduled"], got["fleet"]) == (2, False), got
        assert "parts" not in got
        await wait_for(lambda: len(closed(ends0)) == 13, 10.0, "lb-0 to shed 2 more")
        fleet.redis.proc.send_signal(signal.SIGCONT)
        assert server(p1, a).stats.ws_rebalanced == 7
        for t in ends0 + ends1:
            t.cancel()
        for ws in ws0 + ws1 + more:
            await ws.close()
