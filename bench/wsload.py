"""The benchmark's WebSocket load generator: uvloop, raw frames, Protocol callbacks.

The client must not be the bottleneck, so it never parses what comes back: the echo of an
``n``-byte message is an unmasked frame of known length, and a connection just counts bytes
(the first echo on each connection is compared byte for byte, so a proxy that mangles
frames fails the run). Frames are masked once, per connection, before the run starts.

Modes (each prints one JSON object on the last line of stdout):
- ``echo``: ``--conns`` connections, each keeping ``--window`` messages in flight for
  ``--duration`` seconds after ``--warmup``; round trips, their p50/p99 (window 1), and the
  CPU seconds the processes ``--pids`` spent during the measured window.
- ``idle``: open ``--conns`` connections and hold them; the PSS of ``--pids`` before and after.
- ``churn``: ``--conns`` workers, each looping connect, handshake, one echo, close handshake.

Run: ``python -m bench.wsload echo --target 127.0.0.1:8080 --conns 100 --size 64``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time

import uvloop

from bench.procfs import cpu_seconds, pss_kib

_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
_HANDSHAKE, _OPEN, _CLOSED = 0, 1, 2

perf = time.perf_counter


def masked_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A final client frame (masked with a random key, as RFC 6455 requires)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = (mask * ((n >> 2) + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
    return head + mask + body


def echo_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """The unmasked frame a server sends back for ``payload``."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


class Shared:
    """What every connection of a run shares: the payload, the counters, the clock state."""

    def __init__(self, payload: bytes, window: int, interval: float = 0.0) -> None:
        self.payload = payload
        self.expect = echo_frame(payload)
        self.reply_len = len(self.expect)
        self.window = window
        self.interval = interval  # paced runs: seconds between two messages of a connection
        self.loop: asyncio.AbstractEventLoop | None = None
        self.recording = False
        self.stopping = False
        self.count = 0  # round trips completed while recording
        self.lat: list[float] = []
        self.bad = 0  # connections whose first echo was wrong


class Conn(asyncio.Protocol):
    __slots__ = (
        "check",
        "closed",
        "frame",
        "got",
        "head",
        "next_at",
        "opened",
        "request",
        "sent",
        "shared",
        "state",
        "transport",
        "waiter",
    )

    def __init__(self, shared: Shared, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        self.shared = shared
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.state = _HANDSHAKE
        self.head = b""
        self.opened: asyncio.Future[bool] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.frame = masked_frame(shared.payload)
        self.got = 0
        self.check: bytearray | None = bytearray()  # the first echo, until it is verified
        self.sent: list[float] = []  # send times of the messages in flight (oldest first)
        self.waiter: asyncio.Future[None] | None = None  # woken by the next reply or the close
        self.next_at = 0.0  # paced runs: when the next message is due (loop time)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        transport.write(self.request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.state == _OPEN:
            if self.check is not None:
                self._verify(data)
                return
            self.got += len(data)
            if self.got >= self.shared.reply_len:
                self._replies()
            return
        if self.state == _HANDSHAKE:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            ok = self.head.startswith(b"HTTP/1.1 101")
            rest = self.head[end + 4 :]
            self.head = b""
            if not self.opened.done():
                self.opened.set_result(ok)
            if not ok:
                self.state = _CLOSED
                assert self.transport is not None
                self.transport.close()
                return
            self.state = _OPEN
            if rest:
                self.data_received(rest)

    def _verify(self, data: bytes) -> None:
        check = self.check
        assert check is not None
        check += data
        need = self.shared.reply_len
        if len(check) < need:
            return
        if bytes(check[:need]) != self.shared.expect:
            self.shared.bad += 1
        self.check = None
        self.got = len(check)
        self._replies()

    def _replies(self) -> None:
        s = self.shared
        n, self.got = divmod(self.got, s.reply_len)
        now = perf()
        sent = self.sent
        if s.recording:
            s.count += n
            if s.window == 1:
                s.lat.append(now - sent[0])
        del sent[:n]
        if self.waiter is not None:
            self._wake()
        if s.stopping:
            return
        if s.interval:  # paced: the next message at its scheduled time, not at once
            loop = s.loop
            assert loop is not None
            self.next_at += s.interval
            t = loop.time()
            if self.next_at > t:
                loop.call_at(self.next_at, self._send)
                return
            self.next_at = max(self.next_at, t - s.interval)  # late: catch up, but not in bursts
        assert self.transport is not None
        self.transport.write(self.frame * n if n > 1 else self.frame)
        sent.extend([now] * n)

    def _send(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.shared.stopping:
            return
        self.sent.append(perf())
        t.write(self.frame)

    def start(self, offset: float = 0.0) -> None:
        """Put the window of messages in flight (paced: the first one after ``offset`` s)."""
        assert self.transport is not None
        s = self.shared
        if s.interval:
            assert s.loop is not None
            self.next_at = s.loop.time() + offset
            s.loop.call_at(self.next_at, self._send)
            return
        w = s.window
        self.transport.write(self.frame * w)
        self.sent = [perf()] * w

    def _wake(self) -> None:
        w = self.waiter
        self.waiter = None
        if w is not None and not w.done():
            w.set_result(None)

    def send_close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(masked_frame((1000).to_bytes(2, "big"), opcode=0x8))

    def eof_received(self) -> bool:
        return False  # the server closed: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _CLOSED
        if not self.opened.done():
            self.opened.set_result(False)
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()


def _request(host: str, port: int) -> bytes:
    return (
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: "
        + _KEY.decode()
        + "\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def _open(shared: Shared, target: tuple[str, int], timeout: float = 10.0) -> Conn | None:
    loop = asyncio.get_running_loop()
    host, port = target
    request = _request(host, port)
    try:
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(lambda: Conn(shared, request), host, port)
            if await conn.opened:
                return conn
    except (OSError, TimeoutError):
        return None
    if conn.transport is not None:
        conn.transport.abort()
    return None


async def open_many(
    shared: Shared, targets: list[tuple[str, int]], n: int, parallel: int = 100
) -> tuple[list[Conn], int]:
    """Open ``n`` connections, at most ``parallel`` handshakes at a time, round-robin over
    ``targets``. Returns the open ones and how many failed."""
    conns: list[Conn] = []
    failed = 0
    sem = asyncio.Semaphore(parallel)

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            c = await _open(shared, targets[i % len(targets)])
        if c is None:
            failed += 1
        else:
            conns.append(c)

    await asyncio.gather(*(one(i) for i in range(n)))
    return conns, failed


async def close_all(conns: list[Conn], timeout: float = 10.0) -> None:
    """Close handshake on every connection (the server closes first), then wait for it."""
    for c in conns:
        c.send_close()
    pending = [c.closed for c in conns if not c.closed.done()]
    if pending:
        _, still = await asyncio.wait(pending, timeout=timeout)
        for c in conns:
            if not c.closed.done() and c.transport is not None:
                c.transport.abort()
        del still


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


async def run_echo(args: argparse.Namespace) -> dict[str, object]:
    interval = args.conns / args.rate if args.rate else 0.0
    shared = Shared(bytes(i & 0xFF for i in range(args.size)), args.window, interval)
    shared.loop = asyncio.get_running_loop()
    conns, failed = await open_many(shared, args.targets, args.conns)
    if not conns:
        return {"error": f"no connection opened ({failed} failed)"}
    for i, c in enumerate(conns):
        c.start(i * interval / len(conns))
    await asyncio.sleep(args.warmup)
    cpu0 = cpu_seconds(args.pids)
    t0 = perf()
    shared.recording = True
    await asyncio.sleep(args.duration)
    shared.recording = False
    t1 = perf()
    cpu1 = cpu_seconds(args.pids)
    shared.stopping = True
    count = shared.count
    await asyncio.sleep(0.05)
    await close_all(conns)
    lat = sorted(shared.lat)
    return {
        "conns": len(conns),
        "failed": failed,
        "bad": shared.bad,
        "round_trips": count,
        "seconds": t1 - t0,
        "rate": count / (t1 - t0),
        "bytes_per_s": count * args.size / (t1 - t0),
        "p50_us": _us(_percentile(lat, 0.50)),
        "p99_us": _us(_percentile(lat, 0.99)),
        "cpu": cpu1 - cpu0,
    }


async def run_idle(args: argparse.Namespace) -> dict[str, object]:
    shared = Shared(b"x" * 8, 1)
    pss0 = pss_kib(args.pids)
    t0 = perf()
    conns, failed = await open_many(shared, args.targets, args.conns)
    t_open = perf() - t0
    await asyncio.sleep(args.settle)
    pss1 = pss_kib(args.pids)
    # Still alive? One echo on a sample of them.
    sample = conns[:: max(1, len(conns) // 20)]
    shared.stopping = True
    for c in sample:
        c.start()
    await asyncio.sleep(0.2)
    alive = sum(1 for c in sample if c.check is None and c.state == _OPEN)
    await close_all(conns, timeout=20.0)
    return {
        "conns": len(conns),
        "failed": failed,
        "open_seconds": t_open,
        "pss_before_kib": pss0,
        "pss_after_kib": pss1,
        "sample": len(sample),
        "sample_alive": alive,
        "bad": shared.bad,
    }


async def run_churn(args: argparse.Namespace) -> dict[str, object]:
    shared = Shared(bytes(range(64)), 1)
    shared.stopping = True  # one message per connection: never send another
    loop = asyncio.get_running_loop()
    done = 0
    failed = 0
    recording = False
    stop = False

    async def worker(i: int) -> None:
        nonlocal done, failed
        target = args.targets[i % len(args.targets)]
        while not stop:
            c = await _open(shared, target)
            if c is None:
                failed += 1
                continue
            c.start()
            # One echo, then the close handshake (the server closes the TCP connection first).
            while c.check is not None and c.state == _OPEN:
                c.waiter = loop.create_future()
                await c.waiter
            c.send_close()
            await c.closed
            if recording:
                done += 1

    workers = [loop.create_task(worker(i)) for i in range(args.conns)]
    await asyncio.sleep(args.warmup)
    cpu0 = cpu_seconds(args.pids)
    t0 = perf()
    recording = True
    await asyncio.sleep(args.duration)
    recording = False
    t1 = perf()
    cpu1 = cpu_seconds(args.pids)
    count = done
    stop = True
    await asyncio.wait(workers, timeout=10)
    return {
        "conns": args.conns,
        "connections": count,
        "failed": failed,
        "bad": shared.bad,
        "seconds": t1 - t0,
        "rate": count / (t1 - t0),
        "cpu": cpu1 - cpu0,
    }


def _targets(text: str) -> list[tuple[str, int]]:
    out = []
    for item in text.split(","):
        host, _, port = item.rpartition(":")
        out.append((host, int(port)))
    return out


def _pids(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("mode", choices=["echo", "idle", "churn"])
    p.add_argument("--target", dest="targets", type=_targets, required=True, help="host:port,...")
    p.add_argument("--pids", type=_pids, default=[], help="processes whose CPU/PSS to read")
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--size", type=int, default=64, help="message payload bytes")
    p.add_argument("--window", type=int, default=1, help="messages in flight per connection")
    p.add_argument(
        "--rate", type=float, default=0.0, help="echo: round trips/s over all (0: closed loop)"
    )
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--settle", type=float, default=1.0, help="idle: wait before reading PSS")
    args = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    runner = {"echo": run_echo, "idle": run_idle, "churn": run_churn}[args.mode]
    result = uvloop.run(runner(args))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
