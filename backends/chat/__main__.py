"""Command line of the chat backend: ``python -m backends.chat``.

This module owns process concerns: argument parsing, logging to stderr, the bus's
lifetime, and a clean shutdown on SIGINT/SIGTERM (exit status 0).

    python -m backends.chat --port 5001 --name ECS01 [--redis redis://127.0.0.1:6379/0]
                            [--host 127.0.0.1] [--channel lbproxy-chat] [--access-log]

``--port``/``--name`` may be repeated to run several backends in one process sharing one
bus (``--port 5001 --name ECS01 --port 5002 --name ECS02``): without ``--redis`` that is
a ``MemoryBus``, so their users still see each other. ``--port 0`` picks a free port;
each backend logs ``<name> listening on http://<host>:<port>`` once it accepts
connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from backends.chat.app import ChatServer
from backends.chat.bus import DEFAULT_CHANNEL, Bus, MemoryBus, RedisBus, redact_url

log = logging.getLogger("backends.chat")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m backends.chat",
        description="Sample chat backend for lbproxy (HTTP + WebSocket, optional Redis fan-out).",
    )
    parser.add_argument(
        "--port",
        type=int,
        action="append",
        required=True,
        help="port to listen on (0 = any free port); repeat to run several backends",
    )
    parser.add_argument(
        "--name",
        action="append",
        help="backend name shown to users, e.g. ECS01 (one per --port; default chat<port>)",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help="Redis URL for fan-out between backends, e.g. redis://127.0.0.1:6379/0 "
        "(default: in-process bus, users of this process only)",
    )
    parser.add_argument("--channel", default=DEFAULT_CHANNEL, help="Redis pub/sub channel")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--access-log", action="store_true", help="log every HTTP request")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (default INFO)",
    )
    args = parser.parse_args(argv)
    if args.name is None:
        args.name = [f"chat{port}" for port in args.port]
    if len(args.name) != len(args.port):
        parser.error("give one --name per --port")
    if len(set(args.name)) != len(args.name):
        parser.error("backend names must be unique")
    for port in args.port:
        if not 0 <= port <= 65535:
            parser.error(f"invalid port {port}")
    return args


async def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)

    bus: Bus
    if args.redis:
        bus = RedisBus(args.redis, channel=args.channel)
        log.info("fan-out via redis %s, channel %s", redact_url(args.redis), args.channel)
    else:
        bus = MemoryBus()
        log.info("no --redis: in-process bus, only users of this process see each other")
    servers = [
        ChatServer(name, bus, host=args.host, port=port, access_log=args.access_log)
        for name, port in zip(args.name, args.port, strict=True)
    ]
    status = 0
    await bus.start()
    try:
        for server in servers:
            await server.start()
            log.info("%s listening on %s", server.name, server.url)
        await stop.wait()
        log.info("shutting down")
    except OSError as exc:
        log.error("cannot listen: %s", exc)
        status = 1
    finally:
        for server in reversed(servers):
            await server.close()
        await bus.close()
        for sig in signals:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
