"""What gzip costs and saves (issue 16): bytes saved on the chat page's own assets, and the
proxy CPU per KiB compressed.

One lbproxy process (1 worker, access log off) with two listeners in front of the same
backend, one with ``gzip: true`` and one without; the backend is the chat app itself
(``backends.chat``, memory bus). Then:

- every asset of the chat page (``/``, ``/static/chat.css``, ``/static/chat.js``) is fetched
  through both listeners with ``Accept-Encoding: gzip``: bytes on the wire, saved;
- wrk fetches a text body of ``--size`` bytes through each listener (``Accept-Encoding: gzip``)
  while the proxy's CPU (utime + stime from /proc) is read: the difference per request,
  divided by the KiB compressed, is the cost of compressing one KiB.

    .venv/bin/python -m bench.gzip_cost            # prints a markdown table

Needs wrk (Debian's package) for the CPU figure; without it only the bytes are shown.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

from bench import procfs
from bench.run import free_ports, wait_port, wrk

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ("/", "/static/chat.css", "/static/chat.js")


# A backend answering ``GET /text`` with SIZE bytes of HTML-like text (compressible as a page
# is: repeated markup with varying words).
TEXT_SERVER = """
import sys
from aiohttp import web
port, size = int(sys.argv[1]), int(sys.argv[2])
words = [b"<li class=msg>", b"hello", b"world", b"lbproxy", b"chat", b"</li>", b"\\n"]
body = bytearray()
i = 0
while len(body) < size:
    body += words[i % len(words)] + str(i).encode() + b" "
    i += 1
body = bytes(body[:size])
async def text(request):
    return web.Response(body=body, content_type="text/html")
app = web.Application()
app.router.add_get("/text", text)
web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
"""


def config(port_gzip: int, port_plain: int, chat: int, text: int) -> str:
    rules = "    rules: [{path: /text, server_group: text}]\n"
    return f"""listeners:
  - name: gzip
    bind: 127.0.0.1:{port_gzip}
    server_group: chat
    gzip: true
{rules}  - name: plain
    bind: 127.0.0.1:{port_plain}
    server_group: chat
{rules}server_groups:
  chat:
    servers: [127.0.0.1:{chat}]
    health_check: {{enabled: false}}
  text:
    servers: [127.0.0.1:{text}]
    keepalive_connections: 64
    health_check: {{enabled: false}}
admin: {{bind: "127.0.0.1:0"}}
access_log: {{enabled: false}}
"""


async def asset_sizes(port_gzip: int, port_plain: int) -> list[tuple[str, int, int]]:
    out = []
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        for path in ASSETS:
            sizes = []
            for port in (port_plain, port_gzip):
                async with s.get(
                    f"http://127.0.0.1:{port}{path}", headers={"Accept-Encoding": "gzip"}
                ) as r:
                    body = await r.read()
                    if r.headers.get("Content-Encoding") == "gzip":
                        assert len(gzip.decompress(body)) == sizes[0]
                    sizes.append(len(body))
            out.append((path, sizes[0], sizes[1]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--size", type=int, default=32768, help="text body size for the CPU figure")
    p.add_argument("--seconds", type=float, default=5.0, help="wrk run per listener")
    args = p.parse_args(argv)
    port_gzip, port_plain, backend, text = free_ports(4)
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="lbproxy-gzip-") as tmp:
        cfg = Path(tmp) / "lb.yaml"
        cfg.write_text(config(port_gzip, port_plain, backend, text))
        try:
            chat = subprocess.Popen(
                [sys.executable, "-m", "backends.chat", "--port", str(backend)],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(chat)
            wait_port(backend, chat, "chat backend")
            texts = subprocess.Popen(
                [sys.executable, "-c", TEXT_SERVER, str(text), str(args.size)], cwd=ROOT
            )
            procs.append(texts)
            wait_port(text, texts, "text backend")
            proxy = subprocess.Popen(
                [sys.executable, "-m", "lbproxy", "--config", str(cfg), "--log-level", "warning"],
                cwd=ROOT,
            )
            procs.append(proxy)
            wait_port(port_plain, proxy, "lbproxy")
            rows = asyncio.run(asset_sizes(port_gzip, port_plain))
            print("| chat asset | bytes | gzip bytes | saved |")
            print("|---|---:|---:|---:|")
            total = [0, 0]
            for path, plain, packed in rows:
                total[0] += plain
                total[1] += packed
                print(f"| `{path}` | {plain:,} | {packed:,} | {1 - packed / plain:.0%} |")
            print(f"| all | {total[0]:,} | {total[1]:,} | {1 - total[1] / total[0]:.0%} |")
            if shutil.which("wrk") is None:
                print("\nwrk is not installed: no CPU figure")
                return 0
            body = "/text"
            cpu = {}
            for name, port in (("plain", port_plain), ("gzip", port_gzip)):
                url = f"http://127.0.0.1:{port}{body}"
                wrk(url, 1.0)  # warm-up
                pids = procfs.tree(proxy.pid)
                c0 = procfs.cpu_seconds(pids)
                w = wrk_gzip(url, args.seconds)
                c1 = procfs.cpu_seconds(pids)
                cpu[name] = (c1 - c0) / w * 1e6
            per_kib = (cpu["gzip"] - cpu["plain"]) / (args.size / 1024)
            print(
                f"\nproxy CPU per request of {args.size // 1024} KiB text: "
                f"{cpu['plain']:.1f} us plain, {cpu['gzip']:.1f} us gzip: "
                f"{per_kib:.2f} us per KiB compressed (gzip level 1)"
            )
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(10)
    return 0


def wrk_gzip(url: str, seconds: float) -> int:
    """Requests done by wrk in ``seconds`` asking for gzip (2 connections, 1 thread)."""
    d = max(1, round(seconds))
    cmd = ["wrk", "-t1", "-c2", f"-d{d}s", "-H", "Accept-Encoding: gzip", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=d + 30).stdout
    for line in out.splitlines():
        if "requests in" in line:
            return int(line.split()[0])
    raise RuntimeError(f"cannot read wrk's output:\n{out}")


if __name__ == "__main__":
    sys.exit(main())
