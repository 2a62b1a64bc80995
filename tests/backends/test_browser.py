"""The chat page in headless Chromium: live chat across two backends, text-only rendering,
and reconnection after its backend goes away. Fails (never skips) when no Chromium is installed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backends.chat.app import ChatServer
from backends.chat.bus import MemoryBus
from tests.backends.cdp import Browser, Page, find_chromium

pytestmark = pytest.mark.timeout(60)

EVIL = '<img src=x onerror="window.pwned=1"> & <b>bold</b>'


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Browser]:
    binary = find_chromium()
    if binary is None:
        pytest.fail(
            "chromium not found: install it with `apt-get install -y chromium` "
            "(the README's test command does this)"
        )
    b = Browser(binary, tmp_path / "chromium-profile")
    try:
        await b.start()
        yield b
    finally:
        await b.close()


@pytest.fixture
async def bus() -> AsyncIterator[MemoryBus]:
    bus = MemoryBus()
    await bus.start()
    yield bus
    await bus.close()


async def send(page: Page, user: str, text: str) -> None:
    await page.eval(
        f"""(() => {{
            document.getElementById('user').value = {json.dumps(user)};
            document.getElementById('text').value = {json.dumps(text)};
            document.getElementById('composer').requestSubmit();
        }})()"""
    )


MESSAGES = """Array.from(document.querySelectorAll('#messages li.msg')).map(li => [
    li.querySelector('.who').textContent, li.querySelector('.text').textContent,
    li.classList.contains('mine')])"""


async def test_two_browsers_on_two_backends(browser: Browser, bus: MemoryBus) -> None:
    a = ChatServer("ECS01", bus)
    b = ChatServer("ECS02", bus)
    await a.start()
    await b.start()
    try:
        alice = await browser.new_page(a.url + "/")
        bob = await browser.new_page(b.url + "/")
        await alice.wait_for(
            "document.getElementById('status').textContent === 'connected to ECS01'"
        )
        await bob.wait_for("document.getElementById('status').textContent === 'connected to ECS02'")

        await send(alice, "alice", EVIL)
        await bob.wait_for("document.querySelectorAll('#messages li.msg').length === 1")
        await send(bob, "bob", "hi alice")
        await alice.wait_for("document.querySelectorAll('#messages li.msg').length === 2")
        await bob.wait_for("document.querySelectorAll('#messages li.msg').length === 2")

        expected = [["alice via ECS01", EVIL], ["bob via ECS02", "hi alice"]]
        alice_view = await alice.eval(MESSAGES)
        bob_view = await bob.eval(MESSAGES)
        assert [m[:2] for m in alice_view] == expected
        assert [m[:2] for m in bob_view] == expected
        assert [m[2] for m in alice_view] == [True, False]  # own messages are highlighted
        assert [m[2] for m in bob_view] == [False, True]

        for page in (alice, bob):  # the markup was shown as text, never parsed
            assert (
                await page.eval("document.querySelectorAll('#messages img, #messages b').length")
                == 0
            )
            assert await page.eval("typeof window.pwned") == "undefined"
            assert await page.eval("document.getElementById('text').value") == ""
    finally:
        await a.close()
        await b.close()


async def test_page_reconnects_after_its_backend_restarts(browser: Browser, bus: MemoryBus) -> None:
    first = ChatServer("ECS01", bus)
    await first.start()
    port = first.port
    try:
        page = await browser.new_page(first.url + "/")
        await page.wait_for(
            "document.getElementById('status').textContent === 'connected to ECS01'"
        )
    finally:
        await first.close()

    text = await page.wait_for(
        "(s => s.dataset.state === 'reconnecting' && s.textContent)"
        "(document.getElementById('status'))"
    )
    assert text.startswith("reconnecting in ") and text.endswith("s…"), text

    second = ChatServer("ECS01-new", bus, port=port)
    await second.start()
    try:
        await page.wait_for(
            "document.getElementById('status').textContent === 'connected to ECS01-new'"
        )
        await send(page, "alice", "back again")
        await page.wait_for("document.querySelectorAll('#messages li.msg').length === 1")
        assert await page.eval(MESSAGES) == [["alice via ECS01-new", "back again", True]]
        system = await page.eval(
            "Array.from(document.querySelectorAll('#messages li.system')).map(li => li.textContent)"
        )
        # The backend closed with 1001 as it stopped: a move, so the page tried again at once,
        # and fell back to its backoff (the countdown above) while nothing answered.
        assert system == [
            "connected to ECS01",
            "moved off ECS01 (1001): reconnecting",
            "connected to ECS01-new",
        ]
    finally:
        await second.close()


async def test_page_reconnects_at_once_when_moved_by_the_proxy(
    browser: Browser, bus: MemoryBus
) -> None:
    """Through lbproxy: a shed (as a rebalance does) closes the page's WebSocket with 1012;
    the page says it was moved and reconnects within its short jitter, not its backoff."""
    from lbproxy.control.app import Proxy
    from tests.support import config_doc, proxy_url, start_proxy

    a = ChatServer("ECS01", bus)
    b = ChatServer("ECS02", bus)
    await a.start()
    await b.start()
    proxy: Proxy | None = None
    try:
        doc = config_doc(
            [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
            group={"scheduler": "wlc", "health_check": {"enabled": False}},
        )
        proxy = await start_proxy(doc)
        page = await browser.new_page(proxy_url(proxy, path="/"))
        text = await page.wait_for(
            "(s => s.textContent.startsWith('connected to ') && s.textContent)"
            "(document.getElementById('status'))"
        )
        first = text.removeprefix("connected to ")
        group = proxy.holder.current.groups["rs1"]
        server = next(s for s in group.servers if sum(s.stats.ws_active.values()) == 1)
        assert proxy.servers.shed(server, 1.0, None, 0.0) == 1
        await page.wait_for(
            "Array.from(document.querySelectorAll('#messages li.system'))"
            ".some(li => li.textContent.startsWith('moved off '))"
        )
        await page.wait_for(
            "document.querySelectorAll('#messages li.system').length === 3"
            " && document.getElementById('status').dataset.state === 'connected'"
        )
        system = await page.eval(
            "Array.from(document.querySelectorAll('#messages li.system')).map(li => li.textContent)"
        )
        assert system[:2] == [f"connected to {first}", f"moved off {first} (1012): reconnecting"]
        assert system[2].startswith("connected to ")
        # Never the failure path: no "reconnecting in Ns" countdown was shown.
        assert await page.eval("document.getElementById('status').dataset.state") == "connected"
        await send(page, "alice", "still here")
        await page.wait_for("document.querySelectorAll('#messages li.msg').length === 1")
    finally:
        if proxy is not None:
            await proxy.close(timeout=0.5)
        await a.close()
        await b.close()
