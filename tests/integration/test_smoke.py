"""A first end-to-end check of the harness: round-robin over two real backends."""

import aiohttp

from tests.support import config_doc, proxy_url


async def test_round_robin_alternates(make_backend, make_proxy):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(config_doc([a.address, b.address]))
    seen = []
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(proxy_url(proxy, path="/whoami")) as r:
                assert r.status == 200
                seen.append(await r.text())
    assert seen in (["A", "B"] * 3, ["B", "A"] * 3)


async def test_runs_on_uvloop():
    import asyncio

    import uvloop

    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
