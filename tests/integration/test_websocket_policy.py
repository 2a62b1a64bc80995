"""listeners[].websocket: message policies enforced on real tunnels (issue 16).

Real aiohttp clients and backends through the proxy: a client sending a message over
``max_message_size`` gets close 1009 and its server 1001; a client over the message rate gets
1008; server-to-client traffic is never limited; a well-behaved client on the same listener
goes on unaffected throughout.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType

from lbproxy.config import parse_config
from tests.integration.test_drain import CLOSES, RECEIVED, echo, ws_app
from tests.support import config_doc, proxy_url, wait_for

NO_CHECKS = {"health_check": {"enabled": False}}


def policy_doc(servers: list[str], **policy: object) -> dict[str, object]:
    return config_doc(servers, listener={"websocket": policy}, group=NO_CHECKS)


async def test_too_big_gets_1009_and_its_server_1001(make_backend, make_proxy):
    a = await make_backend("A", app=ws_app)
    proxy = await make_proxy(policy_doc([a.address], max_message_size="1KiB"))
    async with aiohttp.ClientSession() as s:
        good = await s.ws_connect(proxy_url(proxy, path="/ws"))
        bad = await s.ws_connect(proxy_url(proxy, path="/ws"))
        assert await echo(bad, "x" * 1024) == "A:" + "x" * 1024  # exactly the limit passes
        await bad.send_str("y" * 1025)
        msg = await asyncio.wait_for(bad.receive(), 10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
        await bad.close()
        await wait_for(lambda: a.app[CLOSES] == [1001], what="the server to see 1001")
        assert await echo(good, "fine") == "A:fine"
        stats = proxy.registry.listener("web")
        assert stats.ws_policy == {"max_message_size": 1, "messages_per_second": 0}
        assert stats.ws_closes["policy"] == 1
        await good.close()


async def test_over_the_message_rate_gets_1008(make_backend, make_proxy):
    a = await make_backend("A", app=ws_app)
    proxy = await make_proxy(policy_doc([a.address], messages_per_second=2, burst=5))
    async with aiohttp.ClientSession() as s:
        good = await s.ws_connect(proxy_url(proxy, path="/ws"))
        flood = await s.ws_connect(proxy_url(proxy, path="/ws"))
        for i in range(50):  # far past the burst, faster than 2 per second
            await flood.send_str(f"m{i}")
        msg = await asyncio.wait_for(flood.receive(), 10)
        while msg.type == WSMsgType.TEXT:  # echoes that made it before the close
            msg = await asyncio.wait_for(flood.receive(), 10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1008)
        await flood.close()
        await wait_for(lambda: a.app[CLOSES] == [1001], what="the server to see 1001")
        # The burst reached the server (a refill of a token or two on a slow machine at
        # most), the rest did not.
        got = a.app[RECEIVED]
        assert 5 <= len(got) <= 8 and got == [f"m{i}" for i in range(len(got))]
        assert await echo(good, "calm") == "A:calm"
        assert proxy.registry.listener("web").ws_policy["messages_per_second"] == 1
        await good.close()


async def test_server_to_client_is_never_limited(make_backend, make_proxy):
    a = await make_backend("A")  # the default test backend echoes whatever it gets
    proxy = await make_proxy(policy_doc([a.address], max_message_size=100_000))
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
        await ws.send_str("x" * 100_000)
        msg = await ws.receive()
        assert msg.type == WSMsgType.TEXT and len(msg.data) == 100_000
        await ws.close()


async def test_a_reload_changes_the_policy_of_new_tunnels_only(make_backend, make_proxy):
    a = await make_backend("A", app=ws_app)
    doc = policy_doc([a.address], max_message_size=100)
    proxy = await make_proxy(doc)
    async with aiohttp.ClientSession() as s:
        old = await s.ws_connect(proxy_url(proxy, path="/ws"))
        doc["listeners"][0]["websocket"] = {"max_message_size": 1000}  # type: ignore[index]
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        new = await s.ws_connect(proxy_url(proxy, path="/ws"))
        assert await echo(new, "z" * 500) == "A:" + "z" * 500
        await old.send_str("z" * 500)  # the tunnel keeps the policy it started with
        msg = await asyncio.wait_for(old.receive(), 10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
        await old.close()
        await new.close()
