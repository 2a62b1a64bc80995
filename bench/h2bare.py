"""The cheapest HTTP/2 server the ``h2`` package allows: the floor under lbproxy's per-request
HTTP/2 cost for as long as lbproxy keeps h2's state machine and protocol checks (issue 24).

Not a proxy: it answers every request itself, with the head an nginx backend's answer
becomes in lbproxy (:status 200, server, date, content-type, content-length) and a 2-byte
body, so no backend connection, no HTTP/1.1 parsing, no routing, no metrics. What it keeps is
what lbproxy's front end cannot drop while it uses h2: TLS with ALPN, ``receive_data`` (frame
parsing, HPACK decoding, the inbound header checks, stream states), ``send_headers`` and
``send_data`` (HPACK encoding with h2's own encoder unless ``--encoder`` says otherwise, frame
building), one write a turn of the loop. h2 is configured as lbproxy configures it (outbound
validation off, hpack's per-field debug logging replaced by a no-op).

``bench.run --only h2bare,lbproxy,nginx --phases warmup,h2`` measures it beside lbproxy and
nginx in one run (HTTP/2 phase only).

Run: ``python -m bench.h2bare PORT CERT KEY [--encoder h2|lbproxy]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import ssl
from email.utils import formatdate

import uvloop
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, RequestReceived


def _quiet(*args: object) -> None:
    return None


setattr(logging.getLogger("hpack.hpack"), "debug", _quiet)  # noqa: B010 (as lbproxy does)


class Bare(asyncio.Protocol):
    encoder: str = "h2"

    def __init__(self) -> None:
        self.h2 = H2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        if self.encoder == "lbproxy":
            from lbproxy.wire.hpack_static import StaticEncoder

            self.h2.encoder = StaticEncoder()  # type: ignore[assignment]
        self.transport: asyncio.Transport | None = None
        self.flush_soon = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's TLS transport)
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        h2 = self.h2
        for ev in h2.receive_data(data):
            if isinstance(ev, RequestReceived):
                sid = ev.stream_id
                assert sid is not None
                h2.send_headers(sid, _head())
                h2.send_data(sid, b"ok", end_stream=True)
            elif isinstance(ev, DataReceived):
                h2.acknowledge_received_data(ev.flow_controlled_length or 0, ev.stream_id or 0)
            elif isinstance(ev, ConnectionTerminated):
                self.flush()
                if self.transport is not None:
                    self.transport.close()
                return
        if not self.flush_soon:  # one write a turn of the loop, as lbproxy
            self.flush_soon = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_soon = False
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


_date = [0.0, b""]


def _head() -> list[tuple[bytes, bytes]]:
    loop = asyncio.get_running_loop()
    now = loop.time()
    if now - _date[0] >= 1.0:  # type: ignore[operator]
        _date[0] = now
        _date[1] = formatdate(usegmt=True).encode()
    return [
        (b":status", b"200"),
        (b"server", b"nginx/1.22.1"),
        (b"date", _date[1]),  # type: ignore[list-item]
        (b"content-type", b"text/plain"),
        (b"content-length", b"2"),
    ]


async def main(port: int, cert: str, key: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["h2"])
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Bare, "127.0.0.1", port, ssl=ctx, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("port", type=int)
    p.add_argument("cert")
    p.add_argument("key")
    p.add_argument("--encoder", choices=("h2", "lbproxy"), default="h2")
    a = p.parse_args()
    Bare.encoder = a.encoder
    uvloop.run(main(a.port, a.cert, a.key))
