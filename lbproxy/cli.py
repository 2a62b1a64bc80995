"""Command line: ``lbproxy --config lb.yaml [--check]``. The only place that exits the process.

Owns argument parsing, logging setup, the file-descriptor limit, the event loop (uvloop),
the signals (SIGHUP reloads, SIGTERM/SIGINT start the graceful shutdown and a second one
exits at once) and the systemd readiness notifications (``Type=notify``: READY=1 once
serving, STOPPING=1 when the shutdown starts; nothing without ``$NOTIFY_SOCKET``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import uvloop

from . import __version__, buildinfo
from .config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from .admin import Workers
    from .app import Proxy

log = logging.getLogger("lbproxy")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lbproxy",
        description="A layer-7 load balancer for real-time web apps (HTTP and WebSocket).",
    )
    p.add_argument("--config", "-c", help="path of the YAML config file (required)")
    p.add_argument(
        "--schema",
        action="store_true",
        help="print the config file's JSON Schema (for editors) and exit",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the config and exit: 0 when valid, 2 after printing every problem",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level of the proxy's own log (default: info)",
    )
    p.add_argument(
        "--workers",
        default="1",
        type=_workers,
        help="worker processes sharing the listeners (SO_REUSEPORT), or 'auto' for one per "
        "core; with more than one, a supervisor runs health checks and admin (default: 1)",
    )
    p.add_argument(
        "--version", action="version", version=f"lbproxy {__version__} ({buildinfo.kind()})"
    )
    return p


def _workers(value: str) -> int:
    if value == "auto":
        return len(os.sched_getaffinity(0)) or 1
    if not value.isdigit() or not 1 <= int(value) <= 256:
        raise argparse.ArgumentTypeError(f"expected a number 1..256 or 'auto', got {value!r}")
    return int(value)


def sd_notify(state: str) -> None:
    """Send ``state`` to systemd's notify socket (sd_notify(3)), if there is one."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", state, exc.strerror or exc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.schema:
        from .config.doc import schema_text

        sys.stdout.write(schema_text())
        return EXIT_OK
    if args.config is None:
        parser.error("the following arguments are required: --config/-c")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"lbproxy: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"lbproxy: {args.config}: configuration is valid", file=sys.stderr)
        return EXIT_OK
    from .listener import raise_fd_limit

    raise_fd_limit()
    path = os.path.abspath(args.config)
    try:
        if args.workers > 1:
            return uvloop.run(_supervise(config, path, args.workers))
        return uvloop.run(_serve(config, path))
    except KeyboardInterrupt:
        return EXIT_OK


def _exit_now() -> None:
    os._exit(EXIT_OK)


class Signals:
    """SIGHUP reloads; the first SIGTERM/SIGINT sets ``stop``; a second one calls ``now``."""

    def __init__(self, proxy: Proxy, stopping: str, now: Callable[[], None]) -> None:
        self.proxy = proxy
        self.stopping = stopping
        self.now = now
        self.stop = asyncio.Event()
        self._seen = 0
        self._reloads: set[asyncio.Task[object]] = set()  # a reference keeps each task alive

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signame: str) -> None:
        self._seen += 1
        if self._seen == 1:
            log.info("%s: %s (send it again to stop at once)", signame, self.stopping)
            self.stop.set()
        else:
            log.warning("%s again: stopping now", signame)
            self.now()

    def _on_hup(self) -> None:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(
            self.proxy.reload("SIGHUP")
        )
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)


async def _serve(config: Config, path: str) -> int:
    from .app import Proxy
    from .listener import BindError

    proxy = Proxy(config, path)
    try:
        await proxy.start()
    except BindError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    except OSError as exc:  # the one file start() opens: the access log
        path = config.access_log.path
        log.error("access_log.path: cannot open %s: %s", path, exc.strerror or exc)
        return EXIT_FAILURE
    for name in proxy.listeners.bound:
        log.info("listening: %s on %s", name, proxy.listeners.address(name))
    return await _run(proxy, None, "shutting down gracefully", _exit_now, proxy.close)


async def _supervise(config: Config, path: str, workers: int) -> int:
    from .config import ConfigError, read_config_file
    from .listener import BindError
    from .supervisor import Supervisor

    try:
        raw = read_config_file(path)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    for i, lst in enumerate(config.listeners):
        if lst.bind.port == 0:
            # Each worker would get a port of its own: nothing would be shared.
            log.error("listeners[%d].bind: port 0 cannot be shared by workers; name a port", i)
            return EXIT_CONFIG
    sup = Supervisor(config, path, raw, workers)
    try:
        await sup.start()
    except (BindError, RuntimeError) as exc:
        log.error("%s", exc)
        await sup.close(immediate=True)
        return EXIT_FAILURE
    stopping = f"stopping {workers} workers gracefully"
    return await _run(sup.proxy, sup, stopping, sup.stop_now, sup.close)


async def _run(
    proxy: Proxy,
    workers: Workers | None,
    stopping: str,
    now: Callable[[], None],
    close: Callable[[], Awaitable[None]],
) -> int:
    """Admin, file watch and signals around a started proxy (or supervisor), until a stop
    signal; then the shutdown order: watcher, admin listener, ``close``, admin."""
    from .admin import AdminServer
    from .reload import FileWatcher

    admin = AdminServer(proxy, workers)
    try:
        await admin.start()
    except OSError as exc:
        bind = proxy.holder.current.config.admin.bind
        log.error("admin.bind: cannot listen on %s: %s", bind, exc.strerror or exc)
        await close()
        return EXIT_FAILURE
    proxy.admin = admin  # a reload may move it
    watcher = FileWatcher(proxy)
    watcher.start()
    signals = Signals(proxy, stopping, now)
    signals.start()
    log.info("admin on http://%s/", admin.address)
    sd_notify("READY=1")
    await signals.stop.wait()
    sd_notify("STOPPING=1")
    await watcher.close()
    await admin.close_listener()
    await close()
    await admin.close()
    log.info("stopped")
    return EXIT_OK
