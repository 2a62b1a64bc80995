"""Command line: ``lbproxy --config lb.yaml [--check]``. The only place that exits the process.

Owns argument parsing, logging setup, the file-descriptor limit, the event loop (uvloop),
what the signals do (``signals.py`` takes them: SIGHUP reloads, SIGTERM/SIGINT start the
graceful shutdown and a second one exits at once; before the proxy is ready a SIGHUP waits
for it and a SIGTERM/SIGINT abandons the start, exit 0) and the systemd readiness
notifications (``Type=notify``: READY=1 once serving, STOPPING=1 when the shutdown starts;
nothing without ``$NOTIFY_SOCKET``).

``main`` takes the signals first; before that this module imports only what parsing the
arguments needs (the rest, a good part of a second with the compiled modules, comes after).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .. import __version__, buildinfo
from .signals import Signals, take

if TYPE_CHECKING:
    from ..config.top import Config
    from ..control.admin import Workers
    from ..control.app import Proxy

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
    signals = take()  # before anything else: from here no signal has its default action
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.schema:
        from ..config.doc import schema_text

        sys.stdout.write(schema_text())
        return EXIT_OK
    if args.config is None:
        parser.error("the following arguments are required: --config/-c")
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from ..config.model import ConfigError
    from ..control.loading import loads_config, read_config_file

    try:
        # The bytes and the config from one read: with workers the bytes are what they get.
        raw = read_config_file(args.config)
        config = loads_config(raw, args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"lbproxy: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"lbproxy: {args.config}: configuration is valid", file=sys.stderr)
        return EXIT_OK
    import uvloop

    from ..proxy.listener import raise_fd_limit

    log.info("lbproxy %s starting (pid %d)", __version__, os.getpid())
    raise_fd_limit()
    path = os.path.abspath(args.config)
    try:
        if args.workers > 1:
            return uvloop.run(_supervise(config, raw, path, args.workers, signals))
        return uvloop.run(_serve(config, path, signals))
    finally:
        signals.detach()


async def _serve(config: Config, path: str, signals: Signals) -> int:
    signals.attach()
    from ..control.app import Proxy
    from ..control.loading import ConfigFile
    from ..proxy.listener import BindError

    proxy = Proxy(config, ConfigFile(path))
    try:
        started = await signals.until_stopped(proxy.start())
    except BindError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    except OSError as exc:  # the one file start() opens: the access log
        path = config.access_log.path
        log.error("access_log.path: cannot open %s: %s", path, exc.strerror or exc)
        return EXIT_FAILURE
    if not started:
        return await _stopped(proxy.close)
    for name in proxy.listeners.bound:
        log.info("listening: %s on %s", name, proxy.listeners.address(name))
    return await _run(proxy, None, signals, proxy.close)


async def _supervise(config: Config, raw: bytes, path: str, workers: int, signals: Signals) -> int:
    signals.attach()
    from ..control.app import Proxy, Role
    from ..control.loading import ConfigFile
    from ..proxy.listener import BindError
    from .supervisor import Supervisor

    for i, lst in enumerate(config.listeners):
        if lst.bind.port == 0:
            # Each worker would get a port of its own: nothing would be shared.
            log.error("listeners[%d].bind: port 0 cannot be shared by workers; name a port", i)
            return EXIT_CONFIG
    sup = Supervisor(Proxy(config, ConfigFile(path), Role(serve=False, check=True)), raw, workers)
    signals.stopping = f"stopping {workers} workers gracefully"
    signals.now = sup.stop_now
    try:
        started = await signals.until_stopped(sup.start())
    except (BindError, RuntimeError) as exc:
        log.error("%s", exc)
        await sup.close(immediate=True)
        return EXIT_FAILURE
    if not started:
        return await _stopped(sup.close)
    return await _run(sup.proxy, sup, signals, sup.close)


async def _stopped(close: Callable[[], Awaitable[None]]) -> int:
    """A stop signal came before the proxy was ready: close what its start had opened."""
    await close()
    log.info("stopped")
    return EXIT_OK


async def _run(
    proxy: Proxy,
    workers: Workers | None,
    signals: Signals,
    close: Callable[[], Awaitable[None]],
) -> int:
    """Admin, file watch and signals around a started proxy (or supervisor), until a stop
    signal; then the shutdown order: watcher, admin listener, ``close``, admin."""
    from ..control.admin import AdminServer
    from ..control.reload import FileWatcher

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
    log.info("admin on %s/", admin.url)
    warning = proxy.holder.current.config.admin.insecure_warning()
    if warning is not None:
        log.warning("%s", warning)  # at every start, and at every reload (Proxy.reload)
    sd_notify("READY=1")
    # Ready: a SIGHUP received while starting is performed now (the watcher took the file as
    # it is now, so a change made while starting is the held SIGHUP's to apply).
    signals.ready(lambda: proxy.reload("SIGHUP"))
    await signals.stop.wait()
    sd_notify("STOPPING=1")
    await watcher.close()
    await admin.close_listener()
    await close()
    await admin.close()
    log.info("stopped")
    return EXIT_OK
