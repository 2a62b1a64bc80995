"""The supervisor of ``lbproxy --workers N``: one process that owns config, health and admin.

Owns the worker processes (``python -m lbproxy.run.worker``, each in its own session so a
terminal's Ctrl-C reaches only the supervisor) and their control channels. It:
- validates the config once and hands the same bytes to every worker; a reload that fails
  validation (or whose new binds cannot be bound) reaches no worker;
- runs DNS discovery once, for all workers, and hands every new set of servers found to
  each of them (they rebuild their snapshot from it as from a config);
- runs the health checks once, for all workers, and sends every change to each of them at
  once; a worker's passive failure comes back here and is broadcast like a check result;
- serves the admin listener, summing the workers' stats for /metrics and /status;
- restarts a worker that dies (with a backoff if it keeps dying), while the others serve;
- forwards SIGTERM/SIGINT as a graceful stop (a second signal stops the workers at once).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from ..config.model import CONTROL_LINE_LIMIT, WORKER_START_TIMEOUT, WORKER_STATS_TIMEOUT
from ..core.dns import encode
from ..core.metrics import Registry, load_registry, merge_registries
from .child import Child, spawn

if TYPE_CHECKING:
    from ..control.app import Proxy

log = logging.getLogger("lbproxy.run.supervisor")

RESTART_DELAY = 0.5  # seconds before restarting a worker that died; doubles while it keeps dying
RESTART_DELAY_MAX = 10.0
STABLE_AFTER = 10.0  # a worker that lived this long resets the restart delay


class WorkerHandle:
    """One worker process and its channel."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Child | None = None
        self.ready = asyncio.Event()
        self.pid: int | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.reader_task: asyncio.Task[None] | None = None
        self.waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.last_stats: Registry | None = None  # its numbers at the last scrape

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def send(self, msg: dict[str, Any]) -> None:
        proc = self.proc
        if proc is None or proc.stdin.is_closing():
            return
        proc.stdin.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")


class Supervisor:
    def __init__(self, proxy: Proxy, raw: bytes, workers: int) -> None:
        """``proxy``: the application in the checker's role (``Role(serve=False, check=True)``):
        it holds the config, runs the health checks and DNS discovery for every worker; the
        command line makes it, so this module does not import the application."""
        self.count = workers
        self.proxy = proxy
        self.proxy.config_raw = raw
        self.proxy.on_applied = self._config_applied
        self.proxy.servers.on_health_change = self._broadcast_health
        self.proxy.servers.on_override = self._broadcast_override
        self.proxy.on_discovered = self._discovered
        self.workers = [WorkerHandle(i) for i in range(workers)]
        self._ids = itertools.count()
        self._monitors: list[asyncio.Task[None]] = []
        self._stopping = False
        self.retired = Registry()  # counters of workers that died, kept in the sums

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Warm and start checks, then every worker (with the first round's results, so a
        worker accepts nothing before they are known); raise RuntimeError if a worker cannot
        start."""
        await self.proxy.start()
        for w in self.workers:
            await self._spawn(w)
        try:
            async with asyncio.timeout(WORKER_START_TIMEOUT):
                for w in self.workers:
                    waiter = asyncio.ensure_future(w.ready.wait())
                    assert w.proc is not None
                    died = asyncio.ensure_future(w.proc.wait())
                    await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    died.cancel()
                    if not w.ready.is_set():
                        raise RuntimeError(f"worker {w.index} exited before serving")
        except TimeoutError:
            raise RuntimeError("workers did not start serving in time") from None
        for w in self.workers:
            self._monitors.append(asyncio.get_running_loop().create_task(self._monitor(w)))
        log.info("%d workers serving (pids %s)", self.count, [w.pid for w in self.workers])

    async def _spawn(self, w: WorkerHandle) -> None:
        w.ready.clear()
        # Started with the signals blocked until the worker has taken them (child.py: why).
        w.proc = await spawn(
            [sys.executable, "-m", "lbproxy.run.worker"],
            {**os.environ, "LBPROXY_LOG_LEVEL": logging.getLevelName(log.getEffectiveLevel())},
            limit=CONTROL_LINE_LIMIT,
        )
        w.pid = w.proc.pid
        w.started_at = time.monotonic()
        w.reader_task = asyncio.get_running_loop().create_task(self._read(w))
        w.send(self._config_msg(with_health=True))

    def _config_msg(self, with_health: bool = False) -> dict[str, Any]:
        raw = self.proxy.config_raw or b""
        msg: dict[str, Any] = {
            "op": "config",
            "raw": base64.b64encode(raw).decode(),
            "path": self.proxy.config_path,
            "discovered": encode(self.proxy.discovered),
            "workers": self.count,  # they share a rebalance's rate
        }
        if with_health:
            msg["health"] = self.proxy.servers.health_map()
            msg["overrides"] = self.proxy.servers.overrides()  # a (re)started worker needs them too
        return msg

    async def _read(self, w: WorkerHandle) -> None:
        proc = w.proc
        assert proc is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("worker %d sent a line that is not JSON; ignored", w.index)
                continue
            op = msg.get("op")
            if op == "ready":
                w.ready.set()
                # Health may have changed between the spawn and now.
                w.send({"op": "health", "states": self.proxy.servers.health_map()})
            elif op in ("stats", "shed"):
                fut = w.waiters.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
            elif op == "passive":
                self._passive(msg["server"], msg.get("reason", ""))
            elif op == "event" and msg.get("kind") == "rebalance":
                self.proxy.events.record(
                    "rebalance",
                    f"worker {w.index}: {msg.get('text', '')}",
                    msg.get("group"),
                    msg.get("server"),
                )
            elif op == "applied" and not msg.get("ok"):
                log.error("worker %d could not apply the config: %s", w.index, msg.get("message"))

    def stopping(self) -> bool:
        return self._stopping

    async def _monitor(self, w: WorkerHandle) -> None:
        """Restart ``w`` whenever it dies, unless the supervisor is stopping."""
        delay = RESTART_DELAY
        while True:
            assert w.proc is not None
            code = await w.proc.wait()
            if self._stopping:
                return
            lived = time.monotonic() - w.started_at
            if lived >= STABLE_AFTER:
                delay = RESTART_DELAY  # it had been running fine: not a crash loop
            log.warning(
                "worker %d (pid %s) exited with %s after %.1fs; restarting in %.1fs",
                w.index,
                w.pid,
                code,
                lived,
                delay,
            )
            self.proxy.events.record(
                "worker", f"worker {w.index} (pid {w.pid}) exited with {code}; restarting"
            )
            for fut in w.waiters.values():
                fut.cancel()
            w.waiters.clear()
            self._retire_stats(w)
            await asyncio.sleep(delay)
            if self.stopping():  # a method: mypy must not carry the check above across the await
                return
            w.restarts += 1
            await self._spawn(w)
            delay = min(delay * 2, RESTART_DELAY_MAX)  # if this one dies soon too, wait longer

    # ------------------------------------------------------------------ health and config
    def _passive(self, sid: str, reason: str) -> None:
        server = self.proxy.state.servers.get(sid)
        if server is not None:
            self.proxy.ctx.report_health.passive_failure(server, reason)

    def _broadcast_health(self) -> None:
        msg = {"op": "health", "states": self.proxy.servers.health_map()}
        for w in self.workers:
            if w.ready.is_set():
                w.send(msg)

    def _broadcast_override(self, sid: str, admin_state: str | None, weight: int | None) -> None:
        msg = {"op": "override", "server": sid, "admin_state": admin_state, "weight": weight}
        for w in self.workers:
            w.send(msg)  # a worker still starting reads it after its config, in order

    def _discovered(self) -> None:
        msg = {"op": "discovered", "groups": encode(self.proxy.discovered)}
        for w in self.workers:
            w.send(msg)
        self._broadcast_health()

    def _config_applied(self, raw: bytes) -> None:
        # The workers build the same snapshot from the same bytes; their health comes from
        # here, in the same message: servers warmed here are up there from the swap on.
        msg = self._config_msg(with_health=True)
        for w in self.workers:
            w.send(msg)

    # ------------------------------------------------------------------ admin view
    def _retire_stats(self, w: WorkerHandle) -> None:
        """A dead worker's counters stay in the sums (its replacement starts from zero, and a
        Prometheus counter must not go down); its gauges end with it. What it counted after
        the last scrape is lost: its process is gone."""
        last = w.last_stats
        w.last_stats = None
        if last is None:
            return
        for ls in last.listeners.values():
            ls.connections_active = 0
        for ss in last.servers.values():
            ss.ws_active = {}
        self.retired = merge_registries([self.retired, last])

    async def gather(self) -> tuple[list[Registry], dict[str, int]]:
        futures: list[tuple[WorkerHandle, asyncio.Future[dict[str, Any]]]] = []
        for w in self.workers:
            if not (w.alive and w.ready.is_set()):
                continue
            n = next(self._ids)
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            w.waiters[n] = fut
            w.send({"op": "stats", "id": n})
            futures.append((w, fut))
        regs: list[Registry] = [self.retired]
        active: dict[str, int] = {}
        if not futures:
            return regs, active
        done, pending = await asyncio.wait([f for _, f in futures], timeout=WORKER_STATS_TIMEOUT)
        for fut in pending:
            fut.cancel()
        for w, fut in futures:
            if fut not in done or fut.cancelled():
                continue
            msg = fut.result()
            reg = load_registry(msg["data"])
            w.last_stats = reg
            regs.append(reg)
            for sid, n in msg.get("active", {}).items():
                active[sid] = active.get(sid, 0) + n
        return regs, active

    async def shed(self, sid: str, fraction: float | None, count: int | None, over: float) -> int:
        """Each serving worker sheds its share of ``sid``'s WebSockets (the same fraction of
        its own, or its part of ``count``); the number they scheduled in all."""
        serving = [w for w in self.workers if w.alive and w.ready.is_set()]
        futures = []
        for i, w in enumerate(serving):
            part = None
            if count is not None:
                part = count // len(serving) + (1 if i < count % len(serving) else 0)
                if part == 0:
                    continue
            n = next(self._ids)
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            w.waiters[n] = fut
            msg = {"op": "shed", "id": n, "server": sid, "fraction": fraction, "count": part}
            w.send({**msg, "over": over})
            futures.append(fut)
        if not futures:
            return 0
        done, pending = await asyncio.wait(futures, timeout=WORKER_STATS_TIMEOUT)
        for fut in pending:
            fut.cancel()
        return sum(int(f.result().get("scheduled", 0)) for f in done if not f.cancelled())

    def describe(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "index": w.index,
                "pid": w.pid,
                "alive": w.alive,
                "serving": w.alive and w.ready.is_set(),
                "restarts": w.restarts,
                "uptime": now - w.started_at if w.alive else None,
            }
            for w in self.workers
        ]

    # ------------------------------------------------------------------ shutdown
    async def close(self, immediate: bool = False) -> None:
        """Stop every worker (gracefully: each drains as a single process would), then self."""
        self._stopping = True
        for w in self.workers:
            if w.alive:
                assert w.proc is not None
                w.proc.send_signal(signal.SIGTERM)
                if immediate:
                    w.proc.send_signal(signal.SIGTERM)  # a second signal: exit at once
        for w in self.workers:
            if w.proc is not None:
                await w.proc.wait()
            if w.reader_task is not None:
                w.reader_task.cancel()
        for t in self._monitors:
            t.cancel()
        await asyncio.gather(*self._monitors, return_exceptions=True)
        await self.proxy.close(timeout=0)

    def stop_now(self) -> None:
        """Second signal: tell every worker to exit at once (they get their second SIGTERM)."""
        self._stopping = True
        for w in self.workers:
            if w.alive:
                assert w.proc is not None
                w.proc.send_signal(signal.SIGTERM)
