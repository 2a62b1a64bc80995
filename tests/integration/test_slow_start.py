"""Slow start end to end: a server added by a reload, or back UP after being down, takes a
share of requests that grows over ``slow_start``; the ramp shows in /-/servers and /metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from lbproxy.config import parse_config
from tests.support import config_doc, proxy_url, wait_for

WINDOW = 5.0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("scheduler", ["wlc", "rr"])
async def test_a_joining_server_ramps_up(make_backend, make_proxy, make_admin, scheduler):
    a, b, c = [await make_backend(n) for n in ("A", "B", "C")]
    group = {
        "scheduler": scheduler,
        "health_check": {"enabled": False},
        "slow_start": f"{WINDOW:g}s",
    }
    doc = config_doc([a.address, b.address], group=group)
    proxy = await make_proxy(doc)
    admin = await make_admin(proxy)
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:

        async def names(n: int) -> list[str]:
            out = []
            for _ in range(n):
                async with s.get(proxy_url(proxy, path="/whoami")) as r:
                    out.append(await r.text())
            return out

        assert set(await names(10)) == {"A", "B"}  # the servers there at start: no ramp
        doc["server_groups"]["rs1"]["servers"].append({"address": c.address})
        assert (await proxy.apply_config(parse_config(doc), "test")).ok
        started = loop.time()
        early: list[str] = []
        view = {}
        while loop.time() - started < WINDOW / 5:
            early += await names(5)
            if not view:
                async with s.get(f"http://{admin.address}/-/servers") as r:
                    view = {x["address"]: x for x in await r.json()}
                async with s.get(f"http://{admin.address}/metrics") as r:
                    metrics = await r.text()
                async with s.get(f"http://{admin.address}/") as r:
                    page = await r.text()
        await wait_for(lambda: loop.time() - started > WINDOW, WINDOW + 1, "the window's end")
        late = await names(90)

    assert 0 <= view[c.address]["slow_start"] < 0.5, view[c.address]
    assert view[c.address]["effective_weight"] < 50
    assert view[a.address]["slow_start"] is None and view[a.address]["effective_weight"] == 100
    assert "(slow start " in page
    gauge = f'lbproxy_backend_effective_weight{{server="{c.address}",server_group="rs1"}}'
    assert gauge in metrics
    early_share = early.count("C") / len(early)
    late_share = late.count("C") / len(late)
    # Full share 1/3: well under it in the first fifth (the ramp is at most 1/5 there), and
    # all of it once the window is over.
    assert len(early) >= 10
    assert early_share < 1 / 6, (early_share, len(early))
    assert 0.25 <= late_share <= 0.42, late_share


@pytest.mark.timeout(90)
async def test_a_server_back_up_ramps_up_again(make_backend, make_proxy):
    a, b = await make_backend("A"), await make_backend("B")
    check = {
        "interval": "100ms",
        "timeout": "1s",
        "path": "/health",
        "healthy_threshold": 1,
        "unhealthy_threshold": 1,
    }
    group = {"scheduler": "wrr", "health_check": check, "slow_start": "30s"}
    proxy = await make_proxy(config_doc([a.address, b.address], group=group))
    srv = proxy.holder.current.groups["rs1"].by_id[f"rs1/{b.address}"]
    assert srv.ramp_since is None  # at start: no ramp
    await b.stop()
    await wait_for(lambda: srv.health.state.value == "down", 10, "B down")
    assert srv.ramp_since is None
    await b.start()
    await wait_for(lambda: srv.health.state.value == "up", 10, "B up again")
    assert srv.ramp_since is not None
    assert srv.effective < srv.weight * 16 // 2
