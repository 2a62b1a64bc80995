"""A minimal WebSocket echo backend for the benchmark (and a fallback plain-HTTP backend).

Not aiohttp: the backends must cost as little CPU as possible so that the proxy in front of
them is what the benchmark measures. One Protocol per connection, no task, no frame objects:
the handshake is answered from the raw head, and after it every complete masked frame is
unmasked (aiohttp's C helper when importable, else a pure-Python XOR) and echoed unmasked in
one write per chunk. Close frames are answered and the connection closed (server first, as
RFC 6455 asks); pings get pongs. A request without ``Upgrade: websocket`` gets
``200 ok`` with keep-alive (used as the HTTP backend only when nginx is not installed).

Run: ``python -m bench.wsecho [--port N]``; prints ``listening PORT`` once bound.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import importlib
import resource
import signal
import socket
import sys
from collections.abc import Callable

import uvloop

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_HTTP_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def _py_mask(mask: bytes, data: bytearray) -> None:
    n = len(data)
    key = (mask * ((n >> 2) + 1))[:n]
    data[:] = (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def _load_mask() -> Callable[[bytes, bytearray], None]:
    try:  # a C loop from aiohttp (a dependency of lbproxy): ~30x faster on 64 KiB
        mod = importlib.import_module("aiohttp._websocket.mask")
    except ImportError:  # depends on the aiohttp build
        return _py_mask
    fn: Callable[[bytes, bytearray], None] = mod._websocket_mask_cython
    return fn


unmask = _load_mask()


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def frame_header(b0: int, n: int) -> bytes:
    """The header of an unmasked frame with first byte ``b0`` and a payload of ``n`` bytes."""
    if n < 126:
        return bytes((b0, n))
    if n < 65536:
        return bytes((b0, 126)) + n.to_bytes(2, "big")
    return bytes((b0, 127)) + n.to_bytes(8, "big")


class Echo(asyncio.Protocol):
    __slots__ = ("buf", "transport", "ws")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.ws = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.ws:
            self._frames(data)
        else:
            self._heads(data)

    def _heads(self, data: bytes) -> None:
        t = self.transport
        assert t is not None
        out = []
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                break
            head, data = data[: end + 4], data[end + 4 :]
            lower = head.lower()
            if b"upgrade: websocket" not in lower:
                out.append(_HTTP_OK)
                continue
            i = lower.find(b"sec-websocket-key:")
            j = head.find(b"\r\n", i)
            key = head[i + 18 : j].strip()
            out.append(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept_key(key) + b"\r\n\r\n"
            )
            self.ws = True
            t.write(b"".join(out))
            if data:
                self._frames(data)
            return
        if out:
            t.write(b"".join(out))

    def _frames(self, b: bytes) -> None:
        t = self.transport
        assert t is not None
        out: list[bytes] = []
        pos = 0
        n = len(b)
        while n - pos >= 2:
            b0 = b[pos]
            b1 = b[pos + 1]
            ln = b1 & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(b[pos + 2 : pos + 4], "big")
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(b[pos + 2 : pos + 10], "big")
                hl = 10
            if b1 & 0x80:
                hl += 4
            end = pos + hl + ln
            if end > n:
                break
            payload = bytearray(b[pos + hl : end])
            if b1 & 0x80:
                unmask(b[pos + hl - 4 : pos + hl], payload)
            pos = end
            opcode = b0 & 0x0F
            if opcode == 8:  # close: answer it and close, server first
                out.append(frame_header(0x88, len(payload)) + payload)
                t.write(b"".join(out))
                t.close()
                return
            if opcode == 9:  # ping -> pong
                out.append(frame_header(0x8A, len(payload)) + payload)
            elif opcode != 10:
                out.append(frame_header(b0, ln))
                out.append(bytes(payload))
        if pos < n:
            self.buf = b[pos:]
        if out:
            t.write(b"".join(out) if len(out) > 1 else out[0])


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = await loop.create_server(Echo, sock=sock, backlog=4096)
    print(f"listening {sock.getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    raise_nofile()
    uvloop.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
