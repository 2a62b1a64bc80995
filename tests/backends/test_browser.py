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
        assert system == ["connected to ECS01", "disconnected from ECS01", "connected to ECS01-new"]
    finally:
        await second.close()
