"""The admin listener's /status JSON, /healthz, and the HTML status page in a real browser.

The page is loaded in Debian's headless chromium over the DevTools protocol (tests/cdp.py):
a row per server with its address, the state as text and as a colour, and the page keeps
itself current without anyone reloading it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from typing import Any

import aiohttp
import yaml

from lbproxy.control.admin import AdminServer
from lbproxy.control.loading import load_config
from tests.cdp import Chromium
from tests.support import Backend, config_doc, expected_build, proxy_url, wait_for

SCREENSHOT = "/tmp/lbproxy-status.png"
CHECKS = {
    "health_check": {
        "interval": "100ms",
        "path": "/health",
        "unhealthy_threshold": 1,
        "healthy_threshold": 1,
    }
}


async def fetch_status(admin: AdminServer) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://{admin.address}/status") as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        data: dict[str, Any] = await r.json()
        return data


def servers_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["address"]: s for g in status["server_groups"] for s in g["servers"]}


async def test_status_json_and_page_say_which_build_runs(make_backend, make_proxy, make_admin):
    a = await make_backend("A")
    admin = await make_admin(await make_proxy(config_doc([a.address])))
    st = await fetch_status(admin)
    assert (st["version"], st["build"]) == ("0.1.0", expected_build())
    async with aiohttp.ClientSession() as s, s.get(f"http://{admin.address}/") as r:
        assert r.status == 200
        page = await r.text()
    assert f"<h1>lbproxy 0.1.0 <small class=build>{expected_build()}</small></h1>" in page


async def test_status_json_describes_listeners_groups_servers_and_config(
    tmp_path, make_backend, make_proxy, make_admin
):
    a = await make_backend("A")
    b = await make_backend("B")
    path = tmp_path / "lbproxy.yaml"
    path.write_text(yaml.safe_dump(config_doc([a.address, b.address], group=CHECKS)))
    proxy = await make_proxy(load_config(str(path)), str(path))
    admin = await make_admin(proxy)
    async with aiohttp.ClientSession() as s:
        assert (await (await s.get(f"http://{admin.address}/healthz")).text()).strip() == "ok"
        for _ in range(4):
            async with s.get(proxy_url(proxy, path="/whoami")) as r:
                assert r.status == 200
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
        await ws.send_str("whoami")
        ws_backend = await ws.receive_str()

        st = await fetch_status(admin)
        assert st["config"] == {
            "path": str(path),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        assert st["last_reload"]["success"] is True
        assert abs(st["last_reload"]["time"] - time.time()) < 30
        assert abs(st["time"] - time.time()) < 5
        (web,) = st["listeners"]
        assert web["name"] == "web" and web["server_group"] == "rs1"
        assert web["bind"] == str(proxy.listeners.address("web"))
        assert web["websockets_active"] == 1
        assert web["connections_active"] >= 1  # the tunnel, plus any pooled keep-alive ones
        assert web["requests_total"] == 5  # four GETs and the handshake
        (group,) = st["server_groups"]
        assert (group["name"], group["scheduler"], group["servers_up"]) == ("rs1", "rr", 2)
        servers = servers_of(st)
        assert set(servers) == {a.address, b.address}
        for backend in (a, b):
            srv = servers[backend.address]
            assert srv["id"] == f"rs1/{backend.address}"
            assert srv["state"] == "up" and srv["checked"] is True
            assert srv["last_check"] == "200 OK"
            assert 0 <= srv["last_check_latency"] < 1
            assert srv["health_checks"]["success"] >= 1
            tunnels = 1 if backend.name == ws_backend else 0
            assert srv["websockets_active"] == tunnels
            assert srv["active_connections"] == tunnels  # requests done, tunnel open
        assert {k: servers[k]["requests_total"] for k in servers} == {
            a.address: 2 + (ws_backend == "A"),
            b.address: 2 + (ws_backend == "B"),
        }
        await ws.close()

        # A backend stops: the next checks say why it is down.
        await b.stop()

        async def b_down() -> bool:
            return servers_of(await fetch_status(admin))[b.address]["state"] == "down"

        await wait_for(b_down, what="B to be reported down")
        st = await fetch_status(admin)
        srv_b = servers_of(st)[b.address]
        assert srv_b["last_check"] == "refused"
        assert srv_b["health_checks"]["failure"] >= 1
        assert st["server_groups"][0]["servers_up"] == 1

        # A failed reload is reported with its time and why; the hash stays the running one.
        digest = st["config"]["sha256"]
        path.write_text("listeners: {\n")
        t0 = time.time()
        async with s.post(f"http://{admin.address}/-/reload", json={}) as r:
            assert r.status == 400
        st = await fetch_status(admin)
        assert st["last_reload"]["success"] is False
        assert st["last_reload"]["time"] >= t0
        assert st["last_reload"]["message"]
        assert st["config"]["sha256"] == digest

        # A good reload: new hash, success.
        path.write_text(yaml.safe_dump(config_doc([a.address], group=CHECKS)))
        async with s.post(f"http://{admin.address}/-/reload", json={}) as r:
            assert r.status == 200
        st = await fetch_status(admin)
        assert st["last_reload"]["success"] is True
        assert st["config"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert set(servers_of(st)) == {a.address}


async def test_admin_endpoints_are_not_served_on_the_proxied_listener(
    make_backend, make_proxy, make_admin
):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    await make_admin(proxy)
    async with aiohttp.ClientSession() as s:
        for path in ("/status", "/", "/healthz"):
            async with s.get(proxy_url(proxy, path=path)) as r:
                assert r.status == 404  # the backend's answer: it has none of these
        async with s.post(proxy_url(proxy, path="/-/reload")) as r:
            assert r.status == 404
    assert [(m, p) for m, p, _ in a.requests if p != "/health"] == [
        ("GET", "/status"),
        ("GET", "/"),
        ("GET", "/healthz"),
        ("POST", "/-/reload"),
    ]


ROWS_JS = """
[...document.querySelectorAll('tr.server')].map(r => {
  const state = r.querySelector('.state');
  const names = [...r.closest('table').rows[0].cells].map(c => c.textContent.trim());
  return {
    cells: Object.fromEntries([...r.cells].map((c, i) => [names[i], c.textContent.trim()])),
    server: r.dataset.server,
    classes: [...r.classList],
    text: r.innerText,
    state: state.textContent.trim(),
    colour: getComputedStyle(state).backgroundColor,
    rate: r.querySelector('td.rate').textContent.trim(),
  };
})
"""
LISTENER_RATES_JS = """
[...document.querySelectorAll('tr.listener td.rate')].map(td => td.textContent.trim())
"""


def rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(x) for x in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
    return r, g, b


def number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


async def test_status_page_in_a_browser(tmp_path, make_backend, make_proxy, make_admin):
    a = await make_backend("A")
    b = await make_backend("B")
    proxy = await make_proxy(config_doc([a.address, b.address], group=CHECKS))
    admin = await make_admin(proxy)
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.get(proxy_url(proxy, path="/whoami")) as r:
                assert r.status == 200
    b_port = b.port
    await b.stop()

    async def b_down() -> bool:
        return servers_of(await fetch_status(admin))[b.address]["state"] == "down"

    await wait_for(b_down, what="B to be reported down")

    async with Chromium.launch(tmp_path / "profile") as browser, aiohttp.ClientSession() as s:
        page = await browser.page()
        await page.navigate(f"http://{admin.address}/")
        assert "lbproxy" in await page.evaluate("document.title")
        rows = {r["server"]: r for r in await page.evaluate(ROWS_JS)}
        assert set(rows) == {a.address, b.address}
        up, down = rows[a.address], rows[b.address]
        assert a.address in up["text"] and b.address in down["text"]
        assert "up" in up["classes"] and up["state"] == "UP"
        assert "down" in down["classes"] and down["state"] == "DOWN"
        # Coloured: green for up, red for down.
        r, g, bl = rgb(up["colour"])
        assert g > r and g > bl, up["colour"]
        r, g, bl = rgb(down["colour"])
        assert r > g and r > bl, down["colour"]
        # Counts: round robin split the six requests before B stopped.
        assert up["cells"]["requests"] == "3" and down["cells"]["requests"] == "3"
        assert up["cells"]["last check"] == "200 OK" and down["cells"]["last check"] == "refused"
        # No rate before a second look.
        assert up["rate"] == "-"

        # Steady traffic: after the next refresh the page shows requests per second.
        async def traffic() -> None:
            while True:
                async with s.get(proxy_url(proxy, path="/whoami")) as r:
                    assert await r.text() == "A"
                await asyncio.sleep(0.02)

        task = asyncio.get_running_loop().create_task(traffic())
        try:

            async def rates_shown() -> bool:
                rows = {r["server"]: r for r in await page.evaluate(ROWS_JS)}
                a_rate = number(rows.get(a.address, {}).get("rate", "-"))
                b_rate = number(rows.get(b.address, {}).get("rate", "-"))
                return a_rate is not None and a_rate > 0 and b_rate == 0

            await wait_for(rates_shown, timeout=10, what="the page to show a rate for A")
            listener_rates = [number(x) for x in await page.evaluate(LISTENER_RATES_JS)]
            assert all(x is not None and x > 0 for x in listener_rates), listener_rates
            await page.screenshot(SCREENSHOT)  # for a person to look at; not asserted
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        # The page keeps itself current: B comes back and the open page shows it.
        restarted = await Backend(b.app, b_port).start()
        try:

            async def page_shows_b_up() -> bool:
                rows = {r["server"]: r for r in await page.evaluate(ROWS_JS)}
                return rows.get(b.address, {}).get("state") == "UP"

            await wait_for(page_shows_b_up, timeout=10, what="the page to show B up again")
        finally:
            await restarted.stop()
