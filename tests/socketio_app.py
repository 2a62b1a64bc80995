"""A python-socketio chat server for the Socket.IO acceptance test (issue 7), run as a process.

``python -m tests.socketio_app --name A --redis redis://127.0.0.1:PORT/0`` starts a
``socketio.AsyncServer`` (aiohttp mode) whose client manager is an ``AsyncRedisManager``, so
that servers sharing one Redis deliver each other's broadcasts. It listens on 127.0.0.1, port 0
unless ``--port`` is given, and prints ``READY <port>`` on stdout once it accepts connections.
``--ping-interval`` and ``--ping-timeout`` set Engine.IO's (default 25 s and 20 s).
Everything else (aiohttp's access log with each status, Engine.IO's errors such as
"Invalid session") goes to stderr, which the test keeps and inspects.

Events
    ``whoami``  answered (as an ack) with the server's name.
    ``chat``    ``{"from": ..., "text": ...}`` broadcast to every client of every server as
                ``chat`` with ``"via"`` (the name of the server that received it) added.
Routes
    ``/health`` 200, for the proxy's health checks; ``/socket.io/`` the Socket.IO endpoint.
    Every response carries ``X-Backend: <name>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import socketio
from aiohttp import web


def make_app(
    name: str, redis_url: str, ping_interval: float, ping_timeout: float
) -> web.Application:
    sio = socketio.AsyncServer(
        async_mode="aiohttp",
        client_manager=socketio.AsyncRedisManager(redis_url),
        cors_allowed_origins="*",
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
    )
    app = web.Application()
    sio.attach(app)

    @sio.event
    async def whoami(sid: str, data: Any = None) -> str:
        return name

    @sio.event
    async def chat(sid: str, data: dict[str, Any]) -> None:
        await sio.emit("chat", {**data, "via": name})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def subscribe(app: web.Application) -> None:
        # The manager subscribes to Redis on the first client connection by default; do it at
        # startup so that a broadcast from the other server is never missed (the test waits
        # for both subscriptions with PUBSUB NUMSUB before it connects any client).
        sio.manager_initialized = True
        sio.manager.initialize()

    async def name_response(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Backend"] = name

    app.router.add_route("*", "/health", health)
    app.on_startup.append(subscribe)
    app.on_response_prepare.append(name_response)
    return app


async def serve(
    name: str, redis_url: str, port: int, ping_interval: float, ping_timeout: float
) -> None:
    runner = web.AppRunner(
        make_app(name, redis_url, ping_interval, ping_timeout),
        access_log_format=f"{name} %r %s",
        handle_signals=False,
    )
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server: Any = site._server
    bound = server.sockets[0].getsockname()[1]
    print(f"READY {bound}", flush=True)
    await asyncio.Event().wait()  # until SIGTERM ends the process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--redis", required=True, help="redis://host:port/db")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--ping-interval",
        type=float,
        default=25.0,
        help="seconds between Engine.IO pings; a long-poll request is answered within it",
    )
    parser.add_argument(
        "--ping-timeout",
        type=float,
        default=20.0,
        help="seconds Engine.IO waits for a pong (a poll of a closing session waits both)",
    )
    args = parser.parse_args()
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(name)s %(levelname)s %(message)s"
    )
    asyncio.run(serve(args.name, args.redis, args.port, args.ping_interval, args.ping_timeout))


if __name__ == "__main__":
    main()
