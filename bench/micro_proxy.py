"""Micro-benchmark of the HTTP path without sockets: CPU per request of lbproxy's own code.

A ClientConnection and a pooled backend connection sit on in-memory transports; each round
feeds one keep-alive request and its response through them (parse, route, pick, rewrite,
relay, account), so the figure is the proxy's own work with no syscalls. Compare two builds
or two checkouts by running it with each first on PYTHONPATH.

Measured on the 2-core project machine (shared, so minimum of 5 alternating runs), the split of
the HTTP path into ClientConnection + Exchange (issue 13) against the single class before it:
interpreted, wrk request 23.5 -> 24.2 us, browser request 31.0 -> 29.4 us (the lean head path
included); with http1, headers, http_proxy, exchange, sticky and upstream compiled by mypyc,
11.3 -> 11.5 us and 15.8 -> 14.8 us.

Not a test. Run: ``.venv/bin/python -m bench.micro_proxy [--loops N]`` (from the repository root).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import uvloop

from bench.micro_http1 import BACKEND_RESPONSE, BROWSER_REQUEST, WRK_REQUEST
from lbproxy.config import parse_config
from lbproxy.control.app import Proxy
from lbproxy.proxy.client import ClientConnection
from lbproxy.proxy.client_socket import ListenerHandle
from lbproxy.proxy.upstream import UpstreamConnection

RESPONSE = BACKEND_RESPONSE.replace(b"Content-Length: 27", b"Content-Length: 2") + b"ok"


class Transport:
    """Just enough of an asyncio transport: counts what is written, reads nothing."""

    def __init__(self) -> None:
        self.written = 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, items: Any) -> None:
        for data in items:
            self.written += len(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


async def measure(loops: int, repeat: int) -> None:
    config = parse_config(
        {
            "listeners": [{"name": "web", "bind": "127.0.0.1:0", "server_group": "g"}],
            "server_groups": {
                "g": {"servers": [{"address": "127.0.0.1:9"}], "health_check": {"enabled": False}}
            },
            "admin": {"bind": "127.0.0.1:0"},
            "access_log": {"enabled": False},
        }
    )
    proxy = Proxy(config)
    handle = ListenerHandle(proxy.holder.current.listeners["web"])
    (server,) = proxy.holder.current.groups["g"].servers
    up = UpstreamConnection()
    up.connection_made(Transport())  # type: ignore[arg-type]
    server.pool.put(up, asyncio.get_running_loop().time(), 10)
    conn = ClientConnection(proxy.ctx, handle)
    client = Transport()
    conn.connection_made(client)  # type: ignore[arg-type]

    def run(request: bytes, n: int) -> None:
        for _ in range(n):
            conn.data_received(request)
            up.data_received(RESPONSE)

    run(BROWSER_REQUEST, 1000)
    assert client.written > 0 and server.pool.idle, "no response relayed"
    for label, request in (
        (f"wrk request ({len(WRK_REQUEST)} B)", WRK_REQUEST),
        (f"browser request ({len(BROWSER_REQUEST)} B, 14 headers)", BROWSER_REQUEST),
    ):
        best = min(_timed(run, request, loops) for _ in range(repeat))
        print(f"{label:<44} {best * 1e6:8.2f} us CPU per request")


def _timed(run: Any, request: bytes, loops: int) -> float:
    # CPU time of this process: on a shared machine wall time counts waiting for a core.
    start = time.process_time()
    run(request, loops)
    return (time.process_time() - start) / loops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loops", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    uvloop.run(measure(args.loops, args.repeat))


if __name__ == "__main__":
    main()
