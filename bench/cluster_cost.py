"""What ``cluster`` costs (issue 22): proxy CPU per request with ``limits.scope: cluster``
against ``local``, and the Redis commands per second one instance sends, idle and under load.

One redis-server, one backend (aiohttp, ``GET /`` -> ``ok``) and one lbproxy process (1
worker, access log off, ``cluster:`` set) with two listeners in front of the backend, alike
but for ``limits.scope``: ``local`` and ``cluster``. The limit is far above the load (nothing
is refused: what is measured is the bookkeeping), and the client address comes from
X-Forwarded-For (``trusted_proxies: [127.0.0.0/8]``), set by wrk's script to one of
``--clients`` addresses per request, so the batches carry many clients as in production.

For each listener in turn (``--rounds`` times): wrk for ``--seconds`` while the proxy's CPU
(utime + stime from /proc) and Redis's ``total_commands_processed`` are read. Also the
commands per second while idle (the exchange alone: the instance record, the instances set,
the overrides).

    .venv/bin/python -m bench.cluster_cost          # prints a markdown table

Needs wrk and redis-server (Debian's packages).
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procfs
from bench.run import free_ports, wait_port

ROOT = Path(__file__).resolve().parents[1]

BACKEND = """
import sys
from aiohttp import web
async def ok(request):
    return web.Response(text="ok")
app = web.Application()
app.router.add_get("/", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""

WRK_SCRIPT = """
local n = {clients}
request = function()
  local i = math.random(0, n - 1)
  local ip = "10." .. math.floor(i / 65536) % 256 .. "." .. math.floor(i / 256) % 256
    .. "." .. i % 256
  return wrk.format(nil, nil, {{["X-Forwarded-For"] = ip}})
end
"""


def config(local: int, cluster: int, backend: int, redis: int) -> str:
    limits = "{requests_per_second: 1000000, burst: 1000000, scope: %s}"
    lst = """  - name: {name}
    bind: 127.0.0.1:{port}
    server_group: app
    trusted_proxies: [127.0.0.0/8]
    limits: {limits}
"""
    return (
        "listeners:\n"
        + lst.format(name="local", port=local, limits=limits % "local")
        + lst.format(name="cluster", port=cluster, limits=limits % "cluster")
        + f"""server_groups:
  app:
    servers: [127.0.0.1:{backend}]
    keepalive_connections: 64
    health_check: {{enabled: false}}
admin: {{bind: "127.0.0.1:0"}}
access_log: {{enabled: false}}
cluster: {{redis: "redis://127.0.0.1:{redis}/0", name: bench}}
"""
    )


def redis_info(port: int, section: str) -> str:
    with socket.create_connection(("127.0.0.1", port), 2) as s:
        s.sendall(f"INFO {section}\r\n".encode())
        data = s.recv(65536)
        size = int(data[1 : data.index(b"\r\n")])
        while len(data) < size + len(str(size)) + 5:
            data += s.recv(65536)
    return data.decode()


def redis_commands(port: int) -> int:
    """Commands Redis processed: those the clients sent and those their scripts ran."""
    m = re.search(r"total_commands_processed:(\d+)", redis_info(port, "stats"))
    assert m is not None
    return int(m.group(1))


def wrk(url: str, seconds: float, script: Path) -> int:
    d = max(1, round(seconds))
    cmd = ["wrk", "-t1", "-c20", f"-d{d}s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=d + 30).stdout
    m = re.search(r"(\d+) requests in", out)
    if m is None or "Non-2xx" in out:
        raise RuntimeError(f"wrk: {out}")
    return int(m.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=10000)
    args = p.parse_args(argv)
    local, cluster, backend, redis = free_ports(4)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="lbproxy-cluster-") as tmp:
        cfg = Path(tmp) / "lb.yaml"
        cfg.write_text(config(local, cluster, backend, redis))
        script = Path(tmp) / "xff.lua"
        script.write_text(WRK_SCRIPT.format(clients=args.clients))
        try:
            r = subprocess.Popen(
                ["redis-server", "--port", str(redis), "--save", "", "--appendonly", "no"],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
            )
            procs.append(r)
            wait_port(redis, r, "redis-server")
            b = subprocess.Popen([sys.executable, "-c", BACKEND, str(backend)], cwd=ROOT)
            procs.append(b)
            wait_port(backend, b, "backend")
            proxy = subprocess.Popen(
                [sys.executable, "-m", "lbproxy", "--config", str(cfg), "--log-level", "warning"],
                cwd=ROOT,
            )
            procs.append(proxy)
            wait_port(cluster, proxy, "lbproxy")
            time.sleep(1.0)
            c0, t0 = redis_commands(redis), time.monotonic()
            time.sleep(args.seconds)
            idle = (redis_commands(redis) - c0) / (time.monotonic() - t0)
            cpu: dict[str, list[float]] = {"local": [], "cluster": []}
            cmds: dict[str, list[float]] = {"local": [], "cluster": []}
            rps: dict[str, list[float]] = {"local": [], "cluster": []}
            for _ in range(args.rounds):
                for name, port in (("local", local), ("cluster", cluster)):
                    url = f"http://127.0.0.1:{port}/"
                    wrk(url, 1.0, script)  # warm-up
                    pids = procfs.tree(proxy.pid)
                    u0, r0, t0 = procfs.cpu_seconds(pids), redis_commands(redis), time.monotonic()
                    n = wrk(url, args.seconds, script)
                    u1, r1, t1 = procfs.cpu_seconds(pids), redis_commands(redis), time.monotonic()
                    cpu[name].append((u1 - u0) / n * 1e6)
                    cmds[name].append((r1 - r0) / (t1 - t0))
                    rps[name].append(n / (t1 - t0))
            med = statistics.median
            print(f"{args.rounds} rounds of {args.seconds:g} s per scope, {args.clients:,} clients")
            print()
            print(
                "| scope | requests/s | proxy CPU per request (µs) | Redis commands/s "
                "(scripts' own included) |"
            )
            print("|---|---:|---:|---:|")
            print(f"| (idle) | 0 | - | {idle:.1f} |")
            for name in ("local", "cluster"):
                print(
                    f"| {name} | {med(rps[name]):,.0f} | {med(cpu[name]):.1f} | "
                    f"{med(cmds[name]):.1f} |"
                )
            extra = med(cpu["cluster"]) - med(cpu["local"])
            print(f"\ncluster - local: {extra:+.1f} µs per request")
            print("\nRedis commandstats over the whole run:\n")
            for line in redis_info(redis, "commandstats").splitlines():
                if line.startswith("cmdstat_"):
                    print(f"    {line}")
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
