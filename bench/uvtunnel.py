"""The cheapest WebSocket tunnel uvloop can do: the floor for lbproxy's per-message cost.

Not a proxy: no parsing beyond the end of the request head, no timeouts, no metrics, no
error handling. It takes a connection, reads the upgrade request head, connects to the next
backend (round-robin), sends the head, passes the 101 back and then only does
``peer.write(data)`` in each direction. ``bench.run --only uvtunnel,lbproxy,nginx --phases
warmup,ws100,paced`` compares lbproxy's tunnel with it (see NOTES.md).

Run: ``python -m bench.uvtunnel LISTEN_PORT BACKEND_PORT[,BACKEND_PORT...]``.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Iterator

import uvloop


class End(asyncio.Protocol):
    __slots__ = ("peer",)

    def __init__(self, peer: asyncio.Transport) -> None:
        self.peer = peer

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.peer.close()


class Upstream(End):
    """The backend side until its first bytes (the 101) have gone to the client."""

    __slots__ = ("transport",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.peer.write(data)
        self.transport.set_protocol(End(self.peer))


class Client(asyncio.Protocol):
    def __init__(self, backends: Iterator[int]) -> None:
        self.backends = backends
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            assert self.transport is not None
            self.transport.pause_reading()
            asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        client = self.transport
        assert client is not None
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(
                lambda: Upstream(client), "127.0.0.1", next(self.backends)
            )
        except OSError:
            client.close()
            return
        upstream.write(self.buf)
        client.set_protocol(End(upstream))
        client.resume_reading()


async def serve(port: int, backends: list[int]) -> None:
    loop = asyncio.get_running_loop()
    rr = itertools.cycle(backends)
    await loop.create_server(lambda: Client(rr), "127.0.0.1", port, backlog=4096)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    uvloop.run(serve(int(args[0]), [int(p) for p in args[1].split(",")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
