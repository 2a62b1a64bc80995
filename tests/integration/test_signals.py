"""Signals from the first instant (issue 19): SIGHUP, SIGTERM and SIGINT are lbproxy's from its
entry point's first statement, in a single process, in the supervisor and in every worker.

A real ``python -m lbproxy`` (alone and with ``--workers 2``) gets each signal:
- the moment its port first accepts (a connect polled in a tight loop, then the signal at
  once), five times each: after SIGHUP it is alive, serves, and the reload happened (the
  file was changed just before, so the new backend answers); after SIGTERM/SIGINT it exits 0
  without a traceback;
- while it starts, before it can be ready: the first health check of the warm-up is held by
  the backend until the test lets it go, so the process cannot be ready meanwhile. SIGHUPs
  sent then are held and coalesce into one reload, done once ready; a SIGTERM/SIGINT then
  abandons the start and exits 0 without waiting for the check;
- just after it starts (the line it logs once the signals are its own and its config is
  read), before any bind;
- a worker gets SIGHUP as soon as /proc shows it ignores SIGHUP (its first statement),
  before it has its config or a socket: it lives on and serves; and earlier, as soon as it
  exists (its interpreter starting): it was spawned with the signals blocked, and lives.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.integration.test_workers import (
    Cluster,
    lb_doc,
    listening,
    sockets_of,
    spawn,
    write_config,
)
from tests.support import backend_app, free_port, wait_for

REPEATS = 5
HANG = 30.0  # seconds: only a hang guard, never a timing expectation
MODES = {"single": (), "workers": ("--workers", "2")}


class Gate:
    """Holds every health check a backend receives until ``release``."""

    def __init__(self) -> None:
        self.seen = asyncio.Event()
        self.open = asyncio.Event()

    def app(self, name: str) -> web.Application:
        app = backend_app(name)

        @web.middleware
        async def gate(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path == "/health":
                self.seen.set()
                await self.open.wait()
            resp: web.StreamResponse = await handler(request)
            return resp

        app.middlewares.insert(0, gate)
        return app


Launch = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launch]:
    """``await launch(servers, mode, **group)``: lbproxy started on free ports, not waited for."""
    started: list[Cluster] = []

    async def start(servers: list[str], mode: str, **group: Any) -> Cluster:
        port, admin = free_port(), free_port()
        path = tmp_path / f"lb{len(started)}.yaml"
        write_config(path, lb_doc(servers, port, admin, group or None))
        c = Cluster(await spawn(path, *MODES[mode]), path, port, admin)
        started.append(c)
        return c

    yield start
    for c in started:
        await c.stop()


async def first_accept(c: Cluster) -> None:
    """Return the moment a connect to ``c``'s port first succeeds."""
    deadline = time.monotonic() + HANG
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", c.port)) == 0:
                return
        assert c.proc.returncode is None, "\n".join(c.lines)
        assert time.monotonic() < deadline, "the port never accepted"
        await asyncio.sleep(0)  # let the log reader run; still a tight loop


async def answers(c: Cluster, name: str, n: int = 4) -> bool:
    """``n`` requests in a row, each over a new connection, all answered by ``name``."""
    try:
        for _ in range(n):
            reply = await c.request()
            if (reply.status, reply.body) != (200, name):
                return False
    except OSError:
        return False
    return True


async def exits_cleanly(c: Cluster) -> None:
    assert await c.exit_code(HANG) == 0, "\n".join(c.lines)
    assert not c.logged("Traceback"), "\n".join(c.lines)
    assert c.lines[-1].endswith(" INFO lbproxy: stopped"), "\n".join(c.lines)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", c.port)) != 0  # nothing left listening


def switch_to(c: Cluster, servers: list[str], **group: Any) -> None:
    """Point the config file at ``servers``, unseen by the file watcher (same size, inode and
    mtime): only a SIGHUP applies it."""
    port, admin = c.port, int(c.admin.rsplit(":", 1)[1])
    write_config(c.path, lb_doc(servers, port, admin, group or None), keep_signature=True)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name
)
async def test_signal_the_moment_the_port_first_accepts(make_backend, launch, mode, sig):
    a = await make_backend("A")
    b = await make_backend("B")
    for _ in range(REPEATS):
        c = await launch([a.address], mode)
        await first_accept(c)
        if sig == signal.SIGHUP:
            switch_to(c, [b.address])
        c.proc.send_signal(sig)
        if sig != signal.SIGHUP:
            await exits_cleanly(c)
            continue
        await wait_for(lambda c=c: answers(c, "B"), HANG, "B to answer after the reload")
        assert c.proc.returncode is None
        assert c.logged("reload (SIGHUP): applied") == 1, "\n".join(c.lines)
        assert not c.logged("exited with"), "\n".join(c.lines)  # no worker died either
        c.proc.send_signal(signal.SIGTERM)
        await exits_cleanly(c)


@pytest.mark.parametrize("mode", list(MODES))
async def test_sighups_while_starting_are_held_and_coalesce_into_one_reload(
    make_backend, launch, mode
):
    gate = Gate()
    a = await make_backend("A", app=gate.app)
    b = await make_backend("B")
    c = await launch([a.address], mode, health_check={"path": "/health", "timeout": "60s"})
    # The warm-up check is held: lbproxy is starting and cannot be ready until it is let go.
    await asyncio.wait_for(gate.seen.wait(), HANG)
    switch_to(c, [b.address], health_check={"path": "/health", "timeout": "60s"})
    for n in (1, 2, 3):
        c.proc.send_signal(signal.SIGHUP)
        await c.wait_logged("SIGHUP while starting: held", n, HANG)
    assert not c.logged("reload (")
    gate.open.set()
    await wait_for(lambda: answers(c, "B"), HANG, "B to answer after the held reload")
    # One more SIGHUP, now that it is ready: reloads run one at a time, in order, so any
    # reload the three held ones had left behind would be logged before this one's.
    c.proc.send_signal(signal.SIGHUP)
    await c.wait_logged("reload (SIGHUP): configuration unchanged", 1, HANG)
    reloads = [i for i, line in enumerate(c.lines) if "reload (SIGHUP)" in line]
    assert len(reloads) == 2, "\n".join(c.lines)
    ready = next(i for i, line in enumerate(c.lines) if "admin on" in line)
    assert "reload (SIGHUP): applied" in c.lines[reloads[0]]
    assert ready < reloads[0]  # performed once ready, not before
    st = await c.status()
    # A stays listed (removed) while a connection to it is still open: under load it can be.
    servers = st["server_groups"][0]["servers"]
    assert [s["address"] for s in servers if not s["removed"]] == [b.address]
    c.proc.send_signal(signal.SIGTERM)
    await exits_cleanly(c)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_stop_signal_while_starting_abandons_the_start_and_exits_zero(
    make_backend, launch, mode, sig
):
    gate = Gate()
    a = await make_backend("A", app=gate.app)
    c = await launch([a.address], mode, health_check={"path": "/health", "timeout": "60s"})
    await asyncio.wait_for(gate.seen.wait(), HANG)
    c.proc.send_signal(sig)
    # The held check would keep a start that ignored the signal for 60 s.
    await exits_cleanly(c)
    assert c.logged(f"{sig.name} while starting: stopping")
    assert not c.logged("admin on")
    gate.open.set()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM], ids=lambda s: s.name)
async def test_signal_just_after_start_before_any_bind(make_backend, launch, mode, sig):
    a = await make_backend("A")
    b = await make_backend("B")
    c = await launch([a.address], mode)
    # Logged once the signals are lbproxy's and its config is read, before the event loop
    # runs and anything is bound.
    await c.wait_logged("starting (pid", 1, HANG)
    if sig == signal.SIGHUP:
        switch_to(c, [b.address])
    c.proc.send_signal(sig)
    if sig != signal.SIGHUP:
        await exits_cleanly(c)
        return
    await wait_for(lambda: answers(c, "B"), HANG, "B to answer after the reload")
    assert c.logged("reload (SIGHUP): applied") == 1, "\n".join(c.lines)
    c.proc.send_signal(signal.SIGTERM)
    await exits_cleanly(c)


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]
    return []


def ignores_sighup(pid: int) -> bool:
    """Whether /proc says ``pid`` ignores SIGHUP (bit 0 of SigIgn)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line for line in f if line.startswith("SigIgn:")).split()[1]
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) & (1 << (signal.SIGHUP - 1)))


async def test_a_worker_ignores_sighup_from_its_first_statement(make_backend, launch):
    a = await make_backend("A")
    # The point is a SIGHUP before the worker listens (it ignores SIGHUP from before its
    # heavy imports, a good part of a second before its bind). On a loaded machine this
    # poller may not run for that long: then the try proves nothing, and another start is
    # made (a worker signalled after its bind is not a failure of lbproxy).
    for _attempt in range(5):
        c = await launch([a.address], "workers")
        hit: set[int] = set()
        bound_before = False  # whether a worker had bound its socket when it got the signal
        deadline = time.monotonic() + HANG
        while len(hit) < 2:  # each worker, as soon as it ignores SIGHUP: before config or bind
            for pid in children(c.proc.pid):
                if pid not in hit and ignores_sighup(pid):
                    os.kill(pid, signal.SIGHUP)
                    hit.add(pid)
                    bound_before |= bool(sockets_of(pid) & listening(c.port))
            assert c.proc.returncode is None, "\n".join(c.lines)
            assert time.monotonic() < deadline, "no worker came to ignore SIGHUP"
            await asyncio.sleep(0)
        if not bound_before:
            break
        await c.stop()
    assert not bound_before, "every start's workers had bound before this test could signal"
    await c.wait_logged("admin on", 1, HANG)
    await wait_for(lambda: answers(c, "A"), HANG, "A to answer")
    assert sorted(await c.worker_pids()) == sorted(hit)  # the same two: none died
    assert not c.logged("exited with"), "\n".join(c.lines)
    c.proc.send_signal(signal.SIGTERM)
    await exits_cleanly(c)


def blocks_or_ignores_sighup(pid: int) -> bool:
    """Whether /proc says ``pid`` has SIGHUP blocked (SigBlk) or ignored (SigIgn)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = [line.split()[1] for line in f if line.startswith(("SigBlk:", "SigIgn:"))]
    except (OSError, IndexError):
        return False
    return any(int(mask, 16) & (1 << (signal.SIGHUP - 1)) for mask in masks)


async def test_a_worker_signalled_the_instant_it_exists_lives(make_backend, launch):
    """Earlier still: SIGHUP to each worker as soon as the supervisor's children list shows
    it, while its interpreter starts (~20 ms before any lbproxy line runs). It is spawned
    with the signals blocked (run/child.py), so the signal waits and is then ignored; spawned
    as asyncio does under uvloop (mask emptied), it died of its default action."""
    a = await make_backend("A")
    c = await launch([a.address], "workers")
    hit: dict[int, bool] = {}  # pid: whether it blocked or ignored SIGHUP when it got one
    deadline = time.monotonic() + HANG
    while len(hit) < 2:
        for pid in children(c.proc.pid):
            if pid not in hit:
                hit[pid] = blocks_or_ignores_sighup(pid)
                os.kill(pid, signal.SIGHUP)
        assert c.proc.returncode is None, "\n".join(c.lines)
        assert time.monotonic() < deadline, "no worker appeared"
        await asyncio.sleep(0)
    assert all(hit.values()), hit
    await c.wait_logged("admin on", 1, HANG)
    await wait_for(lambda: answers(c, "A"), HANG, "A to answer")
    assert sorted(await c.worker_pids()) == sorted(hit)  # the same two: none died
    assert not c.logged("exited with"), "\n".join(c.lines)
    c.proc.send_signal(signal.SIGTERM)
    await exits_cleanly(c)


async def test_backend_gate_holds_the_start(make_backend, launch):
    """The gate the tests above rely on: while the warm-up check is held, lbproxy is not
    ready (no admin), and it becomes ready once the check is let go."""
    gate = Gate()
    a = await make_backend("A", app=gate.app)
    c = await launch([a.address], "single", health_check={"path": "/health", "timeout": "60s"})
    await asyncio.wait_for(gate.seen.wait(), HANG)
    await first_accept(c)  # bound (clients wait in the backlog)...
    assert not c.logged("admin on")  # ...but not ready
    gate.open.set()
    await c.wait_logged("admin on", 1, HANG)
    await wait_for(lambda: answers(c, "A"), HANG, "A to answer")
