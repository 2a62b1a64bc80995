"""Scale-out benchmark (issue 21): WebSockets on two servers, a third joins; how long until
the tunnels are spread within tolerance, and how much proxy CPU that costs, with and without
``rebalance``.

Processes: three ``bench.wsecho`` backends, one lbproxy (``wlc``, admin on loopback), and the
clients here: raw asyncio Protocols (no task each) that open a WebSocket, stay idle, and on
a close frame answer it and reconnect after a random 0-0.5 s (as the chat page does on 1012).
The third server joins by a reload (``POST /-/reload``); /-/servers is polled every 0.25 s.
The proxy's CPU is utime + stime from /proc over the measured window.

Run: ``.venv/bin/python -m bench.scaleout [--tunnels 5000] [--rates 100,20] [--wait 120]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.procfs import cpu_seconds, tree
from bench.wsecho import raise_nofile

TOLERANCE = 1.25


def _request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


_CLOSE_REPLY = bytes([0x88, 0x82, 1, 2, 3, 4]) + bytes([0x03 ^ 1, 0xE9 ^ 2])  # masked 1001


class Clients:
    """Every client's state: how many are open, how many reconnected, close codes seen."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.open = 0
        self.reconnects = 0
        self.codes: dict[int, int] = {}
        self.loop = asyncio.get_running_loop()

    def connect(self) -> None:
        self.loop.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await self.loop.create_connection(lambda: Client(self), "127.0.0.1", self.port)
        except OSError:
            self.loop.call_later(0.5, self.connect)


class Client(asyncio.Protocol):
    def __init__(self, owner: Clients) -> None:
        self.owner = owner
        self.buf = b""
        self.up = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.write(_request(self.owner.port))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.up:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            if not head.startswith(b"HTTP/1.1 101"):
                assert self.transport is not None
                self.transport.close()
                return
            self.up = True
            self.owner.open += 1
            self.buf = rest
        if len(self.buf) >= 4 and self.buf[0] & 0x0F == 0x8:
            code = int.from_bytes(self.buf[2:4], "big") if self.buf[1] & 0x7F >= 2 else 0
            self.owner.codes[code] = self.owner.codes.get(code, 0) + 1
            assert self.transport is not None
            self.transport.write(_CLOSE_REPLY)
            self.buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up:
            self.owner.open -= 1
        owner = self.owner
        owner.reconnects += 1
        owner.loop.call_later(random.uniform(0, 0.5), owner.connect)


async def _spawn_backend() -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.wsecho", "--port", "0"], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await asyncio.get_running_loop().run_in_executor(None, proc.stdout.readline)
    return proc, int(line.split()[1])


def _config(path: Path, ports: list[int], listen: int, admin: int, rate: int | None) -> None:
    group: dict[str, Any] = {
        "scheduler": "wlc",
        "health_check": {"enabled": False},
        "servers": [f"127.0.0.1:{p}" for p in ports],
    }
    if rate is not None:
        group["rebalance"] = {"tolerance": TOLERANCE, "rate": rate}
    doc = {
        # Idle clients: the idle timeout must not close them during a long run.
        "listeners": [
            {
                "name": "web",
                "bind": f"127.0.0.1:{listen}",
                "server_group": "chat",
                "idle_timeout": "1h",
            }
        ],
        "server_groups": {"chat": group},
        "admin": {"bind": f"127.0.0.1:{admin}"},
        "access_log": {"enabled": False},
    }
    path.write_text(json.dumps(doc))  # YAML is a superset of JSON


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _within(counts: list[int]) -> bool:
    share = sum(counts) / len(counts)
    return all(
        not (n > share * TOLERANCE and n - share >= 1)
        and not (n < share / TOLERANCE and share - n >= 1)
        for n in counts
    )


async def scenario(tunnels: int, rate: int | None, wait: float) -> dict[str, Any]:
    backends = [await _spawn_backend() for _ in range(3)]
    ports = [p for _, p in backends]
    listen, admin = _free_port(), _free_port()
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "lb.yaml"
    _config(cfg, ports[:2], listen, admin, rate)
    proxy = subprocess.Popen(
        [sys.executable, "-m", "lbproxy", "-c", str(cfg)], stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{admin}"
    out: dict[str, Any] = {"tunnels": tunnels, "rate": rate}
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(f"{base}/healthz"):
                        break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.1)

            async def counts() -> list[int]:
                async with s.get(f"{base}/-/servers") as r:
                    return [x["websockets_active"] for x in await r.json()]

            clients = Clients(listen)
            for i in range(tunnels):
                clients.connect()
                if i % 200 == 199:
                    await asyncio.sleep(0.05)
            while clients.open < tunnels:
                await asyncio.sleep(0.1)
            out["before"] = await counts()
            _config(cfg, ports, listen, admin, rate)
            pids = tree(proxy.pid)
            cpu0, t0 = cpu_seconds(pids), time.monotonic()
            headers = {"Content-Type": "application/json"}
            async with s.post(f"{base}/-/reload", headers=headers) as r:
                assert r.status == 200, await r.text()
            balanced_at = None
            while time.monotonic() - t0 < wait:
                await asyncio.sleep(0.25)
                c = await counts()
                if len(c) == 3 and c[2] > 0 and _within(c) and balanced_at is None:
                    balanced_at = time.monotonic() - t0
                    out["balanced_cpu_s"] = cpu_seconds(pids) - cpu0
                    break
            out["after"] = await counts()
            out["time_to_balance_s"] = balanced_at
            out["window_s"] = time.monotonic() - t0
            out["proxy_cpu_s"] = cpu_seconds(pids) - cpu0
            out["reconnects"] = clients.reconnects
            out["close_codes"] = dict(clients.codes)
    finally:
        proxy.terminate()
        proxy.wait()
        for p, _ in backends:
            p.terminate()
            p.wait()
    return out


async def main_async(args: argparse.Namespace) -> None:
    rates: list[int | None] = [int(x) for x in args.rates.split(",")]
    for rate in [*rates, None]:
        r = await scenario(args.tunnels, rate, args.wait)
        print(json.dumps(r), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--tunnels", type=int, default=5000)
    p.add_argument("--rates", default="100,20", help="rebalance rates to try (then without)")
    p.add_argument("--wait", type=float, default=120.0, help="give up on balance after this")
    args = p.parse_args(argv)
    raise_nofile()
    uvloop.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
