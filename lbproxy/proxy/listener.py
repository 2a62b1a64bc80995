"""The listening sockets of the proxied listeners, reconciled against each new snapshot.

Owns the listening sockets, one ``Acceptor`` per listener, each listener's ``ListenerHandle``
(the runtime new connections and new requests read) and each https listener's SSLContext.
``apply`` builds the TLS contexts and opens every socket the new snapshot needs *before*
anything changes, so a bind or a certificate that fails leaves the old listeners as they
were; then it points handles at the new runtimes and stops accepting on the sockets no longer
wanted. A listener renamed (or moved onto an address another one leaves) takes that socket
over instead of binding it twice. Stopping a listener never touches connections it already
accepted.

Accepting on each socket is ``acceptor.Acceptor``'s.

``raise_fd_limit`` takes the process's whole open-file hard limit, every process that
accepts (single, worker) calls it once at start: each accepted client and each backend
connection is a descriptor.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
from typing import TYPE_CHECKING, Final

from ..config.model import Address
from . import tls
from .acceptor import Acceptor, Bound, Fronts
from .client_socket import ListenerHandle

if TYPE_CHECKING:
    from ..config.sections import Tls
    from ..core.snapshot import Snapshot
    from .context import Context

log = logging.getLogger("lbproxy.proxy.listener")

BACKLOG: Final = 2048


class BindError(Exception):
    """A listener's address could not be bound; carries the config place of it."""


class Opening:
    """Sockets opened for a snapshot, held as they are until ``Listeners.commit`` or
    ``cancel``. (A plain class: a compiled dataclass would import its fields' types, the
    snapshot and the config, when this module loads.)"""

    __slots__ = ("contexts", "moved", "opened", "snap")

    def __init__(
        self,
        snap: Snapshot,
        contexts: dict[str, tuple[tuple[Tls, bool], ssl.SSLContext]],
        opened: dict[str, Bound],
        moved: dict[str, str],
    ) -> None:
        self.snap = snap
        self.contexts = contexts
        self.opened = opened
        self.moved = moved  # listener -> the listener whose socket it takes over


class Listeners:
    def __init__(self, ctx: Context, fronts: Fronts, reuse_port: bool = False) -> None:
        self.ctx = ctx
        self.fronts = fronts
        # Workers share each listening address through SO_REUSEPORT; a lone process does not
        # set it, so a second lbproxy started by mistake fails to bind instead of sharing.
        self.reuse_port = reuse_port
        self.bound: dict[str, Bound] = {}
        self.handles: dict[str, ListenerHandle] = {}
        # https listener -> its context, and the files it was built from. A changed file set
        # (a renewed certificate changes Tls.digest) builds a new context for new connections;
        # open ones keep theirs.
        self.tls_contexts: dict[str, ssl.SSLContext] = {}
        self._tls_loaded: dict[str, tuple[Tls, bool]] = {}  # the files, and http2 (ALPN)

    def _build_tls(self, snap: Snapshot) -> dict[str, tuple[tuple[Tls, bool], ssl.SSLContext]]:
        """The contexts ``snap`` needs that are not loaded yet; BindError if one fails."""
        built: dict[str, tuple[tuple[Tls, bool], ssl.SSLContext]] = {}
        for i, lst in enumerate(snap.config.listeners):
            if lst.tls is None or self._tls_loaded.get(lst.name) == (lst.tls, lst.http2):
                continue
            try:
                context = tls.load(lst.tls, lst.http2).context
            except tls.TlsError as exc:
                raise BindError(f"listeners[{i}].tls: {exc}") from None
            built[lst.name] = ((lst.tls, lst.http2), context)
        return built

    async def apply(self, snap: Snapshot, hold: bool = False) -> None:
        """Make the open sockets match ``snap``; raise BindError and change nothing on failure.
        With ``hold`` new sockets listen but accept nothing until ``accept``."""
        self.commit(await self.open(snap), accept=not hold)

    async def open(self, snap: Snapshot) -> Opening:
        """Build the TLS contexts and open the sockets ``snap`` adds, held (listening, not
        accepting); raise BindError and change nothing on failure. Nothing else changes
        until ``commit`` (or ``cancel``)."""
        contexts = self._build_tls(snap)
        opened: dict[str, Bound] = {}
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
                opened[lst.name] = await self._open(lst.bind, handle, hold=True)
            except OSError as exc:
                for b in opened.values():
                    b.server.close()
                raise BindError(
                    f"listeners[{i}].bind: cannot listen on {lst.bind}: {exc.strerror or exc}"
                ) from None
            except BaseException:  # cancelled (a stop signal while starting): none left open
                for b in opened.values():
                    b.server.close()
                raise
        return Opening(snap, contexts, opened, moved)

    @staticmethod
    def cancel(opening: Opening) -> None:
        for b in opening.opened.values():
            b.server.close()

    def commit(self, opening: Opening, accept: bool = True) -> None:
        """Point the listeners at ``opening``'s snapshot, take over moved sockets, stop the
        ones no longer wanted, and (with ``accept``) start accepting on the new ones."""
        snap, contexts, opened, moved = (
            opening.snap,
            opening.contexts,
            opening.opened,
            opening.moved,
        )
        for name, (files, context) in contexts.items():
            self.tls_contexts[name] = context
            self._tls_loaded[name] = files
            log.info("listener %s: certificate %s loaded", name, files[0].cert)
        for name in list(self.tls_contexts):
            if name not in snap.listeners or snap.listeners[name].config.tls is None:
                del self.tls_contexts[name]
                del self._tls_loaded[name]
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
        if accept:
            for b in opened.values():
                b.server.accept()

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

    async def _open(self, address: Address, handle: ListenerHandle, hold: bool) -> Bound:
        loop = asyncio.get_running_loop()
        bound = Bound(address, handle)
        infos = await loop.getaddrinfo(
            address.host or None,
            address.port,
            family=socket.AF_INET6 if ":" in address.host else socket.AF_UNSPEC,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    # As asyncio and uvloop do: [::] takes IPv6 only; IPv4 has its own socket.
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        bound.server = Acceptor(self.ctx, self.fronts, self.tls_contexts, bound, sockets, hold)
        return bound

    def accept(self) -> None:
        """Start accepting on every socket opened held."""
        for b in self.bound.values():
            b.server.accept()

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

    Binds and closes a socket *without* SO_REUSEPORT: an address ``new`` adds is not held by
    our workers, so it must be free. With SO_REUSEPORT the probe (and then the workers) would
    join the sockets of any process of this user holding it, e.g. a second lbproxy started by
    mistake, and share its connections. Addresses the workers hold already are not probed.
    """
    held = {lst.bind for lst in old.config.listeners} if old is not None else set()
    for i, lst in enumerate(new.config.listeners):
        if lst.bind.port == 0:
            # Each worker would bind a port of its own: nothing would be shared (cli.py
            # refuses it at start; this refuses it at reload).
            raise BindError(f"listeners[{i}].bind: port 0 cannot be shared by workers; name a port")
        if lst.bind in held:
            continue
        family = socket.AF_INET6 if ":" in lst.bind.host else socket.AF_INET
        try:
            infos = socket.getaddrinfo(
                lst.bind.host, lst.bind.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )
            with socket.socket(infos[0][0], socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(infos[0][4])
        except OSError as exc:
            raise BindError(
                f"listeners[{i}].bind: cannot listen on {lst.bind}: {exc.strerror or exc}"
            ) from None


def raise_fd_limit() -> None:
    """Each proxied WebSocket costs two descriptors: take all the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
