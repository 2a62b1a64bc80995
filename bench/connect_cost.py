"""What opening a new backend connection costs the proxy (issue 27's upgrade path): the task
``Dispatch`` used to start per new connection (``upstream.connect`` in a task, with its
``asyncio.timeout`` scope) against ``upstream.Connecting`` (the same uvloop
``create_connection`` stepped through by hand, a timer for the timeout), on this process's
CPU per connect.

One process, one uvloop loop: a local server in Protocol callbacks that closes what it
accepts, and each way connects to it ``--connects`` times in a row, the ways taking turns
round by round (``--rounds``) so drift spreads over both. The figure includes the server's
accept and the close on both sides (the same for both ways): only the difference is the
connect's own.

    .venv/bin/python -m bench.connect_cost            # prints a markdown table
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import uvloop

from lbproxy import buildinfo
from lbproxy.config.model import Address
from lbproxy.proxy import upstream


class _Closing(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


async def _with_task(loop: asyncio.AbstractEventLoop, address: Address) -> None:
    done: asyncio.Future[upstream.UpstreamConnection] = loop.create_future()
    task = loop.create_task(upstream.connect((address,), 5.0))
    task.add_done_callback(lambda t: done.set_result(t.result()))
    (await done).close()


async def _connecting(loop: asyncio.AbstractEventLoop, address: Address) -> None:
    done: asyncio.Future[upstream.UpstreamConnection | None] = loop.create_future()
    upstream.Connecting(loop, (address,), 5.0, lambda conn, exc: done.set_result(conn))
    conn = await done
    assert conn is not None
    conn.close()


WAYS: dict[str, Callable[[asyncio.AbstractEventLoop, Address], Awaitable[None]]] = {
    "task (before)": _with_task,
    "Connecting (now)": _connecting,
}


async def _run(connects: int, rounds: int) -> dict[str, list[float]]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Closing, "127.0.0.1", 0)
    address = Address("127.0.0.1", server.sockets[0].getsockname()[1])
    out: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(rounds):
        for name, way in WAYS.items():
            for _ in range(connects // 10):  # warm-up
                await way(loop, address)
            t0 = time.process_time()
            for _ in range(connects):
                await way(loop, address)
            out[name].append((time.process_time() - t0) / connects * 1e6)
    server.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connects", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    res = uvloop.run(_run(args.connects, args.rounds))
    print(f"lbproxy build: {buildinfo.kind()}; {args.connects} connects a round\n")
    print("| way | CPU per connect, median (µs) | per round (µs) |")
    print("|---|---:|---|")
    for name, values in res.items():
        rounds = ", ".join(f"{v:.1f}" for v in values)
        print(f"| {name} | {statistics.median(values):.1f} | {rounds} |")


if __name__ == "__main__":
    main()
