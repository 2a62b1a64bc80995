"""The listening sockets of the proxied listeners, reconciled against each new snapshot.

Owns the asyncio servers, one per listener, and each listener's ``ListenerHandle`` (the
runtime new connections and new requests read). ``apply`` opens every socket the new
snapshot needs *before* anything changes, so a bind that fails leaves the old listeners as
they were; then it points handles at the new runtimes and stops accepting on the sockets no
longer wanted. A listener renamed (or moved onto an address another one leaves) takes that
socket over instead of binding it twice. Stopping a listener never touches connections it
already accepted.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from .config import Address
from .http_proxy import ClientConnection, Context, ListenerHandle
from .snapshot import Snapshot

log = logging.getLogger("lbproxy.listener")

BACKLOG = 2048


class BindError(Exception):
    """A listener's address could not be bound; carries the config place of it."""


class _Bound:
    """One listening socket; ``handle`` is the listener its new connections belong to."""

    __slots__ = ("address", "handle", "server")

    def __init__(self, address: Address, handle: ListenerHandle) -> None:
        self.address = address
        self.handle = handle  # a rename hands the socket (and its new connections) over
        self.server: asyncio.Server


class Listeners:
    def __init__(self, ctx: Context, reuse_port: bool = False) -> None:
        self.ctx = ctx
        # Workers share each listening address through SO_REUSEPORT; a lone process does not
        # set it, so a second lbproxy started by mistake fails to bind instead of sharing.
        self.reuse_port = reuse_port
        self.bound: dict[str, _Bound] = {}
        self.handles: dict[str, ListenerHandle] = {}

    async def apply(self, snap: Snapshot) -> None:
        """Make the open sockets match ``snap``; raise BindError and change nothing on failure."""
        opened: dict[str, _Bound] = {}
        moved: dict[str, str] = {}  # listener -> the listener whose socket it takes over
        for i, lst in enumerate(snap.config.listeners):
            old = self.bound.get(lst.name)
            if old is not None and old.address == lst.bind:
                continue
            heir = self._vacated(lst.bind, snap)
            if heir is not None:
                # A renamed listener keeps its socket: binding the address twice would fail,
                # and closing it first would refuse connections for a moment.
                moved[lst.name] = heir
                continue
            handle = self.handles.get(lst.name) or ListenerHandle(snap.listeners[lst.name])
            try:
                opened[lst.name] = await self._open(lst.bind, handle)
            except OSError as exc:
                for b in opened.values():
                    b.server.close()
                raise BindError(
                    f"listeners[{i}].bind: cannot listen on {lst.bind}: {exc.strerror or exc}"
                ) from None
        taken = {name: self.bound.pop(heir) for name, heir in moved.items()}
        for name, b in opened.items():
            self.handles.setdefault(name, b.handle)
        for name, b in taken.items():
            b.handle = self.handles.setdefault(name, ListenerHandle(snap.listeners[name]))
            log.info("listener %s takes over the socket on %s", name, b.address)
        for name, runtime in snap.listeners.items():
            self.handles[name].runtime = runtime
        for name, b in list(self.bound.items()):
            if name not in snap.listeners or name in opened or name in taken:
                b.server.close()
                del self.bound[name]
                log.info("listener %s stopped accepting on %s", name, b.address)
        for name, b in (*opened.items(), *taken.items()):
            self.bound[name] = b
            log.info("listener %s accepting on %s", name, self.address(name))
        for name in list(self.handles):
            if name not in snap.listeners:
                del self.handles[name]

    def _vacated(self, address: Address, snap: Snapshot) -> str | None:
        """The listener bound to ``address`` that ``snap`` no longer has there, if any."""
        if address.port == 0:
            return None  # port 0 is a new port each time, never the same socket
        for name, b in self.bound.items():
            if b.address == address:
                keeper = snap.listeners.get(name)
                if keeper is None or keeper.config.bind != address:
                    return name
        return None

    async def _open(self, address: Address, handle: ListenerHandle) -> _Bound:
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        bound = _Bound(address, handle)
        bound.server = await loop.create_server(
            lambda: ClientConnection(ctx, bound.handle),
            host=address.host,
            port=address.port,
            backlog=BACKLOG,
            reuse_address=True,
            reuse_port=self.reuse_port or None,
            family=socket.AF_INET6 if ":" in address.host else socket.AF_UNSPEC,
        )
        return bound

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


async def probe_binds(new: Snapshot, old: Snapshot | None) -> None:
    """Raise BindError if an address ``new`` adds could not be bound by the workers.

    Binds and closes a socket with SO_REUSEPORT, as the workers will, so an address the
    workers already share probes fine and one another program holds does not.
    """
    held = {lst.bind for lst in old.config.listeners} if old is not None else set()
    for i, lst in enumerate(new.config.listeners):
        if lst.bind in held or lst.bind.port == 0:
            continue
        family = socket.AF_INET6 if ":" in lst.bind.host else socket.AF_INET
        try:
            infos = socket.getaddrinfo(
                lst.bind.host, lst.bind.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )
            with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(infos[0][4])
        except OSError as exc:
            raise BindError(
                f"listeners[{i}].bind: cannot listen on {lst.bind}: {exc.strerror or exc}"
            ) from None
