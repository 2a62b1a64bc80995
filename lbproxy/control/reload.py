"""The file-change reload trigger (SIGHUP lives in cli.py, the admin call in admin.py).

Owns the watcher task: about once a second it stats the config *path* (not an open file),
so an editor that writes a new file and renames it over the old one is seen like an
in-place write. A change of size, mtime or inode that also changes the bytes triggers one
``Proxy.reload``; the reload itself decides whether anything really changed.

The TLS files the running config names (every https listener's certificate and key, the
admin's, and every group's backend CA, client certificate and key) are watched the same way,
so a certificate renewed on disk (certificate managers rewrite the files in place) is picked
up without anyone asking for a reload. A manager writes the certificate and the key one after
the other: the reload waits until a poll sees no further change, so it never loads a new
certificate with the old key.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config.top import Config
    from .app import Proxy

log = logging.getLogger("lbproxy.control.reload")

POLL_INTERVAL = 1.0  # seconds between stats of the config file

Signature = tuple[int, int, int]


def _signature(path: str) -> Signature | None:
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


def tls_files(config: Config) -> list[str]:
    """Every file a TLS setting of ``config`` names (absolute paths, in config order)."""
    out: list[str] = []
    for lst in config.listeners:
        if lst.tls is not None:
            out += [lst.tls.cert, lst.tls.key]
    if config.admin.tls is not None:
        out += [config.admin.tls.cert, config.admin.tls.key]
    for group in config.server_groups:
        if group.tls is not None:
            out += group.tls.files
    return list(dict.fromkeys(out))


class _Watched:
    """One file: the signature and digest last seen."""

    __slots__ = ("digest", "sig")

    def __init__(self, path: str) -> None:
        self.sig = _signature(path)
        self.digest = _digest(path)

    def changed(self, path: str) -> bool:
        """Whether the bytes changed since the last call (a missing file is not a change:
        some writers delete, then write; wait for it to return)."""
        sig = _signature(path)
        if sig == self.sig or sig is None:
            return False
        self.sig = sig
        digest = _digest(path)
        if digest is None or digest == self.digest:
            return False
        self.digest = digest
        return True


class FileWatcher:
    def __init__(self, proxy: Proxy, interval: float = POLL_INTERVAL) -> None:
        self.proxy = proxy
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        assert self.proxy.config_path is not None
        self._task = asyncio.get_running_loop().create_task(self._run(self.proxy.config_path))

    async def _run(self, path: str) -> None:
        config = _Watched(path)
        tls: dict[str, _Watched] = {}
        pending = False  # a TLS file changed; reload once the files stop changing
        while True:
            wanted = tls_files(self.proxy.holder.current.config)
            tls = {p: tls.get(p) or _Watched(p) for p in wanted}
            await asyncio.sleep(self.interval)
            tls_moved = [p for p, w in tls.items() if w.changed(p)]
            trigger = None
            if config.changed(path):
                log.info("config file %s changed on disk", path)
                trigger = "file change"
            elif tls_moved:
                log.info("TLS file changed on disk: %s", ", ".join(tls_moved))
                pending = True
            elif pending:
                trigger = "certificate change"
            if trigger is None:
                continue
            pending = False
            try:
                await self.proxy.reload(trigger)
            except Exception:  # a bug in one reload must not stop watching for the next
                log.exception("reload after a file change failed unexpectedly")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
