"""Proxy CPU per HTTP request with TLS to the backend (keep-alive), lbproxy against nginx
(``proxy_pass https://`` with ``proxy_ssl_verify``, ``proxy_ssl_session_reuse`` and upstream
keepalive), in the same run; the same two proxies with plain HTTP to the same backend for
reference. Issue 26's bench row.

    .venv/bin/python -m bench.backend_tls [--rounds 3] [--seconds 10] [--out FILE]

The backend is one nginx (``return 200 "ok"``) listening with TLS and without; certificates
are made with openssl (a self-signed CA-less leaf for ``backend.test`` and 127.0.0.1, trusted
as its own anchor). Load: wrk, 50 keep-alive connections, one thread. Figures: requests/s and
the proxy's CPU (utime + stime of its process tree, from /proc) per request, medians of the
rounds; targets take turns round by round so a shared machine's noise spreads over them.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import procfs
from bench.run import (
    LBPROXY,
    Procs,
    _nginx_cmd,
    _nginx_http_common,
    _nginx_main,
    free_ports,
    log,
    machine,
    wait_port,
    wrk,
)


def certificate(tmp: Path) -> tuple[str, str]:
    cert, key = str(tmp / "backend-cert.pem"), str(tmp / "backend-key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=backend.test",
         "-addext", "subjectAltName=DNS:backend.test,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


def backend(procs: Procs, tmp: Path, cert: str, key: str) -> tuple[int, int]:
    """One nginx answering ``ok``: (TLS port, plain port)."""
    tls_port, plain_port = free_ports(2)
    d = tmp / "backend"
    d.mkdir()
    conf = _nginx_main(d) + (
        "http {\n"
        + _nginx_http_common(d)
        + f"""    ssl_session_cache shared:SSL:1m;
    server {{
        listen 127.0.0.1:{tls_port} ssl backlog=4096;
        listen 127.0.0.1:{plain_port} backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{ default_type text/plain; return 200 "ok"; }}
    }}
}}
"""
    )
    (d / "nginx.conf").write_text(conf)
    proc = procs.start(_nginx_cmd(d), d / "stderr.log")
    wait_port(tls_port, proc, "backend nginx")
    return tls_port, plain_port


def lbproxy(procs: Procs, tmp: Path, port: int, upstream: int, ca: str | None) -> int:
    tls = f"    tls: {{ca: {ca}, server_name: backend.test}}\n" if ca else ""
    conf = f"""listeners:
  - name: http
    bind: 127.0.0.1:{port}
    server_group: g
    idle_timeout: 1h
server_groups:
  g:
    servers: [127.0.0.1:{upstream}]
    keepalive_connections: 64
    keepalive_timeout: 60s
    health_check: {{enabled: false}}
{tls}admin:
  bind: 127.0.0.1:0
access_log:
  enabled: false
"""
    path = tmp / f"lbproxy-{port}.yaml"
    path.write_text(conf)
    proc = procs.start(
        [*LBPROXY, "--config", str(path), "--log-level", "warning"], tmp / f"lbproxy-{port}.log"
    )
    wait_port(port, proc, "lbproxy")
    return proc.pid


def nginx(procs: Procs, tmp: Path, port: int, upstream: int, ca: str | None) -> int:
    d = tmp / f"nginx-{port}"
    d.mkdir()
    scheme = "https" if ca else "http"
    ssl = (
        f"""            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_name backend.test;
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
"""
        if ca
        else ""
    )
    conf = _nginx_main(d) + (
        "http {\n"
        + _nginx_http_common(d)
        + f"""    upstream b {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 60s;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass {scheme}://b;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
{ssl}        }}
    }}
}}
"""
    )
    (d / "nginx.conf").write_text(conf)
    proc = procs.start(_nginx_cmd(d), d / "stderr.log")
    wait_port(port, proc, "nginx")
    return proc.pid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    procs = Procs()
    rows: dict[str, list[tuple[float, float]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="lbproxy-bench-tls-") as name:
            tmp = Path(name)
            cert, key = certificate(tmp)
            tls_port, plain_port = backend(procs, tmp, cert, key)
            targets: dict[str, tuple[int, int]] = {}
            for label, start, ca, up in (
                ("lbproxy, TLS to backend", lbproxy, cert, tls_port),
                ("nginx proxy_ssl, TLS to backend", nginx, cert, tls_port),
                ("lbproxy, plain HTTP to backend", lbproxy, None, plain_port),
                ("nginx, plain HTTP to backend", nginx, None, plain_port),
            ):
                (port,) = free_ports(1)
                targets[label] = (port, start(procs, tmp, port, up, ca))
            for port, _ in targets.values():  # warm-up: pools and sessions filled
                wrk(f"http://127.0.0.1:{port}/", 2)
            for r in range(args.rounds):
                for label, (port, pid) in targets.items():
                    pids = procfs.tree(pid)
                    before = procfs.cpu_seconds(pids)
                    res = wrk(f"http://127.0.0.1:{port}/", args.seconds)
                    cpu = procfs.cpu_seconds(pids) - before
                    if res.errors:
                        log(f"{label}: {res.errors}")
                    rows.setdefault(label, []).append((res.rps, cpu / max(res.requests, 1)))
                    log(f"round {r + 1} {label}: {res.rps:.0f} req/s")
    finally:
        procs.stop_all()
    m = machine()
    lines = [
        "# Proxy CPU per request with TLS to the backend (issue 26)",
        "",
        f"`python -m bench.backend_tls --rounds {args.rounds} --seconds {args.seconds}`, "
        f"{m['date']}; {m['cpu']}; {m['python']}; {m['lbproxy']}; {m['nginx']}. wrk: 50 "
        "keep-alive connections; one nginx backend (`return 200`); medians of the rounds. "
        "Not pinned: the machine's other load shows in every row alike.",
        "",
        "| target | requests/s | proxy CPU per request (us) |",
        "|---|---:|---:|",
    ]
    for label, vals in rows.items():
        rps = statistics.median(v[0] for v in vals)
        cpu = statistics.median(v[1] for v in vals) * 1e6
        lines.append(f"| {label} | {rps:.0f} | {cpu:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
