"""The listening sockets of the proxied listeners, reconciled against each new snapshot.

Owns the asyncio servers, one per listener, and each listener's ``ListenerHandle`` (the
runtime new connections and new requests read). ``apply`` opens every socket the new
snapshot needs *before* anything changes, so a bind that fails leaves the old listeners as
they were; then it points handles at the new runtimes and stops accepting on the sockets no
longer wanted. Stopping a listener never touches connections it already accepted.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from .config import Address
from .http_proxy import ClientConnection, Context, ListenerHandle
from .snapshot import Snapshot

log = logging.getLogger("lbproxy.listener")

BACKLOG = 2048


class BindError(Exception):
    """A listener's address could not be bound; carries the config place of it."""


@dataclass(slots=True)
class _Bound:
    address: Address
    server: asyncio.Server


class Listeners:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.bound: dict[str, _Bound] = {}
        self.handles: dict[str, ListenerHandle] = {}

    async def apply(self, snap: Snapshot) -> None:
        """Make the open sockets match ``snap``; raise BindError and change nothing on failure."""
        opened: dict[str, _Bound] = {}
        for i, lst in enumerate(snap.config.listeners):
            old = self.bound.get(lst.name)
            if old is not None and old.address == lst.bind:
                continue
            handle = self.handles.get(lst.name) or ListenerHandle(snap.listeners[lst.name])
            try:
                server = await self._open(lst.bind, handle)
            except OSError as exc:
                for b in opened.values():
                    b.server.close()
                raise BindError(
                    f"listeners[{i}].bind: cannot listen on {lst.bind}: {exc.strerror or exc}"
                ) from None
            self.handles.setdefault(lst.name, handle)
            opened[lst.name] = _Bound(lst.bind, server)
        for name, runtime in snap.listeners.items():
            self.handles[name].runtime = runtime
        for name, b in list(self.bound.items()):
            if name not in snap.listeners or name in opened:
                b.server.close()
                del self.bound[name]
                log.info("listener %s stopped accepting on %s", name, b.address)
        for name, b in opened.items():
            self.bound[name] = b
            log.info("listener %s accepting on %s", name, self.address(name))
        for name in list(self.handles):
            if name not in snap.listeners:
                del self.handles[name]

    async def _open(self, address: Address, handle: ListenerHandle) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        return await loop.create_server(
            lambda: ClientConnection(ctx, handle),
            host=address.host,
            port=address.port,
            backlog=BACKLOG,
            reuse_address=True,
            family=socket.AF_INET6 if ":" in address.host else socket.AF_UNSPEC,
        )

    def address(self, name: str) -> Address:
        """The address actually bound (port 0 in the config becomes the kernel's choice)."""
        b = self.bound[name]
        host, port = b.server.sockets[0].getsockname()[:2]
        return Address(host, port)

    def stop_accepting(self) -> None:
        for name, b in self.bound.items():
            b.server.close()
            log.info("listener %s stopped accepting", name)
        self.bound.clear()
