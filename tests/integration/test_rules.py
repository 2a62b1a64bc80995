"""Forwarding rules through a live proxy (issue 7): host and path decide the server group.

One listener, default group rs1, and the rules of the issue::

    host: chat.example.com, path: /api/  -> rs2
    host: "*.example.com"                -> rs3
    path: /static/                       -> rs4

Each group has one backend named after it, so every answer says where the request went.
The precedence (longest path prefix, then exact host over wildcards over no host, else the
default) is unit-tested in tests/unit/test_rules.py; here it is checked end to end, with
keep-alive connections across a reload and with WebSocket upgrades.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from tests.support import (
    Backend,
    backend_app,
    open_proxy,
    proxy_url,
    read_response,
    wait_for,
)

pytestmark = pytest.mark.timeout(30)

ISSUE_RULES = [
    {"host": "chat.example.com", "path": "/api/", "server_group": "rs2"},
    {"host": "*.example.com", "server_group": "rs3"},
    {"path": "/static/", "server_group": "rs4"},
]


def rules_doc(backends: dict[str, Backend], rules: list[dict[str, Any]]) -> dict[str, Any]:
    """Listener ``web`` (default rs1) with ``rules``; one group per backend, named like it."""
    check = {"interval": "200ms", "timeout": "1s", "path": "/health"}
    return {
        "listeners": [
            {"name": "web", "bind": "127.0.0.1:0", "server_group": "rs1", "rules": rules}
        ],
        "server_groups": {
            name: {"servers": [b.address], "health_check": check} for name, b in backends.items()
        },
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }


def named_backend(name: str) -> web.Application:
    """``backend_app(name)`` that also answers every other path with ``<name> <path>``."""
    app = backend_app(name)

    async def anything(request: web.Request) -> web.Response:
        return web.Response(text=f"{name} {request.path}")

    app.router.add_route("*", "/{tail:.*}", anything)
    return app


@pytest.fixture
async def groups() -> AsyncIterator[dict[str, Backend]]:
    """Backends rs1..rs5, one per group, each named after its group."""
    started = {f"rs{i}": await Backend(named_backend(f"rs{i}")).start() for i in range(1, 6)}
    yield started
    for b in started.values():
        await b.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def routed(session: aiohttp.ClientSession, proxy: Proxy, host: str | None, path: str) -> str:
    """The group whose backend answers ``GET path`` with ``Host: host`` (None: no Host)."""
    if host is None:  # aiohttp always sends a Host: write the request by hand
        reader, writer = await open_proxy(proxy)
        writer.write(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        resp = await read_response(reader)
        writer.close()
        body = resp.body.decode()
    else:
        async with session.get(proxy_url(proxy, path=path), headers={"Host": host}) as r:
            assert r.status == 200, r.status
            body = await r.text()
    name, _, echoed = body.partition(" ")
    assert echoed == path.split("?")[0], body
    return name


async def apply(proxy: Proxy, d: dict[str, Any]) -> None:
    result = await proxy.apply_config(parse_config(d), "test")
    assert result.ok, result.message


@pytest.mark.parametrize(
    ("host", "path", "group"),
    [
        ("chat.example.com", "/api/messages", "rs2"),
        ("CHAT.Example.COM:8080", "/api/", "rs2"),  # any case, any port
        ("chat.example.com.", "/api/x", "rs2"),  # a trailing dot
        ("chat.example.com", "/", "rs3"),  # the /api/ rule does not apply: the wildcard does
        ("chat.example.com", "/apiv2", "rs3"),  # /api/ is not a prefix of /apiv2
        ("foo.example.com", "/api/messages", "rs3"),  # the /api/ rule is for chat.* only
        ("a.b.example.com", "/x", "rs3"),
        ("example.com", "/x", "rs1"),  # *.example.com needs a label before it
        ("other.org", "/static/app.js", "rs4"),
        ("foo.example.com", "/static/app.js", "rs4"),  # the longer prefix beats the wildcard
        ("chat.example.com", "/static/x", "rs4"),
        ("other.org", "/staticx", "rs1"),
        ("other.org", "/api/x", "rs1"),
        ("127.0.0.1", "/x?to=/static/", "rs1"),  # the query is not the path
        (None, "/static/a", "rs4"),  # no Host at all (HTTP/1.0)
        (None, "/api/", "rs1"),
    ],
)
async def test_issue_rules_route_each_request(groups, make_proxy, session, host, path, group):
    proxy = await make_proxy(rules_doc(groups, ISSUE_RULES))
    assert await routed(session, proxy, host, path) == group


async def test_absolute_form_target_is_routed_by_its_authority(groups, make_proxy):
    """RFC 9112 3.2.2: with an absolute-form target the Host header is ignored."""
    proxy = await make_proxy(rules_doc(groups, ISSUE_RULES))
    reader, writer = await open_proxy(proxy)
    try:
        got = []
        for target in ("http://chat.example.com/api/x", "http://other.org/static/y"):
            writer.write(f"GET {target} HTTP/1.1\r\nHost: foo.example.com\r\n\r\n".encode())
            resp = await read_response(reader)
            assert resp.status == 200, resp
            got.append(resp.body.decode())
    finally:
        writer.close()
    assert got == ["rs2 /api/x", "rs4 /static/y"]


async def test_longest_prefix_then_exact_host_then_wildcard(groups, make_proxy, session):
    rules = [
        {"path": "/a/", "server_group": "rs2"},
        {"path": "/a/b/", "server_group": "rs3"},
        {"host": "*.example.com", "path": "/a/", "server_group": "rs4"},
        {"host": "chat.example.com", "path": "/a/", "server_group": "rs5"},
    ]
    proxy = await make_proxy(rules_doc(groups, rules))
    cases = [
        ("other.org", "/a/x", "rs2"),
        ("other.org", "/a/b/x", "rs3"),  # the longest prefix
        ("foo.example.com", "/a/x", "rs4"),  # a wildcard host beats no host
        ("chat.example.com", "/a/x", "rs5"),  # an exact host beats the wildcard
        ("chat.example.com", "/a/b/x", "rs3"),  # a longer prefix beats any host
        ("chat.example.com", "/b", "rs1"),  # nothing matches: the default
    ]
    assert [await routed(session, proxy, h, p) for h, p, _ in cases] == [g for _, _, g in cases]


async def test_keepalive_connection_follows_rules_changed_by_reload(groups, make_proxy):
    d = rules_doc(groups, ISSUE_RULES)
    proxy = await make_proxy(d)
    reader, writer = await open_proxy(proxy)

    async def ask(host: str, path: str) -> str:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        resp = await read_response(reader)
        assert resp.status == 200 and resp.header("Connection") != "close", resp
        return resp.body.decode().split(" ")[0]

    try:
        assert await ask("chat.example.com", "/api/x") == "rs2"
        assert await ask("foo.example.com", "/x") == "rs3"
        d["listeners"][0]["rules"] = [
            {"host": "chat.example.com", "path": "/api/", "server_group": "rs5"},
            {"path": "/x", "server_group": "rs4"},
        ]
        await apply(proxy, d)
        # The same connection: its next requests follow the new rules.
        assert await ask("chat.example.com", "/api/x") == "rs5"
        assert await ask("foo.example.com", "/x") == "rs4"
        assert await ask("foo.example.com", "/y") == "rs1"
        d["listeners"][0].pop("rules")
        await apply(proxy, d)
        assert await ask("chat.example.com", "/api/x") == "rs1"
    finally:
        writer.close()
    assert proxy.registry.listeners["web"].connections_total == 1


async def test_websocket_upgrades_are_routed_by_rules(groups, make_proxy, session):
    proxy = await make_proxy(rules_doc(groups, ISSUE_RULES))
    for host, group in [("foo.example.com", "rs3"), ("other.org", "rs1"), ("x.example.com", "rs3")]:
        async with session.ws_connect(proxy_url(proxy, path="/ws"), headers={"Host": host}) as ws:
            await ws.send_str("whoami")
            msg = await ws.receive(timeout=5)
            assert (msg.type, msg.data) == (WSMsgType.TEXT, group)
    # Each tunnel was counted against the group it went to.
    durations = proxy.registry.listeners["web"].ws_duration

    def closed() -> dict[str, int]:
        return {g: sum(h.counts) for g, h in durations.items()}

    await wait_for(lambda: sum(closed().values()) == 3, what="the three tunnels to close")
    assert closed() == {"rs3": 2, "rs1": 1}
