"""Reload soak (issue 12): frequent reloads that swap whole server sets, under load.

Starts six backends in this process (aiohttp: ``/whoami``, ``/health``, a ``/ws`` echo), a
real ``python -m lbproxy`` (``--workers N`` optional), ``--http-clients`` HTTP clients
(keep-alive, ``GET /whoami`` back to back) and ``--tunnels`` WebSocket tunnels that each send
a numbered message every ``--message-interval`` and check that every echo comes back, in
order. Then it reloads every ``--interval``: the config file is replaced (written aside,
renamed over) and ``POST /-/reload`` applies it, cycling server sets that include full swaps
(no server in common with the set before). Tunnels stay on servers a reload removed (those
backends keep running), as ``drain_timeout: 0s`` promises.

The bar: every reload applied, zero failed requests (anything but a 200 from a backend, or
a connection error), zero tunnels lost, zero echoes missing. The last line of stdout is a
JSON report; the exit status is 0 only when the bar is met.

Run by hand (about two minutes; ``tests/integration/test_reload_soak.py`` runs a short one):

    .venv/bin/python -m bench.reload_soak --reloads 1000
    .venv/bin/python -m bench.reload_soak --reloads 1000 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
import yaml
from aiohttp import WSMsgType, web

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = "ABCDEF"
# Server sets cycled through, as indexes into BACKENDS. Consecutive sets with nothing in
# common are full swaps (blue/green): AB -> CD, EF -> A, ABC -> DEF, DEF -> B.
SETS: tuple[tuple[int, ...], ...] = (
    (0, 1),
    (2, 3),
    (2, 3, 4),
    (4, 5),
    (0,),
    (0, 1, 2),
    (3, 4, 5),
    (1,),
)
START_TIMEOUT = 30.0
DRAIN_TIMEOUT = 15.0  # for the last echoes after the load stops


@dataclass
class Options:
    reloads: int = 1000
    interval: float = 0.1
    http_clients: int = 16
    tunnels: int = 100
    message_interval: float = 0.1
    workers: int = 1


@dataclass
class Report:
    reloads: int = 0
    reloads_applied: int = 0
    reload_errors: list[str] = field(default_factory=list)
    reload_ms_p50: float = 0.0
    reload_ms_max: float = 0.0
    full_swaps: int = 0
    requests: int = 0
    failed_requests: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, for the reader
    served_by: dict[str, int] = field(default_factory=dict)
    tunnels: int = 0
    tunnels_lost: int = 0
    tunnel_errors: list[str] = field(default_factory=list)
    messages: int = 0
    echoes_missing: int = 0
    seconds: float = 0.0
    lbproxy_exit: int | None = None

    @property
    def ok(self) -> bool:
        return (
            self.reloads_applied == self.reloads
            and self.failed_requests == 0
            and self.tunnels_lost == 0
            and self.echoes_missing == 0
            and self.requests > 0
        )

    def failure(self, text: str) -> None:
        self.failed_requests += 1
        if len(self.failures) < 20:
            self.failures.append(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------------------ backends


def backend(name: str) -> web.Application:
    app = web.Application()

    async def whoami(request: web.Request) -> web.Response:
        return web.Response(text=name)

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        resp = web.WebSocketResponse()
        await resp.prepare(request)
        async for msg in resp:
            if msg.type == WSMsgType.TEXT:
                await resp.send_str(msg.data)
        return resp

    app.router.add_get("/whoami", whoami)
    app.router.add_route("*", "/health", health)
    app.router.add_get("/ws", ws)
    return app


async def start_backends() -> tuple[list[web.AppRunner], list[str]]:
    runners, addresses = [], []
    for name in BACKENDS:
        runner = web.AppRunner(backend(name), handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        runners.append(runner)
        addresses.append(f"127.0.0.1:{port}")
    return runners, addresses


# ------------------------------------------------------------------------------ the proxy


def config(servers: list[str], port: int, admin: int) -> dict[str, Any]:
    return {
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{port}", "server_group": "app"}],
        "server_groups": {
            "app": {
                "servers": [{"address": s} for s in servers],
                "health_check": {"path": "/health", "interval": "2s", "timeout": "2s"},
            }
        },
        "admin": {"bind": f"127.0.0.1:{admin}"},
        "access_log": {"enabled": False},
    }


def write_atomically(path: Path, doc: dict[str, Any]) -> None:
    """Written aside and renamed over: neither the reload nor the file watcher can read a
    half-written file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ the load


class Tunnel:
    """One WebSocket: sends ``i:n`` every interval, checks the echoes arrive in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, index: int) -> None:
        self.ws = ws
        self.index = index
        self.sent = 0
        self.received = 0
        self.error: str | None = None
        self.closing = False

    async def send_loop(self, stop: asyncio.Event, interval: float) -> None:
        try:
            while not stop.is_set():
                await self.ws.send_str(f"{self.index}:{self.sent}")
                self.sent += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        except Exception as exc:
            self.error = self.error or f"send failed after {self.sent}: {exc!r}"

    async def receive_loop(self) -> None:
        async for msg in self.ws:
            want = f"{self.index}:{self.received}"
            if msg.type != WSMsgType.TEXT or msg.data != want:
                self.error = self.error or f"got {msg.type} {msg.data!r}, expected {want!r}"
                return
            self.received += 1
        if not self.closing:
            self.error = self.error or (
                f"ended after {self.received} echoes: close code {self.ws.close_code}"
            )


async def http_client(url: str, stop: asyncio.Event, report: Report) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        while not stop.is_set():
            try:
                async with session.get(url) as r:
                    body = await r.text()
                    if r.status == 200 and body in BACKENDS:
                        report.requests += 1
                        report.served_by[body] = report.served_by.get(body, 0) + 1
                    else:
                        report.failure(f"{r.status} {body[:80]!r}")
            except aiohttp.ClientError as exc:
                report.failure(repr(exc))
                await asyncio.sleep(0.01)


async def until_serving(session: aiohttp.ClientSession, urls: list[str], proc: Any) -> None:
    """Until each of ``urls`` answers 200 (the admin listener starts after the workers)."""
    deadline = time.monotonic() + START_TIMEOUT
    for url in urls:
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"lbproxy exited with {proc.returncode} before serving")
            if time.monotonic() > deadline:
                raise RuntimeError(f"lbproxy did not serve {url} within {START_TIMEOUT:g}s")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as r:
                    if r.status == 200:
                        break
            await asyncio.sleep(0.05)


async def soak(opts: Options, workdir: Path) -> Report:
    report = Report()
    runners, addresses = await start_backends()
    port, admin = free_port(), free_port()
    path = workdir / "lb.yaml"
    variants = [config([addresses[i] for i in s], port, admin) for s in SETS]
    write_atomically(path, variants[0])
    args = ["--workers", str(opts.workers)] if opts.workers > 1 else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lbproxy",
        "--config",
        str(path),
        "--log-level",
        "warning",
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/whoami"
    stop = asyncio.Event()
    tunnels: list[Tunnel] = []
    tasks: list[asyncio.Task[None]] = []
    started = time.monotonic()
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            await until_serving(session, [url, f"http://127.0.0.1:{admin}/healthz"], proc)
            for i in range(opts.tunnels):
                ws = await session.ws_connect(f"ws://127.0.0.1:{port}/ws")
                t = Tunnel(ws, i)
                tunnels.append(t)
                tasks.append(asyncio.create_task(t.receive_loop()))
                tasks.append(asyncio.create_task(t.send_loop(stop, opts.message_interval)))
            report.tunnels = len(tunnels)
            clients = [
                asyncio.create_task(http_client(url, stop, report))
                for _ in range(opts.http_clients)
            ]
            await reload_loop(session, opts, path, variants, admin, report, proc)
            stop.set()
            await asyncio.gather(*clients)
            deadline = time.monotonic() + DRAIN_TIMEOUT
            while time.monotonic() < deadline and not all(
                t.received == t.sent or t.error for t in tunnels
            ):
                await asyncio.sleep(0.05)
            report.messages = sum(t.sent for t in tunnels)
            report.echoes_missing = sum(t.sent - t.received for t in tunnels)
            lost = [t for t in tunnels if t.error or t.ws.closed]
            report.tunnels_lost = len(lost)
            report.tunnel_errors = [f"tunnel {t.index}: {t.error}" for t in lost[:20]]
            for t in tunnels:
                t.closing = True
                await t.ws.close()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        stop.set()
        report.seconds = round(time.monotonic() - started, 1)
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        report.lbproxy_exit = proc.returncode
        for r in runners:
            await r.cleanup()
    return report


async def reload_loop(
    session: aiohttp.ClientSession,
    opts: Options,
    path: Path,
    variants: list[dict[str, Any]],
    admin: int,
    report: Report,
    proc: Any,
) -> None:
    times: list[float] = []
    loop = asyncio.get_running_loop()
    for n in range(1, opts.reloads + 1):
        due = loop.time() + opts.interval
        if proc.returncode is not None:
            report.reload_errors.append(f"lbproxy exited with {proc.returncode}")
            return
        new, old = SETS[n % len(SETS)], SETS[(n - 1) % len(SETS)]
        report.full_swaps += not set(new) & set(old)
        write_atomically(path, variants[n % len(variants)])
        t0 = time.perf_counter()
        report.reloads += 1
        try:
            async with session.post(f"http://127.0.0.1:{admin}/-/reload", json={}) as r:
                answer = await r.json()
        except aiohttp.ClientError as exc:
            answer = {"result": "error", "errors": [repr(exc)]}
        times.append(time.perf_counter() - t0)
        # "Unchanged" when the file watcher saw the new file first and applied it already.
        if answer.get("result") == "ok":
            report.reloads_applied += 1
        elif len(report.reload_errors) < 20:
            report.reload_errors.append(f"reload {n}: {answer.get('errors')}")
        await asyncio.sleep(max(0.0, due - loop.time()))
    report.reload_ms_p50 = round(statistics.median(times) * 1000, 1)
    report.reload_ms_max = round(max(times) * 1000, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reload_soak", description=__doc__)
    p.add_argument("--reloads", type=int, default=Options.reloads)
    p.add_argument("--interval", type=float, default=Options.interval, help="seconds")
    p.add_argument("--http-clients", type=int, default=Options.http_clients)
    p.add_argument("--tunnels", type=int, default=Options.tunnels)
    p.add_argument("--message-interval", type=float, default=Options.message_interval)
    p.add_argument("--workers", type=int, default=Options.workers)
    a = p.parse_args(argv)
    opts = Options(a.reloads, a.interval, a.http_clients, a.tunnels, a.message_interval, a.workers)
    with tempfile.TemporaryDirectory(prefix="reload-soak-") as tmp:
        report = uvloop.run(soak(opts, Path(tmp)))
    print(json.dumps({"ok": report.ok, **asdict(report)}))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
