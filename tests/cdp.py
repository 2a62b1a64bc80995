"""A minimal Chrome DevTools Protocol client for tests: Debian's headless chromium, driven
over the page's DevTools WebSocket with aiohttp (no Playwright, no browser download).

    async with Chromium.launch(tmp_path) as browser:
        page = await browser.page()
        await page.navigate("http://127.0.0.1:8404/")
        rows = await page.evaluate("document.querySelectorAll('tr').length")
        await page.screenshot("/tmp/shot.png")

A missing chromium fails the test (it is a declared test dependency, never a skip).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

MISSING = (
    "chromium not found: install it with `apt-get install -y chromium` "
    "(the README's test command does this)"
)
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
)
_LISTENING = re.compile(rb"DevTools listening on (ws://[^\s]+)")


def find_chromium() -> str:
    """The chromium binary, or fail the calling test with how to install it."""
    for candidate in (
        shutil.which("chromium"),
        "/usr/bin/chromium",
        shutil.which("chromium-browser"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(MISSING, pytrace=False)


class CDPError(Exception):
    """A DevTools command answered with an error, or a page script threw."""


class Page:
    """One page target: commands by id, events kept until someone waits for them."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: list[tuple[str, dict[str, Any]]] = []
        self._event = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
            else:
                self._events.append((data["method"], data.get("params", {})))
                self._event.set()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("DevTools connection closed"))

    async def send(self, method: str, timeout: float = 10.0, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        async with asyncio.timeout(timeout):
            answer = await fut
        if "error" in answer:
            raise CDPError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    async def wait_event(self, method: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first not yet consumed event ``method`` (waiting for it if need be)."""
        async with asyncio.timeout(timeout):
            while True:
                for i, (name, params) in enumerate(self._events):
                    if name == method:
                        del self._events[i]
                        return params
                self._event.clear()
                await self._event.wait()

    async def navigate(self, url: str, timeout: float = 10.0) -> None:
        """Load ``url`` and wait for its load event."""
        await self.send("Page.enable")
        self._events = [e for e in self._events if e[0] != "Page.loadEventFired"]
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise CDPError(f"navigate {url}: {result['errorText']}")
        await self.wait_event("Page.loadEventFired", timeout)

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JS expression in the page (promises are awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, path: str | Path, width: int = 1280, height: int = 800) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        Path(path).write_bytes(base64.b64decode(shot["data"]))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class Chromium:
    """A headless chromium process and an HTTP session to its DevTools endpoint."""

    def __init__(self, proc: asyncio.subprocess.Process, endpoint: str) -> None:
        self.proc = proc
        self.endpoint = endpoint  # host:port of the DevTools HTTP/WebSocket server
        self.session = aiohttp.ClientSession()
        self.pages: list[Page] = []
        self.stderr = bytearray()
        self._drain: asyncio.Task[None] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def launch(
        cls, profile_dir: str | Path, timeout: float = 30.0
    ) -> AsyncIterator[Chromium]:
        binary = find_chromium()
        proc = await asyncio.create_subprocess_exec(
            binary,
            *FLAGS,
            f"--user-data-dir={profile_dir}",
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        seen = bytearray()
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await proc.stderr.readline()
                    if not line:
                        raise AssertionError(
                            f"chromium exited ({await proc.wait()}) before DevTools listened:\n"
                            + seen.decode(errors="replace")[-2000:]
                        )
                    seen += line
                    m = _LISTENING.search(line)
                    if m:
                        break
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        endpoint = m.group(1).decode().split("/")[2]
        browser = cls(proc, endpoint)
        browser.stderr += seen
        browser._drain = asyncio.get_running_loop().create_task(browser._read_stderr())
        try:
            yield browser
        finally:
            await browser.close()

    async def _read_stderr(self) -> None:
        """Keep reading chromium's stderr so it never blocks on a full pipe."""
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.stderr += chunk[-65536:]

    async def page(self) -> Page:
        """The page chromium opened at start (about:blank)."""
        async with self.session.get(f"http://{self.endpoint}/json/list") as r:
            targets = await r.json()
        target = next(t for t in targets if t["type"] == "page")
        ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(ws)
        self.pages.append(page)
        return page

    async def close(self) -> None:
        for page in self.pages:
            await page.close()
        await self.session.close()
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(5):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._drain is not None:
            self._drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._drain
