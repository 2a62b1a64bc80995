"""The access log end to end: lines written by a real proxy, read back and parsed.

One line per HTTP request and one per WebSocket tunnel at its close, in JSON or text
(``key=value``). Writing happens on a thread, never on the event loop: a log destination
that stops draining (a FIFO nobody reads) must not delay requests, nor a reload that moves
the log elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from lbproxy.config import parse_config
from lbproxy.control.loading import load_config
from tests.support import (
    RawServer,
    config_doc,
    proxy_url,
    raw_request,
    read_request_head,
    wait_for,
)

NO_CHECKS = {"health_check": {"enabled": False}}
HTTP_FIELDS = {
    "time",
    "type",
    "client",
    "listener",
    "method",
    "path",
    "protocol",
    "status",
    "server",
    "upstream_time",
    "total_time",
    "bytes_in",
    "bytes_out",
}
TUNNEL_FIELDS = (HTTP_FIELDS - {"upstream_time"}) | {
    "duration",
    "close_reason",
    "messages_in",
    "messages_out",
    "close_code",
}


def log_doc(servers: list[str], path: Path | str, fmt: str = "json", **kw: Any) -> dict[str, Any]:
    doc = config_doc(servers, group=NO_CHECKS, **kw)
    doc["access_log"] = {"enabled": True, "format": fmt, "path": str(path)}
    return doc


def read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


async def wait_lines(path: Path, n: int) -> list[str]:
    await wait_for(lambda: len(read_lines(path)) >= n, what=f"{n} lines in {path.name}")
    lines = read_lines(path)
    assert len(lines) == n, lines
    return lines


_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)(?: |$)')


def parse_text(line: str) -> dict[str, str]:
    """``key=value key="quoted value"`` -> dict; quoted values are JSON strings."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(line):
        m = _PAIR.match(line, pos)
        assert m, f"unparsable at {pos}: {line!r}"
        key, value = m.group(1), m.group(2)
        out[key] = json.loads(value) if value.startswith('"') else value
        pos = m.end()
    return out


def parse_time(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


async def test_json_lines_for_requests_and_a_tunnel(tmp_path, make_backend, make_proxy):
    a = await make_backend("A")
    log = tmp_path / "access.log"
    t0 = time.time()
    proxy = await make_proxy(log_doc([a.address], log))
    addr = proxy.listeners.address("web")
    body = b"0123456789" * 10
    request = (
        b"POST /upload?x=1 HTTP/1.1\r\nHost: lb.test\r\nContent-Length: 100\r\n"
        b"Connection: close\r\n\r\n" + body
    )
    response = await raw_request(addr.host, addr.port, request)
    assert response.startswith(b"HTTP/1.1 200")
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get(proxy_url(proxy, path="/status/404")) as r:
            assert r.status == 404
        async with s.ws_connect(proxy_url(proxy, path="/ws?room=1")) as ws:
            for _ in range(3):
                await ws.send_str("x" * 100)
                assert await ws.receive_str() == "x" * 100
    lines = [json.loads(x) for x in await wait_lines(log, 3)]
    t1 = time.time()
    # A WebSocket is one line, written when its tunnel closes (not one for the 101 too).
    post, notfound, tunnel = lines

    for line in (post, notfound):
        assert set(line) == HTTP_FIELDS
        assert line["type"] == "http"
    assert set(tunnel) == TUNNEL_FIELDS
    for line in lines:
        assert t0 - 1 <= parse_time(line["time"]) <= t1 + 1
        assert re.fullmatch(r"127\.0\.0\.1:\d+", line["client"])
        assert line["listener"] == "web"
        assert line["protocol"] == "HTTP/1.1"
        assert line["server"] == a.address
        assert 0 <= line["total_time"] < 5
    assert {k: post[k] for k in ("method", "path", "status")} == {
        "method": "POST",
        "path": "/upload?x=1",
        "status": 200,
    }
    # Exact bytes of the raw exchange: the whole request, the whole response.
    assert post["bytes_in"] == len(request)
    assert post["bytes_out"] == len(response)
    assert 0 <= post["upstream_time"] <= post["total_time"]
    assert (notfound["method"], notfound["path"], notfound["status"]) == ("GET", "/status/404", 404)
    assert notfound["bytes_out"] > 0 and notfound["bytes_in"] > 0
    assert (tunnel["type"], tunnel["method"], tunnel["path"]) == ("websocket", "GET", "/ws?room=1")
    assert tunnel["status"] == 101
    assert tunnel["close_reason"] == "client"
    # aiohttp's client closes with 1000; three messages each way (close frames not counted).
    assert (tunnel["messages_in"], tunnel["messages_out"], tunnel["close_code"]) == (3, 3, "1000")
    assert 0 <= tunnel["duration"] < 5 and tunnel["duration"] == tunnel["total_time"]
    # Three 100-byte messages each way plus the close frames: framing adds a few bytes each.
    assert 300 < tunnel["bytes_in"] < 360
    assert 300 < tunnel["bytes_out"] < 360


async def test_text_lines_are_key_value(tmp_path, make_backend, make_proxy):
    a = await make_backend("A")
    log = tmp_path / "access.log"
    doc = log_doc([a.address], log, fmt="text")
    doc["listeners"].append(
        {"name": "none", "bind": "127.0.0.1:0", "server_group": "empty", "idle_timeout": "300ms"}
    )
    doc["server_groups"]["empty"] = {"servers": [], **NO_CHECKS}
    proxy = await make_proxy(doc)
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy_url(proxy, path="/whoami?name=a%20b")) as r:
            assert await r.text() == "A"
        async with s.get(proxy_url(proxy, "none", "/x")) as r:
            assert r.status == 503
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
        await ws.send_str("close:1000")
        assert (await ws.receive()).type == aiohttp.WSMsgType.CLOSE
        await ws.close()
    lines = await wait_lines(log, 3)
    assert not any(line.startswith("{") for line in lines)
    get, unavailable, tunnel = (parse_text(x) for x in lines)
    assert set(get) == HTTP_FIELDS and set(tunnel) == TUNNEL_FIELDS
    assert get["type"] == "http" and get["method"] == "GET"
    assert get["path"] == "/whoami?name=a%20b"
    assert (get["status"], get["server"], get["listener"]) == ("200", a.address, "web")
    assert float(get["upstream_time"]) <= float(get["total_time"])
    assert int(get["bytes_in"]) > 0 and int(get["bytes_out"]) > 0
    parse_time(get["time"])
    # Nothing to send it to: no server, no upstream time.
    assert (unavailable["status"], unavailable["listener"]) == ("503", "none")
    assert unavailable["server"] == "-" and unavailable["upstream_time"] == "-"
    assert tunnel["type"] == "websocket" and tunnel["status"] == "101"
    assert tunnel["close_reason"] == "server"
    assert float(tunnel["duration"]) >= 0


async def test_writes_happen_off_the_event_loop_thread(
    tmp_path, make_backend, make_proxy, monkeypatch
):
    import logging

    writers: list[int] = []
    original = logging.FileHandler.emit

    def emit(self: logging.FileHandler, record: logging.LogRecord) -> None:
        writers.append(threading.get_ident())
        original(self, record)

    monkeypatch.setattr(logging.FileHandler, "emit", emit)
    a = await make_backend("A")
    log = tmp_path / "access.log"
    proxy = await make_proxy(log_doc([a.address], log))
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.get(proxy_url(proxy, path="/whoami")) as r:
                assert r.status == 200
    await wait_lines(log, 5)
    assert len(writers) == 5
    assert threading.get_ident() not in writers  # the loop runs in this thread


class StuckFifo:
    """A FIFO with a reader that holds it open but reads nothing until ``drain`` (a small pipe
    buffer, so a few dozen lines fill it and the log writer blocks)."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, 1031, 4096)  # F_SETPIPE_SZ
        self.data = bytearray()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def queued(self) -> int:
        import termios

        buf = bytearray(4)
        fcntl.ioctl(self.fd, termios.FIONREAD, buf)
        return int.from_bytes(buf, "little")

    def drain(self) -> None:
        """Start reading everything (in a thread) until the writer closes or ``close``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._read, daemon=True)
            self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                time.sleep(0.005)
                continue
            if not chunk:
                return  # the writer closed its end
            self.data += chunk

    def close(self) -> None:
        """Stop reading (after taking what the pipe still holds) and close the FIFO."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 65536):
                self.data += chunk
        os.close(self.fd)


@pytest.mark.timeout(60)
async def test_a_log_that_stops_draining_never_delays_requests_or_reloads(
    tmp_path, make_backend, make_proxy
):
    a = await make_backend("A")
    fifo = StuckFifo(tmp_path / "fifo")
    # If the loop ever blocks on the log, the drain releases it after a while, and the
    # timings below fail the test instead of hanging it: a blocked request would wait for the
    # watchdog, far longer than the bounds below (hang guards: a loaded machine makes a
    # request slow, but not 20 s slow).
    watchdog = threading.Timer(20.0, fifo.drain)
    watchdog.start()
    config_path = tmp_path / "lbproxy.yaml"
    config_path.write_text(yaml.safe_dump(log_doc([a.address], fifo.path)))
    try:
        proxy = await make_proxy(load_config(str(config_path)), str(config_path))
        async with aiohttp.ClientSession() as s:

            async def timed_get() -> float:
                t = time.monotonic()
                async with s.get(proxy_url(proxy, path="/whoami")) as r:
                    assert await r.text() == "A"
                return time.monotonic() - t

            for _ in range(100):
                await timed_get()
            # The pipe is full and lines are waiting: the writer thread is stuck...
            await wait_for(lambda: fifo.queued() > 4096 - 512, what="the pipe to fill")
            assert proxy.access._queue.qsize() > 0
            # ...and requests are as fast as ever.
            latencies = [await timed_get() for _ in range(20)]
            assert max(latencies) < 5.0, latencies

            # Moving the log away from the stuck FIFO does not wait for it either.
            moved = tmp_path / "moved.log"
            config_path.write_text(yaml.safe_dump(log_doc([a.address], moved)))
            t = time.monotonic()
            result = await proxy.reload("test")
            reload_time = time.monotonic() - t
            assert result.ok and result.changed
            assert reload_time < 5.0
            assert await timed_get() < 5.0
            await wait_for(lambda: len(read_lines(moved)) >= 1, what="a line in the new log")
        assert not watchdog.finished.is_set() or reload_time < 5.0
    finally:
        watchdog.cancel()
        fifo.drain()  # let the stuck writer finish so the proxy can close
        if "proxy" in locals():
            await proxy.close(timeout=0.5)
        fifo.close()
    # Nothing was lost: every line queued for the FIFO got there in the end.
    fifo_lines = bytes(fifo.data).decode().splitlines()
    assert len(fifo_lines) == 120 and all(json.loads(x)["status"] == 200 for x in fifo_lines)


async def test_reload_moves_the_log_and_open_tunnels_follow(tmp_path, make_backend, make_proxy):
    a = await make_backend("A")
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    proxy = await make_proxy(log_doc([a.address], first))
    async with aiohttp.ClientSession() as s:
        async with s.get(proxy_url(proxy, path="/whoami")) as r:
            assert r.status == 200
        ws = await s.ws_connect(proxy_url(proxy, path="/ws"))
        await wait_lines(first, 1)  # the GET; the tunnel logs only when it closes

        result = await proxy.apply_config(parse_config(log_doc([a.address], second)), "test")
        assert result.ok and result.changed
        async with s.get(proxy_url(proxy, path="/status/201")) as r:
            assert r.status == 201
        await ws.close()  # a tunnel opened before the reload logs its close to the new file
    new = [json.loads(x) for x in await wait_lines(second, 2)]
    assert [(x["type"], x["status"]) for x in new] == [("http", 201), ("websocket", 101)]
    old = [json.loads(x) for x in read_lines(first)]
    assert [(x["type"], x["status"]) for x in old] == [("http", 200)]


async def test_disabled_log_writes_nothing(tmp_path, make_backend, make_proxy):
    a = await make_backend("A")
    log = tmp_path / "access.log"
    doc = log_doc([a.address], log)
    doc["access_log"]["enabled"] = False
    proxy = await make_proxy(doc)
    async with aiohttp.ClientSession() as s, s.get(proxy_url(proxy, path="/whoami")) as r:
        assert r.status == 200
    # Enabling it by reload starts logging from the next request.
    result = await proxy.apply_config(parse_config(log_doc([a.address], log)), "test")
    assert result.ok
    async with aiohttp.ClientSession() as s, s.get(proxy_url(proxy, path="/status/202")) as r:
        assert r.status == 202
    lines = [json.loads(x) for x in await wait_lines(log, 1)]
    assert lines[0]["status"] == 202


async def test_unwritable_path_on_reload_keeps_the_old_log(tmp_path, make_backend, make_proxy):
    a = await make_backend("A")
    log = tmp_path / "access.log"
    proxy = await make_proxy(log_doc([a.address], log))
    bad = tmp_path / "no-such-dir" / "access.log"
    await proxy.apply_config(parse_config(log_doc([a.address], bad)), "test")
    async with aiohttp.ClientSession() as s, s.get(proxy_url(proxy, path="/whoami")) as r:
        assert r.status == 200
    lines = [json.loads(x) for x in await wait_lines(log, 1)]
    assert lines[0]["status"] == 200


@pytest.mark.timeout(30)
async def test_a_stuck_log_does_not_hold_up_shutdown(tmp_path, make_backend, monkeypatch):
    from lbproxy.proxy import access_log
    from tests.support import start_proxy

    monkeypatch.setattr(access_log, "ACCESS_LOG_DRAIN_TIMEOUT", 0.5)
    a = await make_backend("A")
    fifo = StuckFifo(tmp_path / "fifo")
    proxy = await start_proxy(log_doc([a.address], fifo.path))
    assert proxy.access._listener is not None
    writer = proxy.access._listener._thread
    assert writer is not None
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(100):
                async with s.get(proxy_url(proxy, path="/whoami")) as r:
                    assert r.status == 200
        await wait_for(lambda: fifo.queued() > 4096 - 512, what="the pipe to fill")
        t = time.monotonic()
        await proxy.close(timeout=0.1)
        assert time.monotonic() - t < 0.5 + 10  # the drain timeout, not forever (a hang guard)
    finally:
        fifo.drain()
        # The abandoned writer finishes once the FIFO is read again; then it can close.
        await wait_for(lambda: not writer.is_alive(), what="the writer to finish")
        fifo.close()


@pytest.mark.parametrize("cut_by", ["idle_timeout", "backend_close"])
async def test_a_response_cut_after_it_started_is_counted_and_logged(tmp_path, make_proxy, cut_by):
    """However a started response is cut (the listener's idle timeout while the backend
    stalls mid-body, or the backend closing mid-body), it is one request in
    lbproxy_requests_total and one access log line, with the status that started."""

    async def backend(reader: Any, writer: Any) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await writer.drain()
        if cut_by == "idle_timeout":
            await reader.read()  # stall until the proxy gives up and closes
        else:
            writer.transport.abort()

    log = tmp_path / "access.log"
    async with RawServer(backend) as srv:
        proxy = await make_proxy(log_doc([srv.address], log, listener={"idle_timeout": "300ms"}))
        addr = proxy.listeners.address("web")
        got = await raw_request(addr.host, addr.port, b"GET /cut HTTP/1.1\r\nHost: x\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200") and len(got.partition(b"\r\n\r\n")[2]) == 10
        [line] = [json.loads(x) for x in await wait_lines(log, 1)]
    assert (line["path"], line["status"], line["server"]) == ("/cut", 200, srv.address)
    requests = proxy.registry.listeners["web"].requests
    assert requests == {("rs1", srv.address, "200"): 1}
