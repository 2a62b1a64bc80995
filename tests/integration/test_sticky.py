"""Session persistence through a live proxy (issue 7): insert and server cookies.

``type: insert``: the proxy sets a cookie (``SERVERID`` unless ``cookie`` says otherwise, with
Max-Age ``cookie_timeout``, 1000 s by default) naming the server by an opaque token, and
sends every request carrying it, WebSocket upgrades included, to that server. ``type:
server``: the backend's own cookie (here ``SESSIONID``) pins the client to the server that
set it. Either way, when the pinned server is down or gone the request goes to another
server and the client ends up pinned there. Clients without cookies keep getting plain
round-robin.

Every client here uses an ``aiohttp.DummyCookieJar`` and sends its cookies by hand, so each
request carries exactly the cookie the test means.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from lbproxy.core.health import State
from lbproxy.core.snapshot import ServerState
from tests.support import (
    Backend,
    backend_app,
    config_doc,
    open_proxy,
    proxy_url,
    read_response,
    wait_for,
)

pytestmark = pytest.mark.timeout(30)


def session_backend(name: str) -> web.Application:
    """``backend_app(name)`` plus ``/session``: a request without a ``SESSIONID`` this backend
    issued gets a new random one (``Set-Cookie: SESSIONID=<hex>; Path=/``)."""
    app = backend_app(name)
    issued: set[str] = set()

    async def session(request: web.Request) -> web.Response:
        resp = web.Response(text=name)
        if request.cookies.get("SESSIONID") not in issued:
            value = secrets.token_hex(8)
            issued.add(value)
            resp.set_cookie("SESSIONID", value, path="/")
        return resp

    app.router.add_get("/session", session)
    return app


@pytest.fixture
async def backends(
    make_backend: Callable[..., Awaitable[Backend]],
) -> Callable[..., Awaitable[Backend]]:
    """``await backends("A")``: a started ``session_backend``; ``port`` restarts one."""

    async def make(name: str, port: int = 0) -> Backend:
        return await make_backend(name, port, app=session_backend)

    return make


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def sticky_doc(servers: list[Backend], interval: str = "200ms", **sticky: Any) -> dict[str, Any]:
    group = {
        "scheduler": "rr",
        "sticky_session": sticky,
        "health_check": {"interval": interval, "timeout": "1s", "path": "/health"},
    }
    return config_doc([b.address for b in servers], group=group)


def state(proxy: Proxy, backend: Backend) -> ServerState:
    return proxy.state.servers[f"rs1/{backend.address}"]


class Answer:
    def __init__(self, status: int, body: str, set_cookies: list[str]) -> None:
        self.status = status
        self.body = body
        self.set_cookies = set_cookies  # every Set-Cookie header, as sent

    def cookie(self, name: str) -> str | None:
        """The value the response sets for cookie ``name`` (None: it sets none)."""
        values = [
            c.split(";")[0].split("=", 1)[1] for c in self.set_cookies if c.startswith(name + "=")
        ]
        assert len(values) <= 1, self.set_cookies
        return values[0] if values else None


async def get(
    client: aiohttp.ClientSession, proxy: Proxy, path: str = "/whoami", cookie: str | None = None
) -> Answer:
    headers = {"Cookie": cookie} if cookie is not None else {}
    async with client.get(proxy_url(proxy, path=path), headers=headers) as r:
        return Answer(r.status, await r.text(), r.headers.getall("Set-Cookie", []))


# ------------------------------------------------------------------ type: insert


async def test_insert_cookie_is_set_once_opaque_and_pins_100_requests(backends, make_proxy, client):
    a, b = await backends("A"), await backends("B")
    proxy = await make_proxy(sticky_doc([a, b], type="insert"))

    first = await get(client, proxy)
    assert first.body == "A"  # round-robin starts with the first server
    (set_cookie,) = first.set_cookies
    name_value, *attributes = set_cookie.split("; ")
    name, value = name_value.split("=", 1)
    assert name == "SERVERID"
    assert "Max-Age=1000" in attributes
    assert value == state(proxy, a).token
    for secret in ("127.0.0.1", str(a.port), a.address, "rs1"):
        assert secret not in value

    second = await get(client, proxy)
    assert second.body == "B"
    b_value = second.cookie("SERVERID")
    assert b_value == state(proxy, b).token != value

    # 100 requests carrying a cookie, alternating between the two clients: round-robin would
    # send every other one to the wrong server. No cookie is set again.
    # 100 requests carrying A's cookie all go to A (round-robin would alternate), then a
    # pattern round-robin cannot produce. No cookie is set again.
    answers = [await get(client, proxy, cookie=f"SERVERID={value}") for _ in range(100)]
    assert [x.body for x in answers] == ["A"] * 100
    mixed = [(value, "A"), (value, "A"), (b_value, "B"), (b_value, "B"), (b_value, "B")] * 4
    answers += [await get(client, proxy, cookie=f"SERVERID={v}") for v, _ in mixed]
    assert [x.body for x in answers[100:]] == [name for _, name in mixed]
    assert all(x.status == 200 and x.set_cookies == [] for x in answers)

    # Among other cookies, and in a second Cookie header field, it is found all the same.
    assert (await get(client, proxy, cookie=f"x=1; SERVERID={b_value}; y=2")).body == "B"

    # A client without cookies keeps getting round-robin (pinned requests did not move it),
    # with a new cookie each time.
    plain = [await get(client, proxy) for _ in range(6)]
    assert [x.body for x in plain] == ["A", "B"] * 3
    assert [x.cookie("SERVERID") for x in plain] == [value, b_value] * 3


async def test_insert_cookie_comes_with_the_backends_own_cookies(backends, make_proxy, client):
    a = await backends("A")
    proxy = await make_proxy(sticky_doc([a], type="insert"))
    answer = await get(client, proxy, path="/session")
    assert answer.body == "A"
    assert answer.cookie("SESSIONID") is not None
    assert answer.cookie("SERVERID") == state(proxy, a).token
    assert len(answer.set_cookies) == 2


async def test_insert_cookie_on_the_wire_with_chunked_and_keepalive(backends, make_proxy):
    """The added header sits in a well-formed head, whatever the framing, on one connection."""
    a = await backends("A")
    proxy = await make_proxy(sticky_doc([a], type="insert"))
    token = state(proxy, a).token
    reader, writer = await open_proxy(proxy)
    try:
        for target in ("/download/100000?chunked=1", "/download/70000", "/status/204"):
            writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            resp = await read_response(reader)
            assert resp.all("Set-Cookie") == [
                f"SERVERID={token}; Max-Age=1000; Path=/; HttpOnly; SameSite=Lax"
            ]
            assert resp.header("Connection") is None  # kept alive
            size = int(target.split("/")[2].split("?")[0]) if "download" in target else 0
            assert len(resp.body) == size
        head = f"HEAD /whoami HTTP/1.1\r\nHost: x\r\nCookie: SERVERID={token}\r\n\r\n"
        writer.write(head.encode())
        resp = await read_response(reader, "HEAD")
        assert (resp.status, resp.all("Set-Cookie")) == (200, [])
    finally:
        writer.close()
    assert proxy.registry.listeners["web"].connections_total == 1


async def test_websocket_upgrade_honours_the_insert_cookie(backends, make_proxy, client):
    a, b = await backends("A"), await backends("B")
    proxy = await make_proxy(sticky_doc([a, b], type="insert"))
    tokens = {x.name: state(proxy, x).token for x in (a, b)}
    seen = []
    for _ in range(3):
        for name in ("B", "A"):
            cookie = {"Cookie": f"SERVERID={tokens[name]}"}
            async with client.ws_connect(proxy_url(proxy, path="/ws"), headers=cookie) as ws:
                await ws.send_str("whoami")
                msg = await ws.receive(timeout=5)
                assert msg.type is WSMsgType.TEXT
                seen.append((name, msg.data))
    assert seen == [("B", "B"), ("A", "A")] * 3


async def test_insert_failover_when_the_pinned_server_refuses(backends, make_proxy, client):
    """Stopped between two health checks: the connect fails, the request is retried on
    another server and the response replaces the cookie."""
    a, b = await backends("A"), await backends("B")
    proxy = await make_proxy(sticky_doc([a, b], interval="30s", type="insert"))
    old = (await get(client, proxy)).cookie("SERVERID")
    assert old == state(proxy, a).token
    await a.stop()
    assert state(proxy, a).health.state is State.UP  # no check has noticed

    moved = await get(client, proxy, cookie=f"SERVERID={old}")
    assert (moved.status, moved.body) == (200, "B")
    new = moved.cookie("SERVERID")
    assert new == state(proxy, b).token
    assert state(proxy, a).health.state is State.DOWN  # the failed connect marked it

    # Pinned to B from now on; the old cookie (A is down) is redirected and replaced too.
    for _ in range(10):
        again = await get(client, proxy, cookie=f"SERVERID={new}")
        assert (again.body, again.set_cookies) == ("B", [])
    stale = await get(client, proxy, cookie=f"SERVERID={old}")
    assert (stale.body, stale.cookie("SERVERID")) == ("B", new)


async def test_insert_failover_when_a_check_marked_the_server_down(backends, make_proxy, client):
    a, b = await backends("A"), await backends("B")
    proxy = await make_proxy(sticky_doc([a, b], type="insert"))
    a_token, b_token = state(proxy, a).token, state(proxy, b).token
    await a.stop()
    await wait_for(lambda: state(proxy, a).health.state is State.DOWN, what="A to be down")
    refused_before = state(proxy, a).stats.errors["connect"]

    moved = await get(client, proxy, cookie=f"SERVERID={a_token}")
    assert (moved.body, moved.cookie("SERVERID")) == ("B", b_token)
    async with client.ws_connect(
        proxy_url(proxy, path="/ws"), headers={"Cookie": f"SERVERID={a_token}"}
    ) as ws:
        await ws.send_str("whoami")
        assert (await ws.receive(timeout=5)).data == "B"
    # A down server is not even tried.
    assert state(proxy, a).stats.errors["connect"] == refused_before

    # A comes back on its port: clients re-pinned to B stay there; a client that still holds
    # A's cookie (it made no request meanwhile) goes back to A.
    await backends("A", a.port)
    await wait_for(lambda: state(proxy, a).health.state is State.UP, what="A to be up again")
    assert [(await get(client, proxy, cookie=f"SERVERID={b_token}")).body for _ in range(4)] == [
        "B"
    ] * 4
    back = await get(client, proxy, cookie=f"SERVERID={a_token}")
    assert (back.body, back.set_cookies) == ("A", [])


async def test_insert_cookie_of_a_removed_server_is_replaced(backends, make_proxy, client):
    a, b = await backends("A"), await backends("B")
    d = sticky_doc([a, b], type="insert")
    proxy = await make_proxy(d)
    a_token = state(proxy, a).token
    d["server_groups"]["rs1"]["servers"] = [{"address": b.address}]
    assert (await proxy.apply_config(parse_config(d), "test")).ok
    moved = await get(client, proxy, cookie=f"SERVERID={a_token}")
    assert (moved.body, moved.cookie("SERVERID")) == ("B", state(proxy, b).token)


async def test_weight_0_drains_new_clients_but_pinned_ones_stay(backends, make_proxy, client):
    """Weight 0 is drain mode (as in HAProxy): no new sessions, existing ones go on."""
    a, b = await backends("A"), await backends("B")
    d = sticky_doc([a, b], type="insert")
    proxy = await make_proxy(d)
    a_token = state(proxy, a).token
    d["server_groups"]["rs1"]["servers"][0]["weight"] = 0
    assert (await proxy.apply_config(parse_config(d), "test")).ok
    plain = [await get(client, proxy) for _ in range(4)]
    assert [x.body for x in plain] == ["B"] * 4
    pinned = [await get(client, proxy, cookie=f"SERVERID={a_token}") for _ in range(4)]
    assert [(x.body, x.set_cookies) for x in pinned] == [("A", [])] * 4


async def test_insert_custom_cookie_name_and_timeout(backends, make_proxy, client):
    a, b = await backends("A"), await backends("B")
    proxy = await make_proxy(sticky_doc([a, b], type="insert", cookie="LB", cookie_timeout="90s"))
    first = await get(client, proxy)
    (set_cookie,) = first.set_cookies
    assert set_cookie.startswith(f"LB={state(proxy, a).token}; ")
    assert "Max-Age=90" in set_cookie.split("; ")
    b_token = state(proxy, b).token
    assert [(await get(client, proxy, cookie=f"LB={b_token}")).body for _ in range(5)] == ["B"] * 5
    # The default name means nothing now: round-robin, and a cookie under the configured name.
    ignored = [await get(client, proxy, cookie=f"SERVERID={b_token}") for _ in range(2)]
    assert [x.body for x in ignored] == ["B", "A"]
    assert [x.cookie("LB") for x in ignored] == [b_token, state(proxy, a).token]


# ------------------------------------------------------------------ type: server


async def test_server_cookie_pins_100_requests(backends, make_proxy, client):
    a, b = await backends("A"), await backends("B")
    proxy = await make_proxy(sticky_doc([a, b], type="server", cookie="SESSIONID"))
    first = await get(client, proxy, path="/session")
    second = await get(client, proxy, path="/session")
    assert (first.body, second.body) == ("A", "B")
    # Only the backend's own cookie: the proxy adds none.
    assert len(first.set_cookies) == len(second.set_cookies) == 1
    s1, s2 = first.cookie("SESSIONID"), second.cookie("SESSIONID")
    assert s1 and s2 and s1 != s2

    answers = [
        await get(client, proxy, path="/session", cookie=f"SESSIONID={s1}") for _ in range(100)
    ]
    assert [x.body for x in answers] == ["A"] * 100  # round-robin would alternate
    mixed = [(s1, "A"), (s2, "B"), (s2, "B"), (s2, "B"), (s1, "A"), (s1, "A")] * 4
    answers += [
        await get(client, proxy, path="/session", cookie=f"x=1; SESSIONID={v}") for v, _ in mixed
    ]
    assert [x.body for x in answers[100:]] == [name for _, name in mixed]
    # Each backend knew its session: nothing new was issued.
    assert all(x.set_cookies == [] for x in answers)

    # A WebSocket upgrade carrying the session goes to its server too.
    for value, name in ((s2, "B"), (s1, "A"), (s2, "B")):
        cookie = {"Cookie": f"SESSIONID={value}"}
        async with client.ws_connect(proxy_url(proxy, path="/ws"), headers=cookie) as ws:
            await ws.send_str("whoami")
            assert (await ws.receive(timeout=5)).data == name

    # Unknown session ids and clients without cookies get round-robin.
    plain = [await get(client, proxy, path="/session") for _ in range(4)]
    plain += [await get(client, proxy, path="/session", cookie="SESSIONID=nobody")]
    assert [x.body for x in plain] == ["A", "B", "A", "B", "A"]


async def test_server_cookie_failover_pins_to_the_new_servers_cookie(backends, make_proxy, client):
    a, b = await backends("A"), await backends("B")
    d = sticky_doc([a, b], type="server", cookie="SESSIONID")
    d["server_groups"]["rs1"]["health_check"]["healthy_threshold"] = 1
    proxy = await make_proxy(d)
    first = await get(client, proxy, path="/session")
    assert first.body == "A"
    s1 = first.cookie("SESSIONID")
    await a.stop()

    # The pinned server refuses: retried on B, which does not know s1 and sets its own.
    moved = await get(client, proxy, path="/session", cookie=f"SESSIONID={s1}")
    assert moved.body == "B"
    s2 = moved.cookie("SESSIONID")
    assert s2 is not None and s2 != s1
    assert proxy.registry.retries.get("rs1", 0) == 1
    assert state(proxy, a).health.state is State.DOWN

    # A comes back (round-robin would now alternate): the client stays with B's session.
    await backends("A", a.port)
    await wait_for(lambda: state(proxy, a).health.available, what="A to be up again")
    for _ in range(20):
        again = await get(client, proxy, path="/session", cookie=f"SESSIONID={s2}")
        assert (again.body, again.set_cookies) == ("B", [])
    assert [(await get(client, proxy, path="/session")).body for _ in range(2)] == ["A", "B"]
    assert proxy.registry.retries.get("rs1", 0) == 1  # only the first request was retried
