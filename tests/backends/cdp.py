"""A tiny Chrome DevTools Protocol client, enough to drive the chat page in headless Chromium.

``Browser`` owns the chromium process (its own process group), the DevTools WebSocket,
the task reading it and the task draining chromium's stderr; ``Page`` evaluates
JavaScript in one tab.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import aiohttp

DEVTOOLS_URL = re.compile(rb"DevTools listening on (ws://\S+)")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


class CDPError(Exception):
    pass


class Browser:
    def __init__(self, binary: str, profile_dir: Path, args: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.profile_dir = profile_dir
        self.args = args  # more command-line switches
        self.stderr = b""
        self._proc: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 20.0) -> None:
        self._proc = await asyncio.create_subprocess_exec(
            self.binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-extensions",
            "--disable-background-networking",
            "--no-first-run",
            "--no-default-browser-check",
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile_dir}",
            *self.args,
            "about:blank",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert self._proc.stderr is not None
        url = None
        async with asyncio.timeout(timeout):
            while url is None:
                line = await self._proc.stderr.readline()
                if not line:
                    raise CDPError(f"chromium exited:\n{self.stderr.decode(errors='replace')}")
                self.stderr += line
                if m := DEVTOOLS_URL.search(line):
                    url = m.group(1).decode()
        self._tasks.append(asyncio.create_task(self._drain_stderr()))
        self._http = aiohttp.ClientSession()
        self._ws = await self._http.ws_connect(url, max_msg_size=0)
        self._tasks.append(asyncio.create_task(self._read()))

    async def _drain_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        while chunk := await self._proc.stderr.read(65536):
            self.stderr = (self.stderr + chunk)[-100_000:]  # keep the tail

    async def _read(self) -> None:
        assert self._ws is not None
        async for frame in self._ws:
            if frame.type is not aiohttp.WSMsgType.TEXT:
                break
            msg = json.loads(frame.data)
            fut = self._pending.pop(msg.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CDPError("DevTools connection closed"))

    async def send(
        self, method: str, params: dict[str, Any] | None = None, session_id: str | None = None
    ) -> dict[str, Any]:
        assert self._ws is not None
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id is not None:
            msg["sessionId"] = session_id
        await self._ws.send_str(json.dumps(msg))
        reply = await asyncio.wait_for(fut, 15)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def new_page(self, url: str) -> Page:
        target = await self.send("Target.createTarget", {"url": url})
        attached = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        return Page(self, attached["sessionId"])

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send("Browser.close"), 5)
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            with contextlib.suppress(ProcessLookupError):  # leftover helper processes
                os.killpg(proc.pid, signal.SIGKILL)
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


class Page:
    def __init__(self, browser: Browser, session_id: str) -> None:
        self.browser = browser
        self.session_id = session_id

    async def eval(self, expression: str) -> Any:
        result = await self.browser.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            self.session_id,
        )
        if "exceptionDetails" in result:
            raise CDPError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
        """Evaluate ``expression`` every 50 ms until it is truthy; return its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        value: Any = None
        while loop.time() < deadline:
            with contextlib.suppress(CDPError):  # e.g. page still loading
                value = await self.eval(expression)
                if value:
                    return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {expression!r} (last value {value!r})")
