"""One worker process of ``lbproxy --workers N``: serves traffic, takes orders from the supervisor.

Owns the worker end of the control channel: newline-delimited JSON, orders on stdin and
reports on stdout (logs go to stderr, so stdout carries nothing else).

Orders:   {"op": "config", "raw": <base64 file bytes>, "path": ..., "health": {id: state},
           "overrides": {id: {"admin_state": ..., "weight": ...}},
           "discovered": <dnsstate.encode>, "workers": n}
          (health: the supervisor's, its new servers already warmed, taken before the swap)
          {"op": "discovered", "groups": <dnsstate.encode>}
          {"op": "health", "states": {id: state}}
          {"op": "override", "server": id, "admin_state": ..., "weight": ...}
          {"op": "stats", "id": n}
          {"op": "shed", "id": n, "server": id, "fraction": f, "count": n, "over": seconds}
Reports:  {"op": "ready", "pid": n}
          {"op": "passive", "server": id, "reason": text}
          {"op": "stats", "id": n, "data": <metrics.dump_registry>, "active": {id: n}}
          {"op": "applied", "ok": bool, "message": text}
          {"op": "shed", "id": n, "scheduled": n}
          {"op": "event", "kind": "rebalance", "text": ..., "group": ..., "server": ...}

The first order is always a config (already validated by the supervisor). Health comes only
from the supervisor, which runs the checks once for all workers; a failure seen while
proxying marks the server down here at once and is reported, so every worker learns it.
SIGTERM/SIGINT stop gracefully and a second one exits at once, as in a single process (one
that comes while the worker starts abandons the start and exits 0); the end of stdin (the
supervisor is gone) stops gracefully too. SIGHUP is ignored: reloads come through the
supervisor. The signals are taken (``signals.py``) by the worker's first statement, before
its imports, which take a good part of a second.
"""

from __future__ import annotations

if __name__ == "__main__":
    from lbproxy.run.signals import take

    take(hup=False)

import asyncio
import base64
import json
import logging
import os
import sys
from typing import Any

import uvloop

from ..config.model import CONTROL_LINE_LIMIT
from ..control.app import Proxy, Role
from ..control.loading import loads_config
from ..core.dns import decode
from ..core.history import Event
from ..core.metrics import dump_registry
from ..core.snapshot import ServerState
from ..proxy.listener import BindError, raise_fd_limit
from .signals import Signals, take

log = logging.getLogger("lbproxy.run.worker")


class Channel:
    """JSON lines over a pair of pipes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    async def receive(self) -> dict[str, Any] | None:
        line = await self.reader.readline()
        if not line:
            return None
        msg: dict[str, Any] = json.loads(line)
        return msg


async def _stdio_channel() -> Channel:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=CONTROL_LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return Channel(reader, writer)


def decode_raw(msg: dict[str, Any]) -> bytes:
    return base64.b64decode(msg["raw"])


async def serve(signals: Signals) -> int:
    signals.attach()
    ch = await _stdio_channel()
    first = await ch.receive()
    if first is None or first.get("op") != "config":
        log.error("worker: expected a config from the supervisor")
        return 1
    raw = decode_raw(first)
    config = loads_config(raw, first["path"])
    discovered = decode(first.get("discovered"))
    proxy = Proxy(config, None, Role(serve=True, check=False, reuse_port=True), discovered)
    proxy.config_raw = raw
    proxy.servers.mover.share = max(int(first.get("workers", 1)), 1)  # rebalance rate: a share

    def report(server: ServerState, reason: str) -> None:
        ch.send({"op": "passive", "server": server.id, "reason": reason})

    proxy.ctx.report_health.report = report  # type: ignore[attr-defined]

    def forward(event: Event) -> None:
        # Only what happens in the workers alone: each moves its own tunnels (rebalance
        # rounds, sheds). Health, reloads, drains and API calls the supervisor records itself.
        if event.kind == "rebalance":
            ch.send(
                {
                    "op": "event",
                    "kind": event.kind,
                    "text": event.text,
                    "group": event.group,
                    "server": event.server,
                }
            )

    proxy.events.forward = forward
    # Before binding: a connection accepted on the first listener while the next one binds
    # must not find every server still "unknown" (a 503).
    proxy.servers.set_health(first.get("health", {}))
    for sid, o in first.get("overrides", {}).items():
        if sid in proxy.state.servers:
            proxy.servers.set_server_state(sid, o.get("admin_state"), o.get("weight"))
    try:
        started = await signals.until_stopped(proxy.start())
    except BindError as exc:
        log.error("%s", exc)
        return 1
    if not started:
        await proxy.close()
        return 0
    ch.send({"op": "ready", "pid": os.getpid()})
    signals.ready(None)  # SIGHUP stays ignored: reloads come through the supervisor
    stop = signals.stop

    async def orders() -> None:
        while True:
            msg = await ch.receive()
            if msg is None:
                log.warning("worker %d: the supervisor is gone; stopping", os.getpid())
                stop.set()
                return
            op = msg.get("op")
            if op == "health":
                proxy.servers.set_health(msg["states"])
            elif op == "override":
                if msg["server"] in proxy.state.servers:
                    proxy.servers.set_server_state(msg["server"], msg["admin_state"], msg["weight"])
            elif op == "shed":
                server = proxy.state.servers.get(msg["server"])
                n = 0
                if server is not None:
                    n = proxy.servers.shed(server, msg["fraction"], msg["count"], msg["over"])
                ch.send({"op": "shed", "id": msg["id"], "scheduled": n})
            elif op == "stats":
                active = {sid: s.active for sid, s in proxy.state.servers.items()}
                data = dump_registry(proxy.registry)
                ch.send({"op": "stats", "id": msg["id"], "data": data, "active": active})
            elif op == "discovered":
                proxy.discovered = decode(msg["groups"])
                await proxy.apply_discovered("supervisor: dns")
            elif op == "config":
                raw = decode_raw(msg)
                proxy.discovered = decode(msg.get("discovered"))
                config = loads_config(raw, msg["path"])
                result = await proxy.apply_config(config, "supervisor", msg.get("health"))
                if result.ok:
                    proxy.config_raw = raw
                ch.send({"op": "applied", "ok": result.ok, "message": result.message})

    task = asyncio.get_running_loop().create_task(orders())
    await stop.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await proxy.close()
    return 0


def main() -> int:
    level = os.environ.get("LBPROXY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s[{os.getpid()}]: %(message)s",
        stream=sys.stderr,
    )
    signals = take(hup=False)  # taken already when run as ``python -m lbproxy.run.worker``
    raise_fd_limit()
    try:
        return uvloop.run(serve(signals))
    finally:
        signals.detach()


if __name__ == "__main__":
    sys.exit(main())
