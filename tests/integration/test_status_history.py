"""GET /status/history and the status page's charts, in a real browser under traffic.

The admin here samples every 250 ms (the resolutions are injected; the defaults are every 5 s
and every minute) so a test sees many points in seconds. A server killed during the test must
show as a health event and as a gap in its series, in the JSON and in the drawn charts.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from lbproxy.control.admin import AdminServer
from lbproxy.control.loading import load_config
from tests.cdp import Chromium
from tests.support import Backend, config_doc, proxy_url, raw_websocket, wait_for

FAST = ((0.25, 240), (1.0, 60))
CHECKS = {
    "health_check": {
        "interval": "100ms",
        "path": "/health",
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
    }
}
ROOT = Path(__file__).resolve().parents[2]
# Every run saves the screenshot under build/ (looked at when the test fails); the README's copy
# in docs/ is refreshed on purpose, with LBPROXY_SCREENSHOT=docs, so a test run leaves the
# checkout clean.
SHOT = (
    ROOT / "docs" / "status-page.png"
    if os.environ.get("LBPROXY_SCREENSHOT") == "docs"
    else ROOT / "build" / "status-page.png"
)


@pytest.fixture
async def fast_admin() -> AsyncIterator[Any]:
    started: list[AdminServer] = []

    async def make(proxy: Any) -> AdminServer:
        admin = AdminServer(proxy, resolutions=FAST)
        await admin.start()
        started.append(admin)
        return admin

    yield make
    for a in started:
        await a.close()


async def history(admin: AdminServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{admin.address}/status/history") as r:
        assert r.status == 200 and r.content_type == "application/json"
        data: dict[str, Any] = await r.json()
        return data


@contextlib.asynccontextmanager
async def traffic(proxy: Any) -> AsyncIterator[None]:
    """Requests and WebSocket messages, steadily, until the block ends."""

    async def run() -> None:
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
            while True:
                async with s.get(proxy_url(proxy, path="/whoami")) as r:
                    await r.read()
                if ws.closed:  # its server was killed: open another
                    ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
                await ws.send_str("whoami")
                await ws.receive()
                await asyncio.sleep(0.02)

    task = asyncio.get_running_loop().create_task(run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await task


def runs(values: list[float | None]) -> int:
    """Unbroken stretches of values (a gap between two makes 2)."""
    out, pen = 0, False
    for v in values:
        if v is not None and not pen:
            out += 1
        pen = v is not None
    return out


async def test_history_json_has_series_events_and_a_gap_for_a_killed_server(
    tmp_path, make_backend, make_proxy, fast_admin
):
    a = await make_backend("A")
    b = await make_backend("B")
    path = tmp_path / "lbproxy.yaml"
    path.write_text(yaml.safe_dump(config_doc([a.address, b.address], group=CHECKS)))
    proxy = await make_proxy(load_config(str(path)), str(path))
    admin = await fast_admin(proxy)
    sid_b = f"rs1/{b.address}"
    async with traffic(proxy):

        async def b_has_traffic() -> bool:
            series = (await history(admin))["resolutions"][0]["servers"][sid_b]["series"]
            return any(v for v in series["requests"])

        await wait_for(b_has_traffic, what="B's requests in the history")
        b_port = b.port
        await b.stop()

        async def b_down_recorded() -> bool:
            h = await history(admin)
            series = h["resolutions"][0]["servers"][sid_b]["series"]
            return series["up"][-1] == 0 and series["requests"][-1] is None

        await wait_for(b_down_recorded, what="B down in the history")
        b = await Backend(b.app, b_port).start()
        try:

            async def b_back() -> bool:
                s = (await history(admin))["resolutions"][0]["servers"][sid_b]["series"]
                return runs(s["requests"]) >= 2 and s["requests"][-1] is not None

            await wait_for(b_back, what="B's series to resume after a gap")
        finally:
            await b.stop()
        async with aiohttp.ClientSession() as s:
            url = f"http://{admin.address}/-/servers/rs1/{a.address}"
            async with s.put(url, json={"weight": 3}) as r:
                assert r.status == 200
            async with s.put(url, json={"admin_state": "drain"}) as r:
                assert r.status == 200
            path.write_text("listeners: {\n")
            async with s.post(f"http://{admin.address}/-/reload", json={}) as r:
                assert r.status == 400
            path.write_text(yaml.safe_dump(config_doc([a.address], group=CHECKS)))
            async with s.post(f"http://{admin.address}/-/reload", json={}) as r:
                assert r.status == 200

    h = await history(admin)
    fine, coarse = h["resolutions"]
    assert (fine["interval"], coarse["interval"]) == (0.25, 1.0)
    assert (fine["points"], coarse["points"]) == (240, 60)
    assert len(fine["times"]) >= 3 and fine["times"] == sorted(fine["times"])
    a_series = fine["servers"][f"rs1/{a.address}"]
    assert a_series["group"] == "rs1" and a_series["address"] == a.address
    assert any(v and v > 0 for v in a_series["series"]["requests"])
    assert any(v is not None for v in a_series["series"]["p99"])
    group = fine["groups"]["rs1"]["series"]
    assert 2 in group["servers_up"] and 1 in group["servers_up"]
    assert any(v and v > 0 for v in group["requests"])
    web = fine["listeners"]["web"]["series"]
    assert any(v and v > 0 for v in web["ws_messages_in"])
    assert any(v and v > 0 for v in web["ws_messages_out"])
    assert any(v and v > 0 for v in web["tunnels"])
    kinds = [(e["kind"], e["server"]) for e in h["events"]]
    assert ("health", sid_b) in kinds  # down, then up again
    assert kinds.count(("health", sid_b)) >= 2
    assert kinds.count(("api", f"rs1/{a.address}")) == 2
    assert ("drain", f"rs1/{a.address}") in kinds
    failed, applied = [e["text"] for e in h["events"] if e["kind"] == "reload"]
    assert failed.startswith("reload (admin) FAILED: ") and "YAML syntax error" in failed
    assert applied.startswith("reload (admin) applied: ") and f"removed: rs1/{b.address}" in applied
    down = next(e for e in h["events"] if e["kind"] == "health" and "DOWN" in e["text"])
    assert down["group"] == "rs1" and fine["times"][0] <= down["time"] <= h["time"]


async def raw_tunnel(proxy: Any) -> tuple[asyncio.StreamWriter, str]:
    """A WebSocket through the proxy by hand, to end it without a close frame: the writer,
    and the name of the backend it reached."""
    reader, writer = await raw_websocket(proxy)
    writer.write(b"\x81\x86\x00\x00\x00\x00whoami")  # masked with a zero key
    first, length = await asyncio.wait_for(reader.readexactly(2), 10)
    assert first == 0x81 and length < 126
    return writer, (await reader.readexactly(length)).decode()


def total(fine: dict[str, Any], sid: str, name: str) -> float:
    """What a rate series adds up to over the history: the counter's growth since the first
    point (each rate times its interval)."""
    times, values = fine["times"], fine["servers"][sid]["series"][name]
    steps = zip(times, times[1:], values[1:], strict=False)
    return sum(v * (t - t0) for t0, t, v in steps if v is not None)


async def test_a_servers_websocket_messages_and_closes_by_code_are_in_its_history(
    make_backend, make_proxy, fast_admin
):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(config_doc([a.address, b.address]))
    admin = await fast_admin(proxy)
    sid = {"A": f"rs1/{a.address}", "B": f"rs1/{b.address}"}

    async def points(n: int) -> bool:
        return len((await history(admin))["resolutions"][0]["times"]) >= n

    await wait_for(lambda: points(2), what="the history's first points")  # nothing before
    expected = {name: {"in": 0, "out": 0} for name in sid}
    async with aiohttp.ClientSession() as s:
        # A long-lived tunnel: its messages show as its server's rate while it is open.
        ws1 = await s.ws_connect(proxy_url(proxy, path="/ws"))
        await ws1.send_str("whoami")
        one = (await ws1.receive()).data
        for i in range(50):
            await ws1.send_str(f"m{i}")
            assert (await ws1.receive()).data == f"m{i}"
        expected[one]["in"] += 51
        expected[one]["out"] += 51

        async def live_rate() -> bool:
            series = (await history(admin))["resolutions"][0]["servers"][sid[one]]["series"]
            return any(v for v in series["ws_messages_in"])

        await wait_for(live_rate, what="an open tunnel's messages in its server's history")
        assert not ws1.closed
        # 1000: the client closes; 1001: the server goes away; 1006: no close frame at all.
        await ws1.close()
        assert ws1.close_code == 1000
        ws2 = await s.ws_connect(proxy_url(proxy, path="/ws"))
        await ws2.send_str("whoami")
        two = (await ws2.receive()).data
        await ws2.send_str("close:1001")
        assert (await ws2.receive()).data == 1001
        await ws2.close()
        expected[two]["in"] += 2
        expected[two]["out"] += 1
    writer, three = await raw_tunnel(proxy)
    writer.transport.abort()
    expected[three]["in"] += 1
    expected[three]["out"] += 1
    want = {name: {"1000": 0, "1001": 0, "1006": 0} for name in sid}
    for name, code in ((one, "1000"), (two, "1001"), (three, "1006")):
        want[name][code] += 1

    async def closes_recorded() -> bool:
        fine = (await history(admin))["resolutions"][0]
        return all(
            round(total(fine, sid[name], f"closes_{code}")) == n
            for name, codes in want.items()
            for code, n in codes.items()
        ) and all(not ss.ws_active.get("web") for ss in proxy.registry.servers.values())

    await wait_for(closes_recorded, what="the three closes in their servers' histories")
    fine = (await history(admin))["resolutions"][0]
    for name in sid:
        # Every message counted once: while its tunnel was open, then folded in as it ended.
        for way in ("in", "out"):
            got = total(fine, sid[name], f"ws_messages_{way}")
            assert got == pytest.approx(expected[name][way], abs=0.01), (name, way)
        assert total(fine, sid[name], "closes_other") == 0
    group = fine["groups"]["rs1"]["series"]
    assert round(sum(total(fine, sid[n], "closes_1006") for n in sid)) == 1
    assert any(v and v > 0 for v in group["ws_messages_in"])
    # The same ends in /metrics, for the alert on dropped tunnels (deploy/prometheus).
    async with aiohttp.ClientSession() as s, s.get(f"http://{admin.address}/metrics") as r:
        text = await r.text()
    address = {"A": a.address, "B": b.address}
    for name, codes in want.items():
        for code, n in codes.items():
            line = (
                f'lbproxy_websocket_ends_total{{class="{code}",server="{address[name]}",'
                f'server_group="rs1"}} {float(n)}'
            )
            assert line in text, (line, [x for x in text.splitlines() if "ends_total" in x])


CHARTS_JS = """
[...document.querySelectorAll('#charts .chart')].map(c => ({
  row: c.parentElement.dataset.group || ('listener ' + c.parentElement.dataset.listener),
  title: c.dataset.chart,
  width: c.getBoundingClientRect().width,
  series: Object.fromEntries([...c.querySelectorAll('path.line')].map(p =>
    [p.dataset.series, {points: +p.dataset.points, runs: +p.dataset.runs,
                        colour: getComputedStyle(p).stroke}])),
  events: [...c.querySelectorAll('line.event')].map(l => ({
    kind: l.dataset.kind, text: l.querySelector('title').textContent})),
}))
"""
SPARKS_JS = """
Object.fromEntries([...document.querySelectorAll('td.spark')].map(td => {
  const p = td.querySelector('path.line');
  return [td.dataset.id, p ? {points: +p.dataset.points, runs: +p.dataset.runs,
    events: [...td.querySelectorAll('line.event')].map(l => l.dataset.kind)} : null];
}))
"""


async def test_the_page_draws_the_history_in_a_browser(
    tmp_path, make_backend, make_proxy, fast_admin
):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(config_doc([a.address, b.address], group=CHECKS))
    admin = await fast_admin(proxy)
    sid_a, sid_b = f"rs1/{a.address}", f"rs1/{b.address}"
    async with traffic(proxy), Chromium.launch(tmp_path / "profile") as browser:
        page = await browser.page()
        await page.navigate(f"http://{admin.address}/")
        await wait_for(lambda: len(admin.history.history.resolutions[0].view()["times"]) > 12)
        b_port = b.port
        await b.stop()  # killed under traffic

        async def b_down() -> bool:
            h = await history(admin)
            return h["resolutions"][0]["servers"][sid_b]["series"]["up"][-3:] == [0, 0, 0]

        await wait_for(b_down, what="B down for a few points")
        b = await Backend(b.app, b_port).start()
        try:

            async def drawn() -> bool:
                sparks = await page.evaluate(SPARKS_JS)
                return bool(sparks.get(sid_b)) and sparks[sid_b]["runs"] >= 2

            await wait_for(drawn, timeout=10, what="the page to draw B's gap and return")
            await page.evaluate("void 0")
            charts = await page.evaluate(CHARTS_JS)
            sparks = await page.evaluate(SPARKS_JS)
            SHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(SHOT, width=1280, height=900)
        finally:
            await b.stop()

        title = await page.evaluate("document.getElementById('history-title').textContent")
        assert title == "Last 60 seconds (a point every 0.25 s)"
        by_title = {(c["row"], c["title"]): c for c in charts}
        req = by_title[("rs1", "requests and errors /s")]
        assert set(req["series"]) == {"requests", "5xx", "failed connects"}
        assert req["series"]["requests"]["points"] > 10
        lat = by_title[("rs1", "latency (ms)")]
        assert set(lat["series"]) == {"p50", "p99"} and lat["series"]["p99"]["points"] > 5
        conn = by_title[("rs1", "connections and tunnels")]
        assert conn["series"]["tunnels"]["points"] > 5
        by_server = by_title[("rs1", "WebSocket messages /s by server")]
        assert set(by_server["series"]) == {a.address, b.address}
        assert all(s["points"] > 5 for s in by_server["series"].values()), by_server
        msgs = by_title[("listener web", "WebSocket messages /s")]
        assert msgs["series"]["client to server"]["points"] > 5
        assert set(by_title[("listener web", "WebSocket closes /s by code")]["series"]) == {
            "1000",
            "1001",
            "1006",
            "other",
        }
        # The kill is a mark with its text on every chart of the group, and a gap in B's line.
        marks = [e for e in req["events"] if e["kind"] == "health"]
        assert any(sid_b in e["text"] and "DOWN" in e["text"] for e in marks), req["events"]
        assert sparks[sid_b]["runs"] >= 2 and "health" in sparks[sid_b]["events"]
        assert sparks[sid_a]["runs"] == 1 and sparks[sid_a]["points"] > 10
        # Distinct colours per series; 3 charts side by side at 1280 px.
        colours = {s["colour"] for s in req["series"].values()}
        assert len(colours) == 3, colours
        assert all(300 < c["width"] < 500 for c in charts), [c["width"] for c in charts]

        # Dark scheme: the page follows it.
        light_bg = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        await page.send(
            "Emulation.setEmulatedMedia",
            features=[{"name": "prefers-color-scheme", "value": "dark"}],
        )
        dark_bg = await page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert brightness(dark_bg) < 60 < 200 < brightness(light_bg), (dark_bg, light_bg)

        # A phone: one chart per row, nothing wider than the screen but the tables' scroll.
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            width=390,
            height=844,
            deviceScaleFactor=2,
            mobile=True,
        )
        await page.navigate(f"http://{admin.address}/")
        phone = await page.evaluate(CHARTS_JS)
        assert phone and all(c["width"] <= 390 for c in phone), [c["width"] for c in phone]
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390

        # Without JavaScript: today's tables, no charts.
        await page.send("Emulation.setScriptExecutionDisabled", value=True)
        await page.navigate(f"http://{admin.address}/")
        assert await page.evaluate("document.querySelectorAll('tr.server').length") == 2
        assert await page.evaluate("document.getElementById('history').hidden") is True
        assert await page.evaluate("document.querySelectorAll('#charts svg').length") == 0


def brightness(css: str) -> float:
    r, g, b = (float(x) for x in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
    return (r + g + b) / 3
