"""The file-change reload trigger (SIGHUP lives in cli.py, the admin call in admin.py).

Owns the watcher task: about once a second it stats the config *path* (not an open file),
so an editor that writes a new file and renames it over the old one is seen like an
in-place write. A change of size, mtime or inode that also changes the bytes triggers one
``Proxy.reload``; the reload itself decides whether anything really changed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import Proxy

log = logging.getLogger("lbproxy.reload")

POLL_INTERVAL = 1.0  # seconds between stats of the config file


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


class FileWatcher:
    def __init__(self, proxy: Proxy, interval: float = POLL_INTERVAL) -> None:
        self.proxy = proxy
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        assert self.proxy.config_path is not None
        self._task = asyncio.get_running_loop().create_task(self._run(self.proxy.config_path))

    async def _run(self, path: str) -> None:
        sig = _signature(path)
        digest = _digest(path)
        while True:
            await asyncio.sleep(self.interval)
            new_sig = _signature(path)
            if new_sig == sig or new_sig is None:
                # Missing for a moment (some editors delete, then write): wait for it to return.
                continue
            sig = new_sig
            new_digest = _digest(path)
            if new_digest is None or new_digest == digest:
                continue
            digest = new_digest
            log.info("config file %s changed on disk", path)
            try:
                await self.proxy.reload("file change")
            except Exception:  # a bug in one reload must not stop watching for the next
                log.exception("reload after a file change failed unexpectedly")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
