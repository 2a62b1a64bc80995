"""The reload budget of issue 4: how long a reload of 100 server groups of 10 servers takes,
against its 100 ms budget. Two figures, each for a reload that changes only timeouts and for
one that replaces every server:

- build + commit: ``RuntimeState.build`` and ``commit`` alone (no sockets, no event loop);
- apply_config: ``Proxy.apply_config`` on a started proxy with 10 bound listeners (what a
  SIGHUP or ``POST /reload`` does after reading the file).

A figure, not a test: the tests (tests/unit/test_snapshot.py, tests/integration/test_reload.py)
check that such reloads work and report the right changes; on a loaded machine a wall-clock
budget there would fail for reasons that are not lbproxy's.

Not a test. Run from the repository root: .venv/bin/python -m bench.reload_budget [--rounds N]
(it reuses the tests' config builders, so it needs the test dependencies of .venv).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from lbproxy.config import Config, parse_config
from lbproxy.core import metrics
from lbproxy.core.snapshot import RuntimeState
from tests.integration.test_reload import big_doc
from tests.support import start_proxy
from tests.unit.test_snapshot import big_config

BUDGET_MS = 100.0


def build_commit(change: str, rounds: int) -> list[float]:
    """Seconds of each build + commit, alternating between two configs."""
    state = RuntimeState(metrics.Registry())
    snap, _ = state.build(big_config())
    state.commit(snap)
    if change == "timeouts only":
        configs = [big_config(idle="30s"), big_config()]
    else:
        configs = [big_config(port_offset=1), big_config(port_offset=2)]
    times = []
    for i in range(rounds):
        t0 = time.perf_counter()
        new, _ = state.build(configs[i % 2])
        state.commit(new)
        times.append(time.perf_counter() - t0)
    return times


async def apply_config(change: str, rounds: int) -> list[float]:
    """Seconds of each ``Proxy.apply_config``, alternating between two configs."""
    proxy = await start_proxy(big_doc(9000, "60s"))
    try:
        configs: list[Config]
        if change == "timeouts only":
            configs = [parse_config(big_doc(9000, idle)) for idle in ("30s", "60s")]
        else:
            configs = [parse_config(big_doc(port, "60s")) for port in (9001, 9002)]
        times = []
        for i in range(rounds):
            t0 = time.perf_counter()
            result = await proxy.apply_config(configs[i % 2], "bench")
            times.append(time.perf_counter() - t0)
            assert result.ok, result.message
        return times
    finally:
        await proxy.close(timeout=0.5)


def report(what: str, times: list[float]) -> None:
    best, median = min(times) * 1000, sorted(times)[len(times) // 2] * 1000
    verdict = "within" if best < BUDGET_MS else "OVER"
    print(f"{what:40s} best {best:6.1f} ms  median {median:6.1f} ms  ({verdict} the budget)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="reloads of each kind (default 5)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    print(f"100 groups x 10 servers, budget {BUDGET_MS:.0f} ms, {args.rounds} rounds")
    for change in ("timeouts only", "every server replaced"):
        report(f"build + commit, {change}", build_commit(change, args.rounds))
    for change in ("timeouts only", "every server replaced"):
        report(f"apply_config, {change}", asyncio.run(apply_config(change, args.rounds)))


if __name__ == "__main__":
    main()
