"""The history's timer: every few seconds, read the counters and keep the point.

Owns ``Sampler`` (start/close), the one timer behind ``GET /status/history`` and the status
page's charts. Each tick reads what /status reads (this process's registry, or under
``--workers`` the sum of the workers' that the supervisor gathers, dead workers' counters
included), turns it into ``core.history.Reading``s per server, group and listener, and hands
them to ``core.history.History``. Nothing here touches the data path: the counters are the
ones /metrics already renders.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ..core.history import WS_SERIES, EventLog, History, Reading
from ..core.metrics import TIME_BUCKETS, Histogram, Registry, ServerStats

if TYPE_CHECKING:
    from .app import Proxy

log = logging.getLogger("lbproxy")

# (interval seconds, points): every 5 s for 15 minutes, every minute for 6 hours.
RESOLUTIONS = ((5.0, 180), (60.0, 360))
# Counters a registry reads as: the registry, and open connections per server id (None:
# this process's own ServerState.active).
Source = Callable[[], Awaitable[tuple[Registry, dict[str, int] | None]]]


def _server_ws(ss: ServerStats, live: list[int] | None) -> dict[str, float]:
    """A server's WebSocket counters: its ended tunnels' (folded in as each ended) plus
    ``live``, the messages of its tunnels still open in this process, so the rate is right
    while tunnels are long-lived (under ``--workers`` a worker's dump has added its own)."""
    m_in, m_out = live or (0, 0)
    out = {
        "ws_messages_in": float(ss.ws_messages_in + m_in),
        "ws_messages_out": float(ss.ws_messages_out + m_out),
    }
    for cls, n in ss.ws_close_classes.items():
        out[f"closes_{cls}"] = float(n)
    return out


def _closes(codes: dict[tuple[str, str], int]) -> dict[str, float]:
    """Close frames by code class. A tunnel's close is counted once, by the side that closed
    first would need per-tunnel state; the frames both ways are what the counters hold, so a
    clean close counts on both sides (rates compare with each other, not with tunnels)."""
    out = {"closes_1000": 0.0, "closes_1001": 0.0, "closes_1006": 0.0, "closes_other": 0.0}
    for (_side, code), n in codes.items():
        key = f"closes_{code}" if code in ("1000", "1001", "1006") else None
        if code == "none":
            key = "closes_1006"  # a close frame without a code: counted with the abnormal
        out[key or "closes_other"] += n
    return out


def readings(proxy: Proxy, reg: Registry, active: dict[str, int] | None) -> dict[str, Reading]:
    """Every entity's counters now, keyed ``kind:name``."""
    out: dict[str, Reading] = {}
    snap = proxy.holder.current
    # The open tunnels' messages by server id: a scan of this process's open connections
    # (none in a registry summed from workers' dumps, which carry their own).
    live = reg.live_messages()
    # (group, server label) -> (requests, 5xx), over every listener
    per_server: dict[tuple[str, str], list[int]] = {}
    for stats in reg.listeners.values():
        for (gn, sl, code), n in stats.requests.items():
            acc = per_server.setdefault((gn, sl), [0, 0])
            acc[0] += n
            if code.startswith("5"):
                acc[1] += n
    for g in snap.groups.values():
        gr = Reading("group", {"name": g.name}, buckets=TIME_BUCKETS)
        ghist = Histogram(TIME_BUCKETS)
        for key in ("requests", "errors_5xx", "connect_failures", *WS_SERIES):
            gr.counters[key] = 0.0
        up_count = 0
        conns = tunnels = 0
        for s in g.servers:
            ss = reg.servers.get(s.id, s.stats)
            up = s.health.available if g.checks else True  # draining still serves its tunnels
            up_count += up
            req, err = per_server.get((g.name, s.label), (0, 0))
            n_conn = active.get(s.id, 0) if active is not None else s.active
            n_tun = sum(ss.ws_active.values())
            sr = Reading(
                "server",
                {"id": s.id, "group": g.name, "address": s.label},
                counters={
                    "requests": float(req),
                    "errors_5xx": float(err),
                    "connect_failures": float(ss.errors.get("connect", 0)),
                    **_server_ws(ss, live.get(s.id)),
                },
                gauges={"up": 1.0 if up else 0.0, "connections": n_conn, "tunnels": n_tun},
                buckets=ss.upstream_response.buckets,
                counts=list(ss.upstream_response.counts),
                up=up,
            )
            out[f"server:{s.id}"] = sr
            ghist.add(ss.upstream_response)
            for key in gr.counters:
                gr.counters[key] += sr.counters[key]
            conns += n_conn
            tunnels += n_tun
        gr.counts = ghist.counts
        gr.gauges = {"servers_up": up_count, "connections": conns, "tunnels": tunnels}
        out[f"group:{g.name}"] = gr
    for lst in snap.config.listeners:
        ls = reg.listeners.get(lst.name)
        if ls is None:
            continue
        lhist = Histogram(TIME_BUCKETS)
        for h in ls.request_duration.values():
            lhist.add(h)
        out[f"listener:{lst.name}"] = Reading(
            "listener",
            {"name": lst.name, "group": lst.server_group},
            counters={
                "requests": float(sum(ls.requests.values())),
                "errors_5xx": float(
                    sum(n for (_, _, c), n in ls.requests.items() if c.startswith("5"))
                ),
                "ws_messages_in": float(ls.ws_messages_in),
                "ws_messages_out": float(ls.ws_messages_out),
                **_closes(ls.ws_close_codes),
            },
            gauges={
                "connections": ls.connections_active,
                "tunnels": sum(ss.ws_active.get(lst.name, 0) for ss in reg.servers.values()),
            },
            buckets=TIME_BUCKETS,
            counts=lhist.counts,
        )
    return out


class Sampler:
    """Reads ``source`` every fine interval into ``history``; ``clock`` is the wall clock."""

    def __init__(
        self,
        proxy: Proxy,
        source: Source,
        events: EventLog,
        resolutions: tuple[tuple[float, int], ...] = RESOLUTIONS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.proxy = proxy
        self.source = source
        self.events = events
        self.history = History(resolutions)
        self.interval = min(i for i, _ in resolutions)
        self.clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def sample(self) -> None:
        reg, active = await self.source()
        self.history.add(self.clock(), readings(self.proxy, reg, active))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            try:
                await self.sample()
            except Exception:  # a bad tick must not end the history; say so and go on
                log.exception("history: sampling failed")
            # On a fixed grid from the start, so a slow tick does not shift the next ones.
            due += self.interval
            now = loop.time()
            if due < now:
                due = now
            await asyncio.sleep(due - now)

    def view(self, finest_only: bool = False) -> dict[str, object]:
        return {"time": self.clock(), **self.history.view(self.events, finest_only)}

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
