"""Test tools for the hardening tests (issue 9): a backend that records every byte it is sent,
self-signed certificates made with the ``openssl`` CLI, and small raw-socket helpers.

``RecordingBackend`` is a raw TCP server, not an HTTP library: it keeps the exact bytes the
proxy forwarded, so a test can assert that a refused request reached it not at all. It reads
what it receives with lbproxy's own strict parser and answers every request with ``200 ok``
(keep-alive); anything it cannot frame is recorded in ``errors``, which is how the fuzz test
checks that nothing the proxy forwards can be framed two ways.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from typing import Any

from lbproxy.wire.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    ChunkedTracker,
    Limits,
    ParseError,
    RequestHead,
    parse_request_head,
    request_body_kind,
)
from tests.support import RawResponse, at_eof, read_response

BACKEND_LIMITS = Limits(1 << 20, 1 << 20, 10000)  # the proxy's limits are the ones under test


class _Recorder(asyncio.Protocol):
    def __init__(self, owner: RecordingBackend) -> None:
        self.owner = owner
        self.buf = bytearray()
        self.head: RequestHead | None = None
        self.remaining = 0
        self.tracker: ChunkedTracker | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.owner.connections += 1
        self.owner.open.add(transport)  # type: ignore[arg-type]

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.open.discard(self.transport)  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.owner.received += data
        self.owner.chunks.append(data)
        self.buf += data
        try:
            self._process()
        except ParseError as exc:
            self.owner.errors.append(f"{exc} after {bytes(self.owner.received[-300:])!r}")
            assert self.transport is not None
            self.transport.abort()

    def _process(self) -> None:
        while True:
            if self.head is None:
                head = parse_request_head(self.buf, BACKEND_LIMITS)
                if head is None:
                    return
                del self.buf[: head.raw_len]
                self.head = head
                self.owner.requests.append(head)
                kind = request_body_kind(head)
                self.remaining = (head.content_length or 0) if kind == BODY_LENGTH else 0
                self.tracker = ChunkedTracker() if kind == BODY_CHUNKED else None
            if self.tracker is not None:
                used = self.tracker.feed(self.buf)
                del self.buf[:used]
                if not self.tracker.done:
                    return
            else:
                n = min(self.remaining, len(self.buf))
                del self.buf[:n]
                self.remaining -= n
                if self.remaining:
                    return
            self._answer(self.head)
            self.head = None

    def _answer(self, head: RequestHead) -> None:
        assert self.transport is not None
        if self.owner.silent:
            return
        # HEAD gets Content-Length 0 rather than the 2 a GET would: then a client can frame
        # every answer without knowing which request it answers.
        body = b"" if head.method == b"HEAD" else b"ok"
        self.owner.answered += 1
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class RecordingBackend:
    """Records every byte received (``received``, ``chunks``) and every request parsed
    (``requests``); answers each with 200 ``ok`` unless ``silent``."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.received = bytearray()
        self.chunks: list[bytes] = []
        self.requests: list[RequestHead] = []
        self.errors: list[str] = []
        self.answered = 0
        self.connections = 0
        self.open: set[asyncio.Transport] = set()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> RecordingBackend:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Recorder(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self.open):
                t.abort()
            self.server = None

    async def __aenter__(self) -> RecordingBackend:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def no_checks(servers: list[str], **group: Any) -> dict[str, Any]:
    """A group of ``servers`` without health checks (a raw backend answers no /health)."""
    return {"servers": servers, "health_check": {"enabled": False}, **group}


def raw_config(
    servers: list[str], listener: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    """A config with listener ``web`` on 127.0.0.1:0 in front of group ``rs1`` (unchecked)."""
    lst = {"name": "web", "bind": "127.0.0.1:0", "server_group": "rs1", **(listener or {})}
    doc: dict[str, Any] = {
        "listeners": [lst],
        "server_groups": {"rs1": no_checks(servers)},
        "admin": {"bind": "127.0.0.1:0"},
        "access_log": {"enabled": False},
    }
    doc.update(top)
    return doc


async def exchange(
    host: str, port: int, data: bytes, timeout: float = 5.0
) -> tuple[RawResponse | None, bytes]:
    """Send ``data``, read until the peer closes: the first response (None if nothing came)
    and every byte received. A reset counts as a close."""
    reader, writer = await asyncio.open_connection(host, port)
    out = bytearray()
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        writer.close()
    if not out:
        return None, b""
    r = asyncio.StreamReader()
    r.feed_data(bytes(out))
    r.feed_eof()
    return await read_response(r), bytes(out)


async def closed_without_answer(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True when the peer closes (or resets) without sending a byte."""
    try:
        return await at_eof(reader, timeout)
    except ConnectionResetError:
        return True


def openssl_available() -> str:
    path = shutil.which("openssl")
    assert path, "the openssl CLI is needed to make test certificates (apt: openssl)"
    return path


def make_cert(directory: str, name: str, cn: str = "localhost", days: int = 2) -> tuple[str, str]:
    """A self-signed certificate for ``cn`` (and 127.0.0.1, ::1) and its key, as PEM files
    ``<name>-cert.pem`` and ``<name>-key.pem`` in ``directory``."""
    cert = os.path.join(directory, f"{name}-cert.pem")
    key = os.path.join(directory, f"{name}-key.pem")
    subprocess.run(
        [
            openssl_available(),
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            key,
            "-out",
            cert,
            "-days",
            str(days),
            "-subj",
            f"/CN={cn}",
            "-addext",
            f"subjectAltName=DNS:{cn},IP:127.0.0.1,IP:::1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def metric(registry: Any, name: str, **labels: str) -> float | None:
    """The value of sample ``name`` with exactly ``labels`` in the registry's exposition (what
    /metrics shows), or None when there is no such sample."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from lbproxy.control.metric_families import Collector

    prom = CollectorRegistry(auto_describe=False)
    prom.register(Collector(registry))
    for fam in text_string_to_metric_families(generate_latest(prom).decode()):
        for s in fam.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return None


# ------------------------------------------------------------------ slowloris, out of process
# The attacker runs in a process of its own so that its thousands of sends per second do not
# share the event loop of the proxy and of the well-behaved client measured meanwhile.

SLOWLORIS_HEAD = b"GET / HTTP/1.1\r\nHost: slow.example\r\nX-Padding: " + b"p" * 200


def slowloris_main(argv: list[str] | None = None) -> None:
    """``python -c 'from tests.hardening import slowloris_main; slowloris_main()' HOST PORT N
    PERIOD DEADLINE``: open N connections and send each one byte of a never-ending request
    head every PERIOD seconds until the server closes it or DEADLINE seconds have passed.
    Prints one JSON line: how many got a 408, another answer, a close with no answer, or
    were still open at the deadline."""
    import json
    import selectors
    import sys
    import time

    args = argv if argv is not None else sys.argv[1:]
    host, port, n, period, deadline = (
        args[0],
        int(args[1]),
        int(args[2]),
        float(args[3]),
        float(args[4]),
    )
    sel = selectors.DefaultSelector()
    conns: dict[int, tuple[socket.socket, list[int], bytearray]] = {}
    stats = {"status_408": 0, "other_answer": 0, "closed_silently": 0, "open_at_deadline": 0}
    opened = 0
    started = time.monotonic()
    next_tick = started
    print(json.dumps({"ready": True}), flush=True)
    while time.monotonic() - started < deadline:
        while opened < n and len(conns) < n:  # open every connection at once, then trickle
            s = socket.create_connection((host, port))
            s.setblocking(False)
            conns[s.fileno()] = (s, [0], bytearray())
            sel.register(s, selectors.EVENT_READ)
            opened += 1
        if not conns:
            break
        now = time.monotonic()
        if now >= next_tick:
            for s, sent, _ in conns.values():
                i = sent[0] % len(SLOWLORIS_HEAD)
                try:
                    s.send(SLOWLORIS_HEAD[i : i + 1])
                    sent[0] += 1
                except OSError:
                    pass  # reset: found by the reader below
            next_tick += period
        for key, _ in sel.select(timeout=max(0.0, min(next_tick - time.monotonic(), 0.05))):
            s, _, got = conns[key.fd]
            try:
                data = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                got += data
                continue
            if got.startswith(b"HTTP/1.1 408 "):
                stats["status_408"] += 1
            elif got:
                stats["other_answer"] += 1
            else:
                stats["closed_silently"] += 1
            sel.unregister(s)
            s.close()
            del conns[key.fd]
    stats["open_at_deadline"] = len(conns)
    stats["seconds"] = round(time.monotonic() - started, 3)  # type: ignore[assignment]
    print(json.dumps(stats), flush=True)
