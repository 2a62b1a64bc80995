"""The chat deployment end to end: two chat backends, a real Redis, lbproxy in front.

This is the scenario of the README's demo (``scripts/demo``), on free ports:

* ``python -m backends.chat --port 0 --name ECS0n --redis URL`` as real processes (or
  ``ChatServer`` in-process where the test only needs a backend), a real ``redis-server``
  (``tests/backends/redis_server.py``; missing, it is a failure with an install hint);
* lbproxy started in-process (``make_proxy``) with round-robin over the two backends and
  health checks on ``/health``;
* WebSocket clients (aiohttp) and chat pages in Debian's headless chromium
  (``tests/backends/cdp.py``) connected *through lbproxy*.

Covered: two users landing on different backends see each other's messages exactly once,
tagged with the relaying backend (raw clients and real pages); a Redis restart
mid-conversation never stops local delivery and fan-out resumes afterwards; the page's
keep-alive ping is below the proxy's default idle timeout, pings keep a tunnel open past a
short ``idle_timeout`` while a silent one is closed, and the page reconnects on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from backends.chat.app import STATIC_DIR, ChatServer
from backends.chat.bus import MemoryBus
from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from tests.backends.cdp import Browser, Page, find_chromium
from tests.backends.helpers import recv_json, say
from tests.backends.redis_server import REDIS_MISSING, RedisServer, find_redis_server, free_port
from tests.support import config_doc, proxy_url, wait_for

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"(\S+) listening on http://(\S+)")
CHROMIUM_MISSING = (
    "chromium not found: install it with `apt-get install -y chromium` "
    "(the README's test command does this)"
)
WS = aiohttp.ClientWebSocketResponse
Message = tuple[str, str, str]  # (user, text, relaying backend)

# -- fixtures: Redis, chat backend processes, a browser ---------------------------------


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free port (restartable on the same port)."""
    binary = find_redis_server()
    if binary is None:
        pytest.fail(REDIS_MISSING, pytrace=False)
    server = RedisServer(binary, free_port(), tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class ChatProcess:
    """A ``python -m backends.chat`` process; its stderr is read continuously into ``lines``."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self.address = ""  # host:port, once it logged "listening on"
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            line = raw.decode(errors="replace").rstrip()
            self.lines.append(line)
            if (m := LISTENING.search(line)) and m.group(1) == self.name:
                self.address = m.group(2)
            self._changed.set()
        self._changed.set()

    def count(self, pattern: str) -> int:
        return sum(pattern in line for line in self.lines)

    async def wait_log(self, pattern: str, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``pattern`` appears in ``count`` lines of the log."""
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                if self.count(pattern) >= count:
                    return
                if self._reader.done():
                    pytest.fail(f"{self.name} exited before logging {pattern!r}:\n{self.log}")
                await self._changed.wait()

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    async def stop(self) -> int | None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await self._reader
        return self.proc.returncode


Launch = Callable[[str, str], Awaitable[ChatProcess]]


@pytest.fixture
async def launch_chat() -> AsyncIterator[Launch]:
    """``await launch_chat("ECS01", redis_url)``: a chat backend process, subscribed to Redis."""
    started: list[ChatProcess] = []

    async def launch(name: str, redis_url: str) -> ChatProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "backends.chat",
            *("--port", "0", "--name", name, "--redis", redis_url),
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        backend = ChatProcess(name, proc)
        started.append(backend)
        await backend.wait_log(f"{name} listening on")
        await backend.wait_log("redis connected")
        return backend

    yield launch
    for backend in started:
        status = await backend.stop()
        assert status == 0, f"{backend.name} exited with {status}:\n{backend.log}"
        assert "Traceback" not in backend.log, backend.log


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    binary = find_chromium()
    if binary is None:
        pytest.fail(CHROMIUM_MISSING, pytrace=False)
    b = Browser(binary, tmp_path / "chromium-profile")
    try:
        await b.start()
        yield b
    finally:
        await b.close()


# -- helpers ----------------------------------------------------------------------------


def lb_doc(addresses: list[str], scheduler: str = "rr", **listener: Any) -> dict[str, Any]:
    """lbproxy in front of ``addresses`` (round-robin by default), health checks on /health."""
    return config_doc(
        addresses,
        listener=listener,
        group={
            "scheduler": scheduler,
            "health_check": {
                "path": "/health",
                "interval": "200ms",
                "timeout": "1s",
                "healthy_threshold": 1,
            },
        },
    )


async def deploy(
    launch_chat: Launch,
    make_proxy: Callable[..., Awaitable[Proxy]],
    redis: RedisServer,
    scheduler: str = "rr",
) -> tuple[Proxy, ChatProcess, ChatProcess]:
    """ECS01 and ECS02 as processes on ``redis``, and lbproxy in front of them."""
    a, b = await asyncio.gather(launch_chat("ECS01", redis.url), launch_chat("ECS02", redis.url))
    proxy = await make_proxy(lb_doc([a.address, b.address], scheduler))
    return proxy, a, b


async def join(session: aiohttp.ClientSession, proxy: Proxy) -> tuple[WS, str]:
    """A chat WebSocket through lbproxy and the name of the backend it landed on."""
    ws = await session.ws_connect(proxy_url(proxy, path="/ws"))
    hello = await recv_json(ws)
    assert hello["type"] == "hello" and set(hello) == {"type", "backend"}, hello
    return ws, hello["backend"]


async def chat_until(ws: WS, *markers: str, timeout: float = 5.0) -> list[Message]:
    """The chat messages received on ``ws`` until every text in ``markers`` arrived.

    A marker sent after a message by the same sender travels the same FIFO path (local
    delivery, or one Redis subscription), so a duplicate would arrive before it.
    """
    got: list[Message] = []
    missing = set(markers)
    async with asyncio.timeout(timeout):
        while missing:
            frame = await recv_json(ws)
            assert frame["type"] == "message", frame
            got.append((frame["user"], frame["text"], frame["backend"]))
            missing.discard(frame["text"])
    return got


async def set_name_and_send(page: Page, user: str, text: str) -> None:
    """What a user does: type a name and a message, press Send."""
    await page.eval(
        f"""(() => {{
            document.getElementById('user').value = {json.dumps(user)};
            document.getElementById('text').value = {json.dumps(text)};
            document.getElementById('send').click();
        }})()"""
    )


SHOWN = """Array.from(document.querySelectorAll('#messages li.msg')).map(li =>
    [li.querySelector('.who').textContent, li.querySelector('.text').textContent])"""
CONNECTED = re.compile(r"connected to (\S+)")


async def page_backend(page: Page) -> str:
    """The backend the page says it is connected to (waits for the connection)."""
    text = await page.wait_for(
        "(s => s.dataset.state === 'connected' && s.textContent)(document.getElementById('status'))"
    )
    m = CONNECTED.fullmatch(text)
    assert m, text
    return m.group(1)


# -- two users, two backends, one room --------------------------------------------------


async def test_clients_on_two_backends_exchange_messages_through_lbproxy(
    launch_chat: Launch, make_proxy: Callable[..., Awaitable[Proxy]], redis_server: RedisServer
) -> None:
    proxy, _, _ = await deploy(launch_chat, make_proxy, redis_server)
    async with aiohttp.ClientSession() as session:
        alice, alice_on = await join(session, proxy)
        bob, bob_on = await join(session, proxy)
        carol, carol_on = await join(session, proxy)
        # rr: consecutive upgrades alternate between the two backends.
        assert {alice_on, bob_on} == {"ECS01", "ECS02"}
        assert carol_on == alice_on

        await say(alice, "alice", "hi bob")
        await say(bob, "bob", "hi alice")
        await say(alice, "alice", "end-alice")
        await say(bob, "bob", "end-bob")
        expected = Counter(
            [
                ("alice", "hi bob", alice_on),
                ("bob", "hi alice", bob_on),
                ("alice", "end-alice", alice_on),
                ("bob", "end-bob", bob_on),
            ]
        )
        for ws in (alice, bob, carol):
            got = await chat_until(ws, "end-alice", "end-bob")
            assert Counter(got) == expected, got
        # Each sender's own messages keep their order on every connection.
        for ws in (alice, bob, carol):
            await say(alice, "alice", "last")
            got = await chat_until(ws, "last")
            assert got == [("alice", "last", alice_on)]
        for ws in (alice, bob, carol):
            await ws.close()


async def test_two_browser_pages_through_lbproxy(
    launch_chat: Launch,
    make_proxy: Callable[..., Awaitable[Proxy]],
    redis_server: RedisServer,
    browser: Browser,
) -> None:
    """Alice and Bob each open the chat page through lbproxy, on different backends.

    The group uses wlc (least connections): a page load is several HTTP requests plus one
    upgrade, so under rr two pages loaded one after the other move in lockstep and their
    WebSockets land on the *same* backend; wlc counts the open tunnels and puts the second
    page's WebSocket on the other backend.
    """
    proxy, _, _ = await deploy(launch_chat, make_proxy, redis_server, scheduler="wlc")
    url = proxy_url(proxy, path="/")
    alice = await browser.new_page(url)
    alice_on = await page_backend(alice)
    bob = await browser.new_page(url)
    bob_on = await page_backend(bob)
    assert {alice_on, bob_on} == {"ECS01", "ECS02"}

    await set_name_and_send(alice, "alice", "hello from alice")
    await bob.wait_for("document.querySelectorAll('#messages li.msg').length === 1")
    await set_name_and_send(bob, "bob", "hello from bob")
    expected = [
        ["alice via " + alice_on, "hello from alice"],
        ["bob via " + bob_on, "hello from bob"],
    ]
    for page in (alice, bob):
        await page.wait_for("document.querySelectorAll('#messages li.msg').length === 2")
        assert await page.eval(SHOWN) == expected
        badges = (
            "Array.from(document.querySelectorAll('#messages .backend')).map(b => b.textContent)"
        )
        assert await page.eval(badges) == [alice_on, bob_on]
        assert await page.eval("document.getElementById('notice').textContent") == ""


# -- Redis restarted mid-conversation ---------------------------------------------------


async def test_redis_restart_keeps_local_delivery_and_fan_out_resumes(
    launch_chat: Launch, make_proxy: Callable[..., Awaitable[Proxy]], redis_server: RedisServer
) -> None:
    proxy, ecs01, ecs02 = await deploy(launch_chat, make_proxy, redis_server)
    processes = {"ECS01": ecs01, "ECS02": ecs02}
    async with aiohttp.ClientSession() as session:
        a1, a_on = await join(session, proxy)
        b1, b_on = await join(session, proxy)
        a2, a2_on = await join(session, proxy)
        assert a_on != b_on and a2_on == a_on
        here, there = processes[a_on], processes[b_on]

        await say(a1, "a1", "before")
        for ws in (a1, a2, b1):
            assert await chat_until(ws, "before") == [("a1", "before", a_on)]

        # a1 and a2 (same backend) keep talking while Redis goes down and stays down.
        rounds = 0
        stopped_after = -1  # chatter numbers below this may have reached ECS02 via Redis
        down = asyncio.Event()

        async def chatter() -> None:
            nonlocal rounds
            while not down.is_set() or rounds < stopped_after + 10:
                sender, receiver = (a1, a2) if rounds % 2 == 0 else (a2, a1)
                text = f"local-{rounds}"
                await say(sender, "a", text)
                for ws in (receiver, sender):
                    # A hang guard: Redis being down must not delay local delivery, but a
                    # loaded machine may.
                    assert await chat_until(ws, text, timeout=10) == [("a", text, a_on)]
                rounds += 1
                await asyncio.sleep(0.02)

        talking = asyncio.create_task(chatter())
        await wait_for(lambda: rounds >= 3, what="a few rounds with Redis up")
        await redis_server.stop_async()
        stopped_after = rounds + 1  # the message in flight may still have been published
        await asyncio.gather(
            here.wait_log("redis unavailable"), there.wait_log("redis unavailable")
        )
        down.set()
        await asyncio.wait_for(talking, 60)
        assert rounds >= stopped_after + 10

        # ECS02's user alone is served locally during the outage too. Before it, b1 got
        # the chatter up to the outage (through Redis, in order), and nothing after it.
        alone = ("b1", "alone on " + b_on, b_on)
        await say(b1, *alone[:2])
        got = await chat_until(b1, alone[1])
        assert got[-1] == alone, got
        assert got[:-1] == [("a", f"local-{i}", a_on) for i in range(len(got) - 1)], got
        assert 3 <= len(got) - 1 <= stopped_after, got

        await redis_server.start_async()
        await asyncio.gather(here.wait_log("redis back"), there.wait_log("redis back"))
        await say(a1, "a1", "after-a")
        await say(b1, "b1", "after-b")
        expected = Counter([("a1", "after-a", a_on), ("b1", "after-b", b_on)])
        # Nothing from the outage is replayed: every user gets exactly the two new messages.
        for ws in (a1, a2, b1):
            assert Counter(await chat_until(ws, "after-a", "after-b")) == expected
        for proc in (here, there):  # one log line per outage, not one per retry
            assert proc.count("redis unavailable") == 1, proc.log
            assert proc.count("redis back") == 1, proc.log
        for ws in (a1, a2, b1):
            await ws.close()


# -- keep-alive through the proxy's idle timeout ----------------------------------------


def test_page_pings_well_within_the_default_idle_timeout() -> None:
    source = (STATIC_DIR / "chat.js").read_text()
    m = re.search(r"const PING_INTERVAL_MS = (\d+);", source)
    assert m, "PING_INTERVAL_MS not found in chat.js"
    default_idle = parse_config(config_doc(["127.0.0.1:1"])).listeners[0].timeouts.idle
    assert int(m.group(1)) == 30_000
    assert int(m.group(1)) / 1000 < default_idle == 60.0
    assert '{ type: "ping" }' in source


@pytest.fixture
async def chat_pair() -> AsyncIterator[list[ChatServer]]:
    """ECS01 and ECS02 in-process on one memory bus (enough for keep-alive tests)."""
    bus = MemoryBus()
    servers = [ChatServer("ECS01", bus), ChatServer("ECS02", bus)]
    for s in servers:
        await s.start()
    yield servers
    for s in servers:
        await s.close()


async def test_pings_keep_a_tunnel_open_and_a_silent_one_is_closed(
    chat_pair: list[ChatServer], make_proxy: Callable[..., Awaitable[Proxy]]
) -> None:
    addresses = [f"127.0.0.1:{s.port}" for s in chat_pair]
    proxy = await make_proxy(lb_doc(addresses, idle_timeout="1500ms"))
    async with aiohttp.ClientSession() as session:
        pinger, _ = await join(session, proxy)
        # Before the silent one joins: its last byte passes the proxy after this (and maybe
        # well before this task sees it on a loaded machine).
        opened = time.monotonic()
        silent, _ = await join(session, proxy)

        async def keep_alive() -> int:
            # A ping every 500 ms (the pace is the point: a third of the idle timeout), for
            # over twice the idle timeout and at least six pings, however slow the machine.
            pongs = 0
            while time.monotonic() - opened < 4.0 or pongs < 6:
                await asyncio.sleep(0.5)
                await pinger.send_str(json.dumps({"type": "ping"}))
                assert await recv_json(pinger, timeout=10) == {"type": "pong"}
                pongs += 1
            return pongs

        pinging = asyncio.create_task(keep_alive())
        frame = await silent.receive(timeout=15)
        idle_for = time.monotonic() - opened
        assert frame.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), frame
        assert 1.4 <= idle_for <= 1.5 + 8, idle_for  # not before 1.5 s; a hang guard

        pongs = await pinging
        assert pongs >= 6
        assert not pinger.closed
        assert time.monotonic() - opened >= 4.0
        assert proxy.registry.listener("web").ws_closes["idle_timeout"] == 1

        # What the page does when its connection drops: connect again, get a new hello.
        again, again_on = await join(session, proxy)
        assert again_on in {"ECS01", "ECS02"}
        await say(again, "carol", "back")
        assert await chat_until(again, "back") == [("carol", "back", again_on)]
        assert await chat_until(pinger, "back") == [("carol", "back", again_on)]
        await pinger.close()
        await again.close()


async def test_page_shows_reconnecting_then_connected_after_an_idle_close(
    chat_pair: list[ChatServer], make_proxy: Callable[..., Awaitable[Proxy]], browser: Browser
) -> None:
    addresses = [f"127.0.0.1:{s.port}" for s in chat_pair]
    proxy = await make_proxy(lb_doc(addresses, idle_timeout="1500ms"))
    page = await browser.new_page(proxy_url(proxy, path="/"))
    first = await page_backend(page)
    # Record every state the status line goes through from now on.
    await page.eval(
        """(() => {
            const s = document.getElementById('status');
            window.states = [s.dataset.state];
            new MutationObserver(() => {
                if (window.states.at(-1) !== s.dataset.state) window.states.push(s.dataset.state);
            }).observe(s, {attributes: true, childList: true, characterData: true, subtree: true});
        })()"""
    )
    # The page pings every 30 s, so the proxy closes its tunnel after 1.5 s idle; the page
    # notices, shows the countdown, and reconnects (first retry after 0.25-0.5 s).
    await page.wait_for(
        "window.states.join(',').startsWith('connected,reconnecting,connecting,connected')",
        timeout=6.0,
    )
    system = await page.eval(
        "Array.from(document.querySelectorAll('#messages li.system')).map(li => li.textContent)"
    )
    assert system[:2] == [f"connected to {first}", f"disconnected from {first}"], system
    assert CONNECTED.fullmatch(system[2]), system
    assert proxy.registry.listener("web").ws_closes["idle_timeout"] >= 1
