"""The benchmark's load generator for WebSocket over HTTP/2 (RFC 8441): ``--conns`` TLS
connections (ALPN h2), each with ``--streams`` extended CONNECT streams (``:protocol
websocket``), each stream keeping one ``--size``-byte message in flight for ``--duration``
seconds after ``--warmup``; prints one JSON object: round trips, their rate, and the CPU
seconds the processes ``--pids`` spent in the measured window.

The client is the ``h2`` package (pure Python), so it is slower than the proxies it loads: the
figure that matters is the proxy's CPU per relayed message, not the rate. Echoes are counted
by length (an unmasked frame of known size); the first one on each stream is compared byte
for byte. Run: ``python -m bench.h2wsload --target 127.0.0.1:8443 --conns 2 --streams 25``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time

import uvloop
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset
from h2.exceptions import ProtocolError

from bench.procfs import cpu_seconds
from bench.wsload import masked_frame

perf = time.perf_counter


class Shared:
    def __init__(self, size: int) -> None:
        payload = bytes(i & 0xFF for i in range(size))
        self.message = masked_frame(payload)
        n = len(payload)
        head = bytes([0x82, n]) if n <= 125 else bytes([0x82, 126]) + n.to_bytes(2, "big")
        self.echo = head + payload
        self.recording = False
        self.stopping = False
        self.count = 0
        self.bad = 0
        self.failed = 0


class Conn(asyncio.Protocol):
    def __init__(self, shared: Shared, path: str, streams: int) -> None:
        self.shared = shared
        self.path = path.encode()
        self.n = streams
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.got: dict[int, int] = {}  # stream -> echo bytes received of the message in flight
        self.first: dict[int, bytearray] = {}  # stream -> the first echo, to compare
        self.ready = asyncio.get_running_loop().create_future()
        self.opened = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.initiate_connection()
        self._flush()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _open(self) -> None:
        self.opened = True
        for _ in range(self.n):
            sid = self.h2.get_next_available_stream_id()
            self.h2.send_headers(
                sid,
                [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                 (b":path", self.path), (b":authority", b"localhost"),
                 (b"sec-websocket-version", b"13")],
            )  # fmt: skip

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.shared.failed += 1
            if self.transport is not None:
                self.transport.close()
            return
        if not self.opened and self.h2.remote_settings.enable_connect_protocol:
            self._open()
        shared = self.shared
        echo = len(shared.echo)
        for ev in events:
            if isinstance(ev, ResponseReceived):
                sid = ev.stream_id
                status = dict(ev.headers or []).get(b":status")
                if status != b"200":
                    shared.failed += 1
                    continue
                self.got[sid] = 0
                self.first[sid] = bytearray()
                self.h2.send_data(sid, shared.message)
                if len(self.got) == self.n and not self.ready.done():
                    self.ready.set_result(None)
            elif isinstance(ev, DataReceived):
                sid = ev.stream_id
                body = ev.data or b""
                self.h2.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
                first = self.first.get(sid)
                if first is not None:
                    first += body
                    if len(first) >= echo:
                        if bytes(first[:echo]) != shared.echo:
                            shared.bad += 1
                        del self.first[sid]
                got = self.got.get(sid, 0) + len(body)
                while got >= echo:
                    got -= echo
                    if shared.recording:
                        shared.count += 1
                    if not shared.stopping:
                        self.h2.send_data(sid, shared.message)
                self.got[sid] = got
            elif isinstance(ev, StreamEnded | StreamReset):
                shared.failed += 1
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed before its streams opened"))


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    shared = Shared(args.size)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    host, port = args.target.rsplit(":", 1)
    conns: list[Conn] = []
    for _ in range(args.conns):
        _, c = await loop.create_connection(
            lambda: Conn(shared, args.path, args.streams),
            host,
            int(port),
            ssl=ctx,
            server_hostname="localhost",
        )
        conns.append(c)
    try:
        await asyncio.wait_for(asyncio.gather(*(c.ready for c in conns)), 20)
    except (TimeoutError, ConnectionError) as exc:
        return {"error": f"streams did not open: {exc!r} ({shared.failed} refused)"}
    await asyncio.sleep(args.warmup)
    cpu0 = cpu_seconds(args.pids)
    t0 = perf()
    shared.recording = True
    await asyncio.sleep(args.duration)
    shared.recording = False
    t1 = perf()
    cpu1 = cpu_seconds(args.pids)
    shared.stopping = True
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    count = shared.count
    return {
        "conns": len(conns),
        "streams": len(conns) * args.streams,
        "failed": shared.failed,
        "bad": shared.bad,
        "round_trips": count,
        "seconds": t1 - t0,
        "rate": count / (t1 - t0),
        "cpu": (cpu1 - cpu0) if args.pids else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--target", required=True, help="host:port of an https listener")
    p.add_argument("--path", default="/ws")
    p.add_argument("--pids", default="", help="processes whose CPU to read, comma-separated")
    p.add_argument("--conns", type=int, default=2)
    p.add_argument("--streams", type=int, default=25, help="WebSocket streams per connection")
    p.add_argument("--size", type=int, default=64, help="message payload bytes")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=0.5)
    args = p.parse_args(argv)
    args.pids = [int(x) for x in args.pids.split(",") if x]
    result = uvloop.run(run(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
