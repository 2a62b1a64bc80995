"""Benchmark lbproxy against nginx, HAProxy and a direct connection; print a markdown table.

Run from the repository root: ``.venv/bin/python -m bench.run [--quick] [--only ...]``
(``python bench/run.py`` works too). See bench/README.md for what is measured and how.

An HTTP/2 phase (h2load over TLS to lbproxy's and nginx's https listeners, self-signed
certificate made with openssl) runs when h2load (Debian's nghttp2-client) is installed, and is
skipped with a note otherwise.

One run, one target after another, on the same backends: the direct connection (the floor),
lbproxy (1 worker, access log off), nginx and HAProxy (generated configs in a temporary
directory, run in the foreground as the current user; skipped with a note when missing).
Every proxy round-robins over the same two HTTP backends and the same two WebSocket echo
backends, keeps connections to them alive and lets tunnels idle for an hour. The proxy is
pinned to its own core; the backends, the load generators and this script to the others.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import grp
import importlib.metadata
import json
import os
import platform
import pstats
import pwd
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procfs

ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("direct", "lbproxy", "nginx", "haproxy")  # the default run
LBPROXY = [sys.executable, "-m", "lbproxy"]
# On request: bench.uvtunnel, the cheapest uvloop tunnel (WS only); bench.h2bare, the h2
# package answering by itself (HTTP/2 only), with h2's HPACK encoder or lbproxy's.
EXTRA = ("uvtunnel", "h2bare", "h2bare-static")
Value = float | None


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    rounds: int  # each load phase runs this many times per proxy, interleaved
    http: int  # seconds of wrk
    ws1: float  # seconds of 1-connection echo
    ws100: float  # seconds of 100-connection echo
    paced: float  # seconds of 100-connection echo at WS_PACED_RATE
    throughput: float  # seconds of 64 KiB echo
    churn: float  # seconds of connect/echo/close
    warmup: float  # seconds of load before each measured window (not counted)
    tunnels: int  # idle tunnels for the memory figure
    capacity: int  # tunnels that must open and stay open (the 9,000 budget)


FULL = Settings(
    rounds=3,
    http=5,
    ws1=3,
    ws100=4,
    paced=4,
    throughput=3,
    churn=3,
    warmup=0.5,
    tunnels=5000,
    capacity=9000,
)
QUICK = Settings(
    rounds=1,
    http=2,
    ws1=1,
    ws100=2,
    paced=2,
    throughput=1,
    churn=1,
    warmup=0.3,
    tunnels=5000,
    capacity=9000,
)

HTTP_CONNS = 50
H2WS_CONNS = 2  # bench.h2wsload connections ...
H2WS_STREAMS = 25  # ... of WebSocket streams each (RFC 8441)
H2_CONNS = 4  # h2load connections ...
H2_STREAMS = 25  # ... each with this many concurrent streams (100 requests in flight)
WS_CONNS = 100
WS_PACED_RATE = 10_000  # round trips/s: every proxy relays the same load (none is saturated)
THROUGHPUT_CONNS = 4
THROUGHPUT_WINDOW = 4  # 64 KiB messages in flight per connection
CHURN_WORKERS = 20


# ---------------------------------------------------------------------------------- machine
@dataclass
class Pinning:
    proxy: set[int]
    load: set[int]

    @classmethod
    def plan(cls) -> Pinning:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return cls(set(cpus), set(cpus))
        return cls({cpus[1]}, set(cpus) - {cpus[1]})

    @property
    def pinned(self) -> bool:
        return self.proxy != self.load

    def describe(self) -> str:
        if not self.pinned:
            return "not pinned (one CPU): proxy, backends and load generators share it"
        return (
            f"proxy on CPU {_cpus(self.proxy)}; backends, load generators (wrk, "
            f"bench.wsload) and this script on CPU {_cpus(self.load)}"
        )

    def apply_to_self(self) -> None:
        if self.pinned:
            os.sched_setaffinity(0, self.load)

    def proxy_preexec(self) -> Callable[[], None] | None:
        if not self.pinned:
            return None
        cpus = set(self.proxy)
        return lambda: os.sched_setaffinity(0, cpus)


def _cpus(cpus: set[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


def machine() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    uvloop_version = importlib.metadata.version("uvloop")

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{model}, {os.cpu_count()} cores",
        "kernel": f"Linux {platform.release()}",
        "python": f"Python {platform.python_version()}, uvloop {uvloop_version}",
        # the build measured, compiled or pure: asked of the very command the runs start
        "lbproxy": _version([*LBPROXY, "--version"]),
        "nginx": _version(["nginx", "-v"]) if shutil.which("nginx") else "not installed",
        "haproxy": _version(["haproxy", "-v"]) if shutil.which("haproxy") else "not installed",
        "wrk": _version(["wrk", "--version"]) if shutil.which("wrk") else "not installed",
    }


# ---------------------------------------------------------------------------------- processes
def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} is not listening on port {port} after {timeout:g}s")


class Procs:
    """Every process the bench started, stopped (by pid) however the run ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        cmd: list[str],
        logfile: Path,
        preexec: Callable[[], None] | None = None,
        stdout_pipe: bool = False,
    ) -> subprocess.Popen[bytes]:
        err = open(logfile, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else err,
            stderr=err,
            preexec_fn=preexec,  # only sched_setaffinity; the bench runs no threads
            start_new_session=True,
        )
        err.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def _user_directive() -> str:
    """nginx as root switches its workers to ``nobody``: keep them as the current user."""
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};\n"


def _nginx_main(tmp: Path) -> str:
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    return (
        _user_directive()
        + f"""worker_processes 1;
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 20000; }}
"""
    )


def _nginx_http_common(tmp: Path) -> str:
    return f"""    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
"""


def _nginx_cmd(tmp: Path) -> list[str]:
    conf, err = f"{tmp}/nginx.conf", f"{tmp}/error.log"
    return ["nginx", "-p", str(tmp), "-e", err, "-c", conf, "-g", "daemon off;"]


@dataclass
class Backends:
    """Two HTTP backends (nginx ``return 200``; the echo servers when nginx is missing) and
    two WebSocket echo backends (bench.wsecho), each its own process, on the load CPUs."""

    http_ports: list[int] = field(default_factory=list)
    ws_ports: list[int] = field(default_factory=list)
    http_kind: str = ""

    def start(self, procs: Procs, tmp: Path) -> None:
        for i in range(2):
            proc = procs.start(
                [sys.executable, "-m", "bench.wsecho"], tmp / f"wsecho{i}.log", stdout_pipe=True
            )
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            if not line.startswith("listening "):
                raise RuntimeError(f"bench.wsecho did not start (see {tmp}/wsecho{i}.log)")
            self.ws_ports.append(int(line.split()[1]))
        if shutil.which("nginx") is None:
            self.http_ports = list(self.ws_ports)
            self.http_kind = "bench.wsecho (nginx not installed)"
            return
        self.http_kind = 'nginx `return 200 "ok"`'
        for i, port in enumerate(free_ports(2)):
            d = tmp / f"backend{i}"
            d.mkdir()
            conf = _nginx_main(d) + (
                "http {\n"
                + _nginx_http_common(d)
                + f"""    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "ok"; }}
    }}
}}
"""
            )
            (d / "nginx.conf").write_text(conf)
            proc = procs.start(_nginx_cmd(d), d / "stderr.log")
            wait_port(port, proc, f"backend nginx {i}")
            self.http_ports.append(port)


# ---------------------------------------------------------------------------------- targets
class Target:
    """One thing to measure: where to send HTTP and WebSocket load, and which processes."""

    name = ""
    serves_http = True
    serves_h2 = False  # an https listener with HTTP/2 on h2_port (the h2 phase)
    serves_h2ws = False  # ... where /ws is a WebSocket over HTTP/2 (RFC 8441, the h2ws phase)
    only_phases: frozenset[str] | None = None  # a floor measured in these phases only

    def __init__(self, backends: Backends, procs: Procs, pinning: Pinning, tmp: Path) -> None:
        self.backends = backends
        self.procs = procs
        self.pinning = pinning
        self.tmp = tmp / self.name
        self.tmp.mkdir(parents=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_port, self.ws_port, self.h2_port = free_ports(3)

    def available(self) -> str | None:
        """None when it can run, else why not."""
        return None

    def start(self) -> None:
        cmd = self.command()
        self.proc = self.procs.start(
            cmd, self.tmp / "stderr.log", preexec=self.pinning.proxy_preexec()
        )
        if self.serves_http:
            wait_port(self.http_port, self.proc, self.name)
        if self.serves_h2:
            wait_port(self.h2_port, self.proc, self.name)
        if self.only_phases is None:
            wait_port(self.ws_port, self.proc, self.name)
        time.sleep(0.3)  # let nginx's worker come up

    def command(self) -> list[str]:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None

    def pids(self) -> list[int]:
        return procfs.tree(self.proc.pid) if self.proc is not None else []

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/"

    @property
    def ws_targets(self) -> str:
        return f"127.0.0.1:{self.ws_port}"

    @property
    def h2_url(self) -> str:
        return f"https://127.0.0.1:{self.h2_port}/"

    def certificate(self) -> tuple[str, str]:
        """A self-signed certificate for the h2 listener (openssl), as (cert, key) paths."""
        cert, key = str(self.tmp / "cert.pem"), str(self.tmp / "key.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost"],
            check=True,
            capture_output=True,
        )  # fmt: skip
        return cert, key


class Direct(Target):
    name = "direct"

    def start(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.backends.http_ports[0]}/"

    @property
    def ws_targets(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.backends.ws_ports)


class UvTunnel(Target):
    name = "uvtunnel"
    serves_http = False

    def command(self) -> list[str]:
        ports = ",".join(map(str, self.backends.ws_ports))
        return [sys.executable, "-m", "bench.uvtunnel", str(self.ws_port), ports]


class H2Bare(Target):
    """bench.h2bare: the h2 package answering every request itself (no proxying), the floor
    under lbproxy's HTTP/2 cost while it keeps h2; ``h2bare-static`` the same with lbproxy's
    HPACK encoder (``wire.hpack_static.StaticEncoder``) in place of h2's."""

    name = "h2bare"
    serves_http = False
    serves_h2 = True
    only_phases = frozenset({"h2"})
    encoder = "h2"

    def command(self) -> list[str]:
        cert, key = self.certificate()
        return [sys.executable, "-m", "bench.h2bare", str(self.h2_port), cert, key,
                "--encoder", self.encoder]  # fmt: skip


class H2BareStatic(H2Bare):
    name = "h2bare-static"
    encoder = "lbproxy"


class Lbproxy(Target):
    name = "lbproxy"
    serves_h2 = True
    serves_h2ws = True

    def config(self) -> str:
        def group(ports: list[int]) -> str:
            servers = "".join(f"      - address: 127.0.0.1:{p}\n" for p in ports)
            return (
                "    scheduler: rr\n    servers:\n"
                + servers
                + "    keepalive_connections: 64\n    keepalive_timeout: 60s\n"
                + "    health_check:\n      enabled: false\n"
            )

        b = self.backends
        cert, key = self.certificate()
        return f"""listeners:
  - name: http
    bind: 127.0.0.1:{self.http_port}
    server_group: http
    idle_timeout: 1h
  - name: h2
    bind: 127.0.0.1:{self.h2_port}
    protocol: https
    tls: {{cert: {cert}, key: {key}}}
    server_group: http
    idle_timeout: 1h
    http2_websocket: true
    rules:
      - path: /ws
        server_group: ws
  - name: ws
    bind: 127.0.0.1:{self.ws_port}
    server_group: ws
    idle_timeout: 1h
server_groups:
  http:
{group(b.http_ports)}  ws:
{group(b.ws_ports)}admin:
  bind: 127.0.0.1:0
access_log:
  enabled: false
"""

    def command(self) -> list[str]:
        path = self.tmp / "lbproxy.yaml"
        path.write_text(self.config())
        return [*LBPROXY, "--config", str(path), "--log-level", "warning"]


class Nginx(Target):
    name = "nginx"
    serves_h2 = True

    def available(self) -> str | None:
        return None if shutil.which("nginx") else "nginx is not installed"

    def command(self) -> list[str]:
        b = self.backends
        cert, key = self.certificate()
        location = """proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;"""

        def upstream(name: str, ports: list[int]) -> str:
            servers = "".join(f"        server 127.0.0.1:{p};\n" for p in ports)
            return (
                f"    upstream {name} {{\n{servers}        keepalive 64;\n"
                "        keepalive_requests 1000000;\n        keepalive_timeout 60s;\n    }\n"
            )

        def server(port: int, name: str) -> str:
            return (
                f"    server {{\n        listen 127.0.0.1:{port} backlog=4096;\n"
                f"        location / {{\n            proxy_pass http://{name};\n"
                f"            {location}\n        }}\n    }}\n"
            )

        conf = _nginx_main(self.tmp) + (
            "http {\n"
            + _nginx_http_common(self.tmp)
            + "    map $http_upgrade $connection_upgrade { default upgrade; '' ''; }\n"
            + upstream("http_backends", b.http_ports)
            + upstream("ws_backends", b.ws_ports)
            + server(self.http_port, "http_backends")
            + server(self.ws_port, "ws_backends")
            + server(self.h2_port, "http_backends").replace(
                f"listen 127.0.0.1:{self.h2_port} backlog=4096;",
                f"listen 127.0.0.1:{self.h2_port} ssl http2 backlog=4096;\n"
                f"        ssl_certificate {cert};\n        ssl_certificate_key {key};\n"
                "        http2_max_concurrent_streams 128;",
            )
            + "}\n"
        )
        (self.tmp / "nginx.conf").write_text(conf)
        return _nginx_cmd(self.tmp)


class Haproxy(Target):
    name = "haproxy"
    serves_h2 = True  # (WebSocket over HTTP/2 toward clients since HAProxy 2.4)
    serves_h2ws = True

    def available(self) -> str | None:
        return None if shutil.which("haproxy") else "HAProxy is not installed"

    def command(self) -> list[str]:
        b = self.backends

        def backend(name: str, ports: list[int]) -> str:
            servers = "".join(f"    server s{i} 127.0.0.1:{p}\n" for i, p in enumerate(ports))
            return f"backend {name}\n    balance roundrobin\n{servers}"

        # maxconn 9500: HAProxy sizes its fd limit from it (~2x), under the hard 20,000.
        conf = f"""global
    nbthread 1
    maxconn 9500
    pidfile {self.tmp}/haproxy.pid
defaults
    mode http
    maxconn 9500
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    timeout tunnel 1h
frontend http_in
    bind 127.0.0.1:{self.http_port} backlog 4096
    default_backend http_backends
frontend ws_in
    bind 127.0.0.1:{self.ws_port} backlog 4096
    default_backend ws_backends
{self._h2_frontend()}{backend("http_backends", b.http_ports)}{backend("ws_backends", b.ws_ports)}"""
        path = self.tmp / "haproxy.cfg"
        path.write_text(conf)
        return ["haproxy", "-f", str(path), "-db"]

    def _h2_frontend(self) -> str:
        """The https listener (ALPN h2): /ws to the WebSocket backends (RFC 8441 streams)."""
        if not self.serves_h2:
            return ""
        cert, key = self.certificate()
        pem = self.tmp / "haproxy.pem"  # HAProxy takes the certificate and key in one file
        pem.write_text(Path(cert).read_text() + Path(key).read_text())
        return (
            f"frontend h2_in\n    bind 127.0.0.1:{self.h2_port} ssl crt {pem} alpn h2,http/1.1"
            " backlog 4096\n    use_backend ws_backends if { path_beg /ws }\n"
            "    default_backend http_backends\n"
        )


class LbproxyPolicy(Lbproxy):
    """lbproxy with WebSocket message policies on (listeners[].websocket), limits high enough
    never to close a tunnel: the cost of checking every client frame against them."""

    name = "lbproxy-policy"

    def config(self) -> str:
        policy = (
            "    websocket:\n      max_message_size: 1MiB\n"
            "      messages_per_second: 1000000\n      burst: 1000000\n"
        )
        text = super().config()
        marker = "    server_group: ws\n"
        return text.replace(marker, marker + policy, 1)


class Baseline(Lbproxy):
    """lbproxy from another checkout (``--baseline DIR``: its own ``.venv``), to measure a
    change before and after in the same run. ``-P`` keeps this checkout's lbproxy/ (the
    working directory) off its path."""

    name = "baseline"
    tree: Path | None = None

    def available(self) -> str | None:
        if self.tree is None or not (self.tree / ".venv" / "bin" / "python").exists():
            return "no --baseline DIR with a .venv"
        return None

    def command(self) -> list[str]:
        assert self.tree is not None
        cmd = super().command()
        return [str(self.tree / ".venv" / "bin" / "python"), "-P", *cmd[1:]]


TARGET_CLASSES: dict[str, type[Target]] = {
    "direct": Direct,
    "uvtunnel": UvTunnel,
    "h2bare": H2Bare,
    "h2bare-static": H2BareStatic,
    "lbproxy": Lbproxy,
    "baseline": Baseline,
    "lbproxy-policy": LbproxyPolicy,
    "nginx": Nginx,
    "haproxy": Haproxy,
}


# ---------------------------------------------------------------------------------- load
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(num: str, unit: str) -> float:
    return float(num) * _UNITS[unit]


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50: float  # seconds
    p99: float
    errors: str


# What a browser sends on a page load besides Host (issue 27's second request shape): ten
# header lines, about 600 bytes, as Chromium sends them to a same-origin page.
BROWSER_HEADERS = (
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
    "Accept-Language: en-US,en;q=0.9",
    "Accept-Encoding: gzip, deflate, br, zstd",
    "Cache-Control: max-age=0",
    "Upgrade-Insecure-Requests: 1",
    "Sec-Fetch-Dest: document",
    "Sec-Fetch-Mode: navigate",
    "Sec-Fetch-Site: same-origin",
    "Cookie: session=3f2a9c1e7b5d4a60; theme=dark; lang=en",
)


def wrk(
    url: str, seconds: float, conns: int = HTTP_CONNS, headers: tuple[str, ...] = ()
) -> WrkResult:
    d = max(1, round(seconds))
    cmd = ["wrk", "-t1", f"-c{conns}", f"-d{d}s", "--latency"]
    for line in headers:
        cmd += ["-H", line]
    cmd.append(url)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=d + 30).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    pct = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)$", out, re.M))
    if m is None or rps is None or "50" not in pct or "99" not in pct:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")

    def lat(text: str) -> float:
        num, unit = re.fullmatch(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
        return _seconds(num, unit)

    errors = []
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors.append(f"{non2xx.group(1)} non-2xx responses")
    sock = re.search(r"Socket errors: (.*)", out)
    if sock:
        errors.append(f"socket errors: {sock.group(1)}")
    return WrkResult(
        requests=int(m.group(1)),
        seconds=_seconds(m.group(2), m.group(3)),
        rps=float(rps.group(1)),
        p50=lat(pct["50"]),
        p99=lat(pct["99"]),
        errors="; ".join(errors),
    )


@dataclass
class H2loadResult:
    requests: int  # succeeded
    rps: float
    errors: str


def h2load(url: str, seconds: float) -> H2loadResult:
    d = max(1, round(seconds))
    cmd = ["h2load", "-t1", f"-c{H2_CONNS}", f"-m{H2_STREAMS}", "-D", str(d), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=d + 30).stdout
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
                     r"(\d+) errored", out)  # fmt: skip
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    if done is None or rps is None:
        raise RuntimeError(f"cannot read h2load's output:\n{out}")
    if "h2" not in out.split("Application protocol:")[-1][:10]:
        raise RuntimeError(f"h2load did not negotiate h2:\n{out}")
    failed, errored = int(done.group(2)), int(done.group(3))
    errors = f"{failed} failed, {errored} errored" if failed or errored else ""
    return H2loadResult(requests=int(done.group(1)), rps=float(rps.group(1)), errors=errors)


def wsload(
    mode: str, targets: str, pids: list[int], timeout: float, **opts: object
) -> dict[str, Value]:
    cmd = [sys.executable, "-m", "bench.wsload", mode, "--target", targets]
    if pids:
        cmd += ["--pids", ",".join(map(str, pids))]
    for key, value in opts.items():
        cmd += [f"--{key}", str(value)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"bench.wsload {mode} failed: {out.stderr.strip()[-2000:]}")
    result: dict[str, Value] = json.loads(lines[-1])
    if "error" in result:
        raise RuntimeError(f"bench.wsload {mode}: {result['error']}")
    return result


# ---------------------------------------------------------------------------------- phases
class Phase:
    """One measurement of one target: figures by key, and notes on anything that went wrong."""

    def __init__(self, target: Target, s: Settings) -> None:
        self.target = target
        self.s = s
        self.values: dict[str, Value] = {}
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(f"{self.target.name}: {text}")


def _per(cpu: Value, count: Value, scale: float) -> Value:
    if cpu is None or not count:
        return None
    return cpu / count * scale


def phase_warmup(ph: Phase) -> None:
    """Both paths once (imports, pools, the allocator) before anything is measured."""
    t = ph.target
    if t.serves_http:
        wrk(t.http_url, 1)
    wsload("echo", t.ws_targets, [], 30, conns=10, duration=0.5, warmup=0.1)


def phase_idle(ph: Phase) -> None:
    t, n = ph.target, ph.s.tunnels
    pids = t.pids()
    r = wsload("idle", t.ws_targets, pids, 120, conns=n)
    if pids and r["conns"]:
        assert r["pss_after_kib"] is not None and r["pss_before_kib"] is not None
        ph.values["idle_kib"] = (r["pss_after_kib"] - r["pss_before_kib"]) / float(r["conns"])
    if r["failed"]:
        ph.note(f"{r['failed']} of {n} idle tunnels failed to open")


def phase_capacity(ph: Phase) -> None:
    t, n = ph.target, ph.s.capacity
    r = wsload("idle", t.ws_targets, t.pids(), 180, conns=n, settle=0.5)
    ok = r["conns"] == n and r["sample_alive"] == r["sample"]
    ph.values["capacity_ok"] = 1.0 if ok else 0.0
    ph.values["capacity_open"] = r["conns"]
    if not ok:
        ph.note(
            f"{r['conns']} of {n} tunnels opened, "
            f"{r['sample_alive']} of {r['sample']} sampled still echoing"
        )


def phase_http(ph: Phase) -> None:
    t = ph.target
    pids = t.pids()
    wrk(t.http_url, ph.s.warmup)
    c0 = procfs.cpu_seconds(pids)
    w = wrk(t.http_url, ph.s.http)
    c1 = procfs.cpu_seconds(pids)
    ph.values["http_rps"] = w.rps
    ph.values["http_p50"] = w.p50 * 1e3
    ph.values["http_p99"] = w.p99 * 1e3
    ph.values["http_cpu"] = _per(c1 - c0 if pids else None, w.requests, 1e6)
    if w.errors:
        ph.note(f"HTTP: {w.errors}")


def phase_http10(ph: Phase) -> None:
    """As ``http``, each request with ten browser-like header lines (BROWSER_HEADERS)."""
    t = ph.target
    pids = t.pids()
    wrk(t.http_url, ph.s.warmup, headers=BROWSER_HEADERS)
    c0 = procfs.cpu_seconds(pids)
    w = wrk(t.http_url, ph.s.http, headers=BROWSER_HEADERS)
    c1 = procfs.cpu_seconds(pids)
    ph.values["http10_rps"] = w.rps
    ph.values["http10_cpu"] = _per(c1 - c0 if pids else None, w.requests, 1e6)
    if w.errors:
        ph.note(f"HTTP, 10 headers: {w.errors}")


def phase_h2(ph: Phase) -> None:
    """HTTP/2 over TLS, H2_CONNS connections of H2_STREAMS concurrent streams (h2load)."""
    t = ph.target
    pids = t.pids()
    h2load(t.h2_url, ph.s.warmup)
    c0 = procfs.cpu_seconds(pids)
    r = h2load(t.h2_url, ph.s.http)
    c1 = procfs.cpu_seconds(pids)
    ph.values["h2_rps"] = r.rps
    ph.values["h2_cpu"] = _per(c1 - c0 if pids else None, r.requests, 1e6)
    if r.errors:
        ph.note(f"HTTP/2: {r.errors}")


def _echo(ph: Phase, key: str, conns: int, seconds: float, rate: int = 0) -> None:
    t = ph.target
    pids = t.pids()
    r = wsload(
        "echo",
        t.ws_targets,
        pids,
        seconds + 60,
        conns=conns,
        size=64,
        duration=seconds,
        warmup=ph.s.warmup,
        rate=rate,
    )
    ph.values[f"{key}_rate"] = r["rate"]
    ph.values[f"{key}_p50"] = r["p50_us"]
    ph.values[f"{key}_p99"] = r["p99_us"]
    # Each round trip is two relayed messages: client -> server, server -> client.
    rt = r["round_trips"]
    ph.values[f"{key}_cpu"] = _per(r["cpu"] if pids else None, 2 * rt if rt else None, 1e6)
    if r["bad"]:
        ph.note(f"{key}: {r['bad']} connections echoed wrong bytes")


def phase_h2ws(ph: Phase) -> None:
    """WebSocket over HTTP/2 (RFC 8441): H2WS_CONNS connections of H2WS_STREAMS streams, one
    64-byte message in flight on each (bench.h2wsload)."""
    t = ph.target
    pids = t.pids()
    d = ph.s.ws100
    cmd = [sys.executable, "-m", "bench.h2wsload", "--target", f"127.0.0.1:{t.h2_port}",
           "--conns", str(H2WS_CONNS), "--streams", str(H2WS_STREAMS), "--duration", str(d),
           "--warmup", str(ph.s.warmup), "--pids", ",".join(map(str, pids))]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=d + 60)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"bench.h2wsload failed: {out.stderr.strip()[-2000:]}")
    r = json.loads(lines[-1])
    if "error" in r:
        raise RuntimeError(f"bench.h2wsload: {r['error']}")
    rt = r["round_trips"]
    ph.values["h2ws_rate"] = r["rate"]
    ph.values["h2ws_cpu"] = _per(r["cpu"] if pids else None, 2 * rt if rt else None, 1e6)
    if r["bad"] or r["failed"]:
        ph.note(f"h2ws: {r['bad']} streams echoed wrong bytes, {r['failed']} failed")


def phase_ws1(ph: Phase) -> None:
    _echo(ph, "ws1", 1, ph.s.ws1)


def phase_ws100(ph: Phase) -> None:
    _echo(ph, "ws100", WS_CONNS, ph.s.ws100)


def phase_paced(ph: Phase) -> None:
    _echo(ph, "paced", WS_CONNS, ph.s.paced, WS_PACED_RATE)


def phase_throughput(ph: Phase) -> None:
    t = ph.target
    pids = t.pids()
    r = wsload(
        "echo",
        t.ws_targets,
        pids,
        ph.s.throughput + 60,
        conns=THROUGHPUT_CONNS,
        window=THROUGHPUT_WINDOW,
        size=65536,
        duration=ph.s.throughput,
        warmup=ph.s.warmup,
    )
    assert r["bytes_per_s"] is not None
    ph.values["thr_mbs"] = r["bytes_per_s"] / 1e6
    mb = 2 * r["bytes_per_s"] * float(r["seconds"] or 0) / 1e6  # both directions
    ph.values["thr_cpu"] = _per(r["cpu"] if pids else None, mb, 1e3)
    if r["bad"]:
        ph.note(f"throughput: {r['bad']} connections echoed wrong bytes")


def phase_churn(ph: Phase) -> None:
    t = ph.target
    pids = t.pids()
    r = wsload(
        "churn",
        t.ws_targets,
        pids,
        ph.s.churn + 60,
        conns=CHURN_WORKERS,
        duration=ph.s.churn,
        warmup=ph.s.warmup,
    )
    ph.values["churn_rate"] = r["rate"]
    ph.values["churn_cpu"] = _per(r["cpu"] if pids else None, r["connections"], 1e6)
    if r["failed"]:
        ph.note(f"churn: {r['failed']} connections failed")


# In this order. The idle memory comes first, right after the warm-up: later load would leave
# freed memory behind that new tunnels reuse, hiding their cost.
PHASE_FUNCS: dict[str, Callable[[Phase], None]] = {
    "warmup": phase_warmup,
    "idle": phase_idle,
    "capacity": phase_capacity,
    "http": phase_http,
    "http10": phase_http10,
    "h2": phase_h2,
    "h2ws": phase_h2ws,
    "ws1": phase_ws1,
    "ws100": phase_ws100,
    "paced": phase_paced,
    "throughput": phase_throughput,
    "churn": phase_churn,
}
PHASES = tuple(PHASE_FUNCS)
ONCE = {"warmup", "idle", "capacity"}  # the rest run in rounds (not the direct floor)


@dataclass
class Results:
    """Every sample of every figure, by target; a figure is the median of its rounds."""

    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, ph: Phase) -> None:
        per = self.samples.setdefault(name, {})
        for key, value in ph.values.items():
            if value is not None:
                per.setdefault(key, []).append(value)
        self.notes += ph.notes

    def get(self, name: str, key: str) -> Value:
        values = self.samples.get(name, {}).get(key)
        return statistics.median(values) if values else None

    def paired_ratios(self, a: str, b: str, key: str) -> list[float]:
        """``a``/``b`` for each round, the two measured one right after the other."""
        xs = self.samples.get(a, {}).get(key, [])
        ys = self.samples.get(b, {}).get(key, [])
        return [x / y for x, y in zip(xs, ys, strict=False) if y]


def run_phases(targets: list[Target], s: Settings, phases: set[str], results: Results) -> None:
    """Phase by phase; within a phase, round by round, each target in turn. Spreading the
    rounds over the run puts every target through the same noise of a shared machine."""
    dead: set[str] = set()
    for phase, fn in PHASE_FUNCS.items():
        if phase not in phases:
            continue
        rounds = 1 if phase in ONCE else s.rounds
        for r in range(rounds):
            for t in targets:
                if t.name in dead or (r > 0 and isinstance(t, Direct)):
                    continue
                if t.only_phases is not None and phase not in t.only_phases:
                    continue
                if phase == "http" and not t.serves_http:
                    continue
                if phase == "h2" and not t.serves_h2:
                    continue
                if phase == "h2ws" and not t.serves_h2ws:
                    continue
                if t.proc is not None and t.proc.poll() is not None:
                    results.notes.append(f"{t.name}: exited with code {t.proc.returncode}")
                    dead.add(t.name)
                    continue
                log(f"{phase} {r + 1}/{rounds}: {t.name}")
                ph = Phase(t, s)
                try:
                    fn(ph)
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
                    ph.note(f"{phase}: {exc}")
                    log(f"{t.name}: {phase} FAILED: {exc}")
                results.add(t.name, ph)
                cpu = {k: round(v, 1) for k, v in ph.values.items() if k.endswith("_cpu") and v}
                if cpu:  # each round's CPU figures, for the spread behind a median
                    log(f"{phase} {r + 1}/{rounds}: {t.name}: {cpu}")


# ---------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class Row:
    key: str
    label: str
    fmt: str  # "int", "f1", "f2", "f3"


ROWS = (
    Row("http_rps", f"HTTP keep-alive requests/s (wrk, {HTTP_CONNS} connections)", "int"),
    Row("http_p50", "HTTP latency p50 (ms)", "f2"),
    Row("http_p99", "HTTP latency p99 (ms)", "f2"),
    Row("http_cpu", "**proxy CPU per HTTP request (µs)**", "f1"),
    Row("http10_rps", "HTTP keep-alive requests/s, 10 browser-like header lines", "int"),
    Row("http10_cpu", "**proxy CPU per HTTP request, 10 browser-like header lines (µs)**", "f1"),
    Row("h2_rps", f"HTTP/2 requests/s (h2load, {H2_CONNS}x{H2_STREAMS} streams, TLS)", "int"),
    Row("h2_cpu", "proxy CPU per HTTP/2 request, TLS included (µs)", "f1"),
    Row(
        "h2ws_rate",
        f"WebSocket over HTTP/2 round trips/s ({H2WS_CONNS}x{H2WS_STREAMS} streams, 64 B, TLS; "
        "the client is the bottleneck)",
        "int",
    ),
    Row("h2ws_cpu", "proxy CPU per message relayed in an HTTP/2 stream, TLS included (µs)", "f1"),
    Row("ws1_p50", "WS echo round trip p50, 1 connection (µs)", "int"),
    Row("ws1_p99", "WS echo round trip p99, 1 connection (µs)", "int"),
    Row("ws1_cpu", "proxy CPU per relayed WS message, 1 connection (µs)", "f1"),
    Row("ws100_rate", f"WS echo round trips/s, {WS_CONNS} connections", "int"),
    Row("ws100_p50", f"WS echo round trip p50, {WS_CONNS} connections (µs)", "int"),
    Row("ws100_p99", f"WS echo round trip p99, {WS_CONNS} connections (µs)", "int"),
    Row("ws100_cpu", f"**proxy CPU per relayed WS message, {WS_CONNS} connections (µs)**", "f2"),
    Row("paced_rate", f"WS echo round trips/s, paced at {WS_PACED_RATE:,}/s", "int"),
    Row("paced_p50", f"WS echo round trip p50, paced at {WS_PACED_RATE:,}/s (µs)", "int"),
    Row("paced_p99", f"WS echo round trip p99, paced at {WS_PACED_RATE:,}/s (µs)", "int"),
    Row("paced_cpu", f"proxy CPU per relayed WS message, paced at {WS_PACED_RATE:,}/s (µs)", "f2"),
    Row("thr_mbs", "WS throughput, 64 KiB messages (MB/s echoed)", "int"),
    Row("thr_cpu", "proxy CPU per MB relayed, 64 KiB messages (ms)", "f2"),
    Row("idle_kib", "**proxy memory per idle WS tunnel (KiB of PSS)**", "f2"),
    Row("capacity_open", "WS tunnels open at once (of {capacity})", "int"),
    Row("churn_rate", "WS connection churn (connect, echo, close per s)", "int"),
    Row("churn_cpu", "proxy CPU per WS connection (µs)", "int"),
)


def _fmt(value: Value, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "int":
        return f"{value:,.0f}"
    return f"{value:,.{kind[1]}f}"


def _ratio(a: Value, b: Value) -> str:
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.2f}x"


def report(
    results: Results,
    cols: list[str],
    skipped: dict[str, str],
    info: dict[str, str],
    pinning: Pinning,
    backends: Backends,
    s: Settings,
    quick: bool,
) -> str:
    ratio_cols = [
        t
        for t in ("lbproxy", "lbproxy-policy", "baseline", "haproxy")
        if t in cols and "nginx" in cols
    ]
    head = ["figure", *cols, *(f"{t}/nginx" for t in ratio_cols)]
    cmd = ".venv/bin/python -m bench.run" + (" --quick" if quick else "")
    lines = [
        "# lbproxy benchmark",
        "",
        f"{info['date']}, `{cmd}`{' (short durations: a smoke run)' if quick else ''}.",
        "",
        f"- machine: {info['cpu']}; {info['kernel']}",
        f"- software: {info['python']}; {info['lbproxy']} (1 worker, access log off); "
        f"{info['nginx']} (1 worker); {info['haproxy']} (nbthread 1); {info['wrk']}",
        f"- pinning: {pinning.describe()}",
        f"- backends: HTTP: two {backends.http_kind} processes; WebSocket: two bench.wsecho "
        "processes (uvloop, raw frames); every proxy round-robins over the two, with keep-alive",
        f"- each figure is the median of {s.rounds} round{'s' if s.rounds > 1 else ''} "
        "(the proxies take turns, round by round; the direct floor runs once) of: "
        f"HTTP {s.http}s; WS echo {s.ws1}s with 1 connection, {s.ws100}s with {WS_CONNS} "
        f"and {s.paced}s with {WS_CONNS} paced at {WS_PACED_RATE:,} round trips/s; "
        f"64 KiB throughput {s.throughput}s; churn {s.churn}s; each after {s.warmup}s of "
        f"warm-up. {s.tunnels:,} idle tunnels for the memory figure",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" + "---:|" * (len(head) - 1),
    ]
    for row in ROWS:
        label = row.label.format(capacity=f"{s.capacity:,}")
        if all(results.get(t, row.key) is None for t in cols):
            continue  # a phase that did not run
        cells = [_fmt(results.get(t, row.key), row.fmt) for t in cols]
        ratios = [
            _ratio(results.get(t, row.key), results.get("nginx", row.key)) for t in ratio_cols
        ]
        lines.append("| " + " | ".join([label, *cells, *ratios]) + " |")
    lines += [
        "",
        "CPU figures are the proxy's own processes (utime + stime from /proc/PID/stat), "
        "divided by the requests, messages (each echo is two: there and back), MB "
        "(both directions) or connections of the measured window; memory is PSS from "
        "/proc/PID/smaps_rollup with the tunnels open minus before, divided by their "
        "number. Lower is better except for rates and throughput. The CPU figures are "
        "the steady ones; rates and latencies move with whatever else the machine runs.",
    ]
    lines += ["", *budgets(results, s)]
    notes = [f"{name}: skipped: {why}" for name, why in skipped.items()] + results.notes
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def budgets(results: Results, s: Settings) -> list[str]:
    if "lbproxy" not in results.samples:
        return []

    def ratio_budget(key: str, limit: float, what: str) -> str:
        a = results.get("lbproxy", key)
        b = results.get("nginx", key)
        if a is None or b is None or not b:
            return f"| {what} | <= {limit:g}x nginx | — | | not measured |"
        r = a / b
        paired = results.paired_ratios("lbproxy", "nginx", key)
        spread = f"{min(paired):.2f}x to {max(paired):.2f}x" if len(paired) > 1 else ""
        verdict = "met" if r <= limit else "MISSED"
        return f"| {what} | <= {limit:g}x nginx | {r:.2f}x | {spread} | {verdict} |"

    mem = results.get("lbproxy", "idle_kib")
    cap = results.get("lbproxy", "capacity_ok")
    opened = results.get("lbproxy", "capacity_open") or 0
    mem_row = (
        f"| memory per idle WebSocket tunnel | <= 3.5 KiB | {mem:.2f} KiB | | "
        f"{'met' if mem <= 3.5 else 'MISSED'} |"
        if mem is not None
        else "| memory per idle WebSocket tunnel | <= 3.5 KiB | — | | not measured |"
    )
    cap_row = (
        f"| open tunnels in one process | {s.capacity:,} | {opened:,.0f} | | "
        f"{'met' if cap else 'MISSED'} |"
        if cap is not None
        else f"| open tunnels in one process | {s.capacity:,} | — | | not measured |"
    )
    return [
        "Budgets (issues 13 and 27), lbproxy with 1 worker:",
        "",
        "| budget | target | lbproxy | per round | |",
        "|---|---|---:|---:|---|",
        ratio_budget("http_cpu", 1.3, "proxy CPU per proxied HTTP request"),
        ratio_budget("http10_cpu", 1.45, "the same, 10 browser-like header lines"),
        ratio_budget("churn_cpu", 1.5, "proxy CPU per WebSocket connection (churn)"),
        ratio_budget(
            "ws100_cpu", 1.15, f"proxy CPU per relayed WebSocket message ({WS_CONNS} conns)"
        ),
        ratio_budget("paced_cpu", 1.15, f"the same, paced at {WS_PACED_RATE:,} round trips/s"),
        mem_row,
        cap_row,
    ]


# ---------------------------------------------------------------------------------- profile
def profile(
    procs: Procs,
    backends: Backends,
    pinning: Pinning,
    tmp: Path,
    s: Settings,
    paths: tuple[str, ...] = ("http", "ws", "churn", "h2"),
) -> str:
    """lbproxy under cProfile: with HTTP load, WebSocket echo load, WebSocket churn, and HTTP/2
    load (h2load, when the h2 phase runs)."""
    out: list[str] = []
    for path in paths:
        if path == "h2" and not Lbproxy.serves_h2:
            continue
        target = Lbproxy(backends, procs, pinning, tmp / f"profile-{path}")
        prof = target.tmp / "lbproxy.prof"
        cmd = target.command()
        cmd[1:3] = ["-m", "cProfile", "-o", str(prof), "-m", "lbproxy"]
        target.proc = procs.start(cmd, target.tmp / "stderr.log", target.pinning.proxy_preexec())
        wait_port(target.http_port, target.proc, "lbproxy (profiled)")
        wait_port(target.ws_port, target.proc, "lbproxy (profiled)")
        seconds = 3 * s.http
        if path == "http":
            w = wrk(target.http_url, seconds)
            count, unit = w.requests, "request"
        elif path == "h2":
            h = h2load(target.h2_url, seconds)
            count, unit = h.requests, "HTTP/2 request"
        elif path == "ws":
            r = wsload(
                "echo", target.ws_targets, [], seconds + 60, conns=WS_CONNS, duration=seconds
            )
            count, unit = 2 * int(r["round_trips"] or 0), "relayed message"
        else:
            r = wsload(
                "churn", target.ws_targets, [], seconds + 60, conns=CHURN_WORKERS, duration=seconds
            )
            count, unit = int(r["connections"] or 0), "WebSocket connection"
        target.stop()
        stats = pstats.Stats(str(prof))
        entries = stats.stats  # type: ignore[attr-defined]
        total = sum(e[2] for e in entries.values())
        rows = sorted(entries.items(), key=lambda kv: kv[1][2], reverse=True)
        rows = [kv for kv in rows if kv[1][2] >= 0.005 * total][:25]
        out += [
            f"## {path}: {count:,} {unit}s; total profiled self time {total / count * 1e6:.1f} "
            f"µs per {unit}",
            "",
            "cProfile inflates the times (~2-3x); the shares are what matter. uvloop's methods "
            "are C and invisible to it: `transport.write` (the send syscall) counts as self "
            "time of its caller, and the loop's own work (epoll, recv, callbacks) as "
            "`runners.py run`.",
            "",
            f"| function | calls per {unit} | self µs per {unit} | share |",
            "|---|---:|---:|---:|",
        ]
        for (file, line, func), (_cc, nc, tt, _ct, _callers) in rows:
            where = f"{Path(file).name}:{line} {func}" if line else func
            out.append(
                f"| `{where}` | {nc / count:.2f} | {tt / count * 1e6:.2f} | {tt / total:.1%} |"
            )
        out.append("")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- main
def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def running(procs: Procs) -> Iterator[None]:
    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        procs.stop_all()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--quick", action="store_true", help="one round of short phases: a smoke run (~1.5 min)"
    )
    p.add_argument("--rounds", type=int, help="rounds of each load phase (default 3, quick 1)")
    p.add_argument(
        "--only",
        default=",".join(TARGETS),
        help="comma-separated targets among direct,lbproxy,nginx,haproxy (default: all) and "
        "uvtunnel (the cheapest uvloop tunnel, WebSocket phases only), h2bare and "
        "h2bare-static (the h2 package answering by itself, HTTP/2 phase only)",
    )
    p.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated phases among {','.join(PHASES)} (default: all)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="markdown file for the table (default: bench/RESULTS.md for a full run of every "
        "target; a --quick or partial run only prints unless --out is given)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="a checkout of another lbproxy version with its own .venv: adds the target "
        "'baseline' (put it in --only), to measure a change before and after in one run",
    )
    p.add_argument("--tunnels", type=int, help="idle tunnels for the memory figure (5000)")
    p.add_argument("--capacity", type=int, help="tunnels that must open at once (9000)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead: run lbproxy under cProfile with HTTP load, WebSocket echo load and "
        "WebSocket churn, and print the top functions by self time per request/message",
    )
    args = p.parse_args(argv)
    if args.baseline:
        Baseline.tree = Path(args.baseline).resolve()
    only = [t.strip() for t in args.only.split(",") if t.strip()]
    phases = {x.strip() for x in args.phases.split(",") if x.strip()}
    bad = [t for t in only if t not in TARGET_CLASSES] + [x for x in phases if x not in PHASES]
    if bad:
        p.error(f"unknown target or phase: {', '.join(bad)}")
    s = QUICK if args.quick else FULL
    s = dataclasses.replace(
        s,
        rounds=args.rounds or s.rounds,
        tunnels=args.tunnels or s.tunnels,
        capacity=args.capacity or s.capacity,
    )
    out = args.out
    if out is None and not args.quick and not args.profile and set(only) == set(TARGETS):
        out = str(ROOT / "bench" / "RESULTS.md")
    if shutil.which("wrk") is None and phases & {"http", "http10"}:
        log("wrk is not installed: skipping the HTTP phases (apt-get install wrk)")
        phases -= {"http", "http10"}
    h2_note = ""
    if "h2" in phases and (shutil.which("h2load") is None or shutil.which("openssl") is None):
        h2_note = "HTTP/2 phase skipped: h2load or openssl missing (apt-get install nghttp2-client)"
        log(h2_note)
        phases.discard("h2")
    if "h2" not in phases and "h2ws" not in phases:
        for cls in TARGET_CLASSES.values():
            cls.serves_h2 = False  # no https listener (nor certificate) to start
            cls.serves_h2ws = False

    raise_nofile()
    pinning = Pinning.plan()
    pinning.apply_to_self()
    info = machine()
    log(f"pinning: {pinning.describe()}")
    procs = Procs()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lbproxy-bench-") as tmpdir, running(procs):
        tmp = Path(tmpdir)
        backends = Backends()
        backends.start(procs, tmp)
        log(f"backends: HTTP {backends.http_ports} ({backends.http_kind}), WS {backends.ws_ports}")
        if args.profile:
            # (--phases picks among them: ws100 is the echo load, churn the churn)
            wanted = {"http": "http", "ws": "ws100", "churn": "churn", "h2": "h2"}
            paths = tuple(x for x, phase in wanted.items() if phase in phases)
            print(profile(procs, backends, pinning, tmp, s, paths))
            return 0
        results = Results()
        if h2_note:
            results.notes.append(h2_note)
        skipped: dict[str, str] = {}
        targets: list[Target] = []
        for name in TARGET_CLASSES:
            if name not in only:
                continue
            target = TARGET_CLASSES[name](backends, procs, pinning, tmp)
            why = target.available()
            if why is None:
                log(f"{name}: starting")
                try:
                    target.start()
                except RuntimeError as exc:
                    why = f"did not start: {exc}"
                    target.stop()
            if why is not None:
                skipped[name] = why
                log(f"{name}: skipped: {why}")
                continue
            log(f"{name}: processes {target.pids() or '-'}")
            targets.append(target)
        run_phases(targets, s, phases, results)
        for target in targets:
            target.stop()
        cols = [t.name for t in targets]
        text = report(results, cols, skipped, info, pinning, backends, s, args.quick)
    print(text)
    log(f"done in {time.monotonic() - started:.0f}s")
    if out:
        Path(out).write_text(text)
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
