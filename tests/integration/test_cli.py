"""The command line as an operator uses it: ``--check``, a real run, and the signals.

Every test runs lbproxy as a subprocess (``python -m lbproxy`` or the ``lbproxy`` console
script of the virtualenv) and looks only at its exit code, its stderr and its sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support import expected_build, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "lbproxy")

MODULE = [PYTHON, "-m", "lbproxy"]
COMMANDS = pytest.mark.parametrize(
    "command", [MODULE, [CONSOLE_SCRIPT]], ids=["python-m", "console-script"]
)

VALID = """\
listeners:
  - name: web
    bind: 127.0.0.1:5000
    server_group: rs1
server_groups:
  rs1:
    servers:
      - 127.0.0.1:5001
      - address: 127.0.0.1:5002
        weight: 50
"""

# Every key a listener takes, as the unknown-key message lists them.
LISTENER_KEYS = (
    "name, bind, protocol, server_group, idle_timeout, request_timeout, connect_timeout, "
    "x_forwarded_for, rules, client_header_timeout, max_request_line, max_header_size, "
    "max_header_count, max_connections, tls, redirect_https, acl, proxy_protocol, http2, "
    "http2_websocket, websocket, "
    "x_forwarded_proto, x_forwarded_port, x_forwarded_client_srcport, slb_ip, slb_id, "
    "trusted_proxies, limits, bandwidth, gzip, gzip_types, gzip_min_length"
)


def run(command: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*command, *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False
    )


def check(command: list[str], path: Path | str) -> subprocess.CompletedProcess[str]:
    return run(command, "--config", str(path), "--check")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "lb.yaml"
    p.write_text(text)
    return p


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr


# ------------------------------------------------------------------------------------ --check


@COMMANDS
def test_check_valid_file(command, tmp_path):
    path = write(tmp_path, VALID)
    r = check(command, path)
    assert r.returncode == 0
    assert r.stdout == ""
    assert r.stderr == f"lbproxy: {path}: configuration is valid\n"


@COMMANDS
def test_check_prints_every_problem_one_per_line(command, tmp_path):
    text = (
        VALID.replace("      - 127.0.0.1:5001\n", "      - 127.0.0.1:5001\n      - 127.0.0.1\n")
        .replace("weight: 50", "weight: 500")
        .replace("server_group: rs1", "server_group: rs1\n    idle_timout: 30s")
        + "shutdown_timeout: 5 parsecs\n"
    )
    r = check(command, write(tmp_path, text))
    assert r.returncode == 2
    assert r.stdout == ""
    path = tmp_path / "lb.yaml"
    assert r.stderr.splitlines() == [
        f"lbproxy: {path}:5: listeners[0].idle_timout: unknown key (did you mean"
        " 'idle_timeout'? allowed: " + LISTENER_KEYS + ")",
        f"lbproxy: {path}:10: server_groups.rs1.servers[1].address: expected host:port,"
        " got '127.0.0.1'",
        f"lbproxy: {path}:12: server_groups.rs1.servers[2].weight: expected an integer 0..100,"
        " got 500",
        f"lbproxy: {path}:13: shutdown_timeout: expected a duration like 60s, 500ms or 2m,"
        " got '5 parsecs'",
    ]
    assert_no_traceback(r)


@COMMANDS
def test_check_missing_file(command, tmp_path):
    path = tmp_path / "nope.yaml"
    r = check(command, path)
    assert r.returncode == 2
    assert r.stderr == f"lbproxy: {path}: config file not found\n"
    assert_no_traceback(r)


@COMMANDS
def test_check_yaml_syntax_error_names_file_line_column(command, tmp_path):
    path = write(
        tmp_path, VALID.replace("    bind: 127.0.0.1:5000\n", "    bind: [127.0.0.1:5000\n")
    )
    r = check(command, path)
    assert r.returncode == 2
    assert (
        r.stderr == f"lbproxy: {path}:4:17: YAML syntax error: expected ',' or ']', but got ':'\n"
    )
    assert_no_traceback(r)


@COMMANDS
def test_check_bad_value_is_one_clear_line(command, tmp_path):
    r = check(command, write(tmp_path, VALID.replace("127.0.0.1:5000", "0.0.0.0")))
    assert r.returncode == 2
    path = tmp_path / "lb.yaml"
    assert r.stderr == f"lbproxy: {path}:3: listeners[0].bind: expected host:port, got '0.0.0.0'\n"
    assert_no_traceback(r)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "lbproxy: {path}: the config file is empty\n"),
        ("- a\n- b\n", "lbproxy: {path}:1: expected a mapping, got a list\n"),
    ],
)
def test_check_empty_or_non_mapping_file(text, expected, tmp_path):
    path = write(tmp_path, text)
    r = check(MODULE, path)
    assert (r.returncode, r.stderr) == (2, expected.format(path=path))


def test_check_duplicate_key_is_refused(tmp_path):
    path = write(tmp_path, VALID + "server_groups:\n  rs2:\n    servers: []\n")
    r = check(MODULE, path)
    assert r.returncode == 2
    assert r.stderr == (
        f"lbproxy: {path}:11:1: YAML syntax error: "
        "duplicate key 'server_groups' (first on line 5)\n"
    )


def test_check_a_directory_is_one_line(tmp_path):
    r = check(MODULE, tmp_path)
    assert r.returncode == 2
    assert r.stderr == f"lbproxy: {tmp_path}: cannot read config file: Is a directory\n"


@COMMANDS
@pytest.mark.parametrize("name", ["lb.yaml", "full.yaml"])
def test_shipped_configs_pass_check(command, name):
    r = check(command, REPO / "config" / name)
    assert r.returncode == 0, r.stderr
    assert r.stderr == f"lbproxy: {REPO / 'config' / name}: configuration is valid\n"


def test_usage_errors():
    r = run(MODULE)
    assert r.returncode == 2
    assert "--config" in r.stderr
    assert_no_traceback(r)


@COMMANDS
def test_version_says_which_build_runs(command):
    r = run(command, "--version")
    assert (r.returncode, r.stdout) == (0, f"lbproxy 0.1.0 ({expected_build()})\n")


# ------------------------------------------------------------------------------- a real run


class Running:
    """A started lbproxy subprocess whose stderr is collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        assert proc.stderr is not None
        self._reader = asyncio.get_running_loop().create_task(self._read(proc.stderr))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    async def wait_logged(self, text: str, timeout: float = 10.0) -> None:
        await wait_for(
            lambda: self.logged(text) or self.proc.returncode is not None,
            timeout,
            f"{text!r} in the log",
        )
        assert self.logged(text), "\n".join(self.lines)

    async def exit_code(self, timeout: float) -> int:
        """The exit code within ``timeout`` seconds (and the whole log read)."""
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, 5)
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def config_text(listen: int, admin: int, servers: list[str], **top: object) -> str:
    doc = {
        "listeners": [{"name": "web", "bind": f"127.0.0.1:{listen}", "server_group": "rs1"}],
        "server_groups": {
            "rs1": {
                "servers": servers,
                "health_check": {"path": "/health", "interval": "200ms", "timeout": "1s"},
            }
        },
        "admin": {"bind": f"127.0.0.1:{admin}"},
        "access_log": {"enabled": False},
        **top,
    }
    return yaml.safe_dump(doc)


@contextlib.asynccontextmanager
async def lbproxy(path: Path) -> AsyncIterator[Running]:
    proc = await asyncio.create_subprocess_exec(
        *MODULE,
        "--config",
        str(path),
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    running = Running(proc)
    try:
        yield running
    finally:
        await running.kill()


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str] | None:
    try:
        async with session.get(url) as r:
            return r.status, await r.text()
    except aiohttp.ClientError:
        return None


async def serving(session: aiohttp.ClientSession, url: str, body: str) -> bool:
    return await get(session, url) == (200, body)


async def answered(session: aiohttp.ClientSession, url: str, status: int) -> bool:
    got = await get(session, url)
    return got is not None and got[0] == status


@dataclasses.dataclass
class Served:
    lb: Running
    session: aiohttp.ClientSession
    listen: int  # the listener's port
    admin: int  # the admin's port
    backend: Any


@contextlib.asynccontextmanager
async def serving_lbproxy(make_backend: Any, tmp_path: Path) -> AsyncIterator[Served]:
    """lbproxy before one backend ("A"), once it serves a request through its listener."""
    backend = await make_backend("A")
    listen, admin = free_port(), free_port()
    path = write(tmp_path, config_text(listen, admin, [backend.address]))
    async with lbproxy(path) as lb, aiohttp.ClientSession() as session:
        await wait_for(
            lambda: serving(session, f"http://127.0.0.1:{listen}/whoami", "A"),
            timeout=15,
            what="lbproxy to serve a request through its listener",
        )
        yield Served(lb, session, listen, admin, backend)


async def test_real_run_serves_then_sigterm_exits_zero(make_backend, tmp_path):
    async with serving_lbproxy(make_backend, tmp_path) as served:
        lb, session, listen, admin = served.lb, served.session, served.listen, served.admin
        # The admin comes up after the listeners (they serve as soon as they are warm).
        await wait_for(
            lambda: answered(session, f"http://127.0.0.1:{admin}/healthz", 200),
            timeout=15,
            what="the admin to answer",
        )
        # the client's keep-alive connection to the listener stays open over the SIGTERM
        start = time.monotonic()
        lb.proc.send_signal(signal.SIGTERM)
        assert await lb.exit_code(timeout=20) == 0
        assert time.monotonic() - start < 20  # the idle keep-alive does not wait out 30 s
    assert f"listening: web on 127.0.0.1:{listen}" in "\n".join(lb.lines)
    assert lb.logged("SIGTERM: shutting down gracefully")
    assert lb.lines[-1].endswith(" INFO lbproxy: stopped")
    assert not lb.logged("Traceback")
    assert ("GET", "/whoami") in [(m, p) for m, p, _ in served.backend.requests]


async def test_second_signal_exits_at_once_with_a_slow_request_in_flight(make_backend, tmp_path):
    backend = await make_backend("A")
    listen, admin = free_port(), free_port()
    text = config_text(listen, admin, [backend.address], shutdown_timeout="30s")
    path = write(tmp_path, text)
    async with lbproxy(path) as lb, aiohttp.ClientSession() as session:
        await wait_for(
            lambda: serving(session, f"http://127.0.0.1:{listen}/whoami", "A"),
            timeout=15,
            what="lbproxy to serve",
        )
        slow = asyncio.create_task(get(session, f"http://127.0.0.1:{listen}/sleep/30"))
        await wait_for(
            lambda: any(p == "/sleep/30" for _, p, _ in backend.requests),
            what="the slow request to reach the backend",
        )
        lb.proc.send_signal(signal.SIGTERM)
        await lb.wait_logged("SIGTERM: shutting down gracefully")
        await lb.wait_logged("stopped accepting")
        assert lb.proc.returncode is None  # the graceful shutdown waits for /sleep/30
        start = time.monotonic()
        lb.proc.send_signal(signal.SIGINT)
        assert await lb.exit_code(timeout=15) == 0
        assert time.monotonic() - start < 15  # at once, not after /sleep/30 or the 30 s drain
        assert lb.logged("SIGINT again: stopping now")
        result = await asyncio.wait_for(slow, 5)
        assert result is None  # the in-flight request was cut, not answered
    assert not lb.logged("Traceback")


async def test_port_in_use_exits_one_with_a_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write(tmp_path, config_text(port, free_port(), []))
        async with lbproxy(path) as lb:
            assert await lb.exit_code(timeout=10) == 1
    errors = [line for line in lb.lines if " ERROR " in line]
    assert len(errors) == 1
    assert f" ERROR lbproxy: listeners[0].bind: cannot listen on 127.0.0.1:{port}: " in errors[0]
    assert errors[0].lower().endswith("address already in use")
    assert not lb.logged("Traceback")


async def test_unopenable_access_log_exits_one_with_a_clear_line(tmp_path):
    missing = tmp_path / "no-such-dir" / "access.log"
    text = config_text(free_port(), free_port(), [], access_log={"path": str(missing)})
    async with lbproxy(write(tmp_path, text)) as lb:
        assert await lb.exit_code(timeout=10) == 1
    errors = [line for line in lb.lines if " ERROR " in line]
    assert len(errors) == 1
    assert errors[0].endswith(f"access_log.path: cannot open {missing}: No such file or directory")
    assert not lb.logged("Traceback")


def test_schema_flag_prints_the_json_schema() -> None:
    import json
    import subprocess
    import sys

    from lbproxy.config import doc

    r = subprocess.run(
        [sys.executable, "-m", "lbproxy", "--schema"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == doc.schema()


# ------------------------------------------------------------------------- system calls


def strace_binary() -> str:
    import shutil

    found = shutil.which("strace")
    if found is None:
        pytest.fail(
            "strace is not installed: this test counts lbproxy's system calls with it "
            "(apt-get install strace; scripts/test installs it)"
        )
    return found


async def syscalls(pid: int, names: str, work: Callable[[], Awaitable[None]]) -> dict[str, int]:
    """How many of the system calls ``names`` (strace's ``trace=`` list) the process ``pid``
    and its threads make while ``work`` runs, counted with strace."""
    return (await syscalls_and_errors(pid, names, work))[0]


async def syscalls_and_errors(
    pid: int, names: str, work: Callable[[], Awaitable[None]]
) -> tuple[dict[str, int], dict[str, int]]:
    """``syscalls``, and how many of each failed."""
    tracer = await asyncio.create_subprocess_exec(
        strace_binary(),
        "-f",
        "-c",
        "-e",
        f"trace={names}",
        "-p",
        str(pid),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert tracer.stderr is not None
    # strace says so once it is attached to the process (then to its threads).
    line = await asyncio.wait_for(tracer.stderr.readline(), 30)
    assert b"attached" in line, line
    await work()
    tracer.send_signal(signal.SIGINT)
    report = (await asyncio.wait_for(tracer.stderr.read(), 30)).decode()
    await tracer.wait()
    counts = {name: 0 for name in names.split(",")}
    errors = dict(counts)
    for row in report.splitlines():
        # % time, seconds, usecs/call, calls, [errors,] syscall
        cols = row.split()
        if cols and cols[-1] in counts and cols[0][0].isdigit():
            counts[cols[-1]] = int(cols[3])
            if len(cols) == 6:
                errors[cols[-1]] = int(cols[4])
    return counts, errors


async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"GET /whoami HTTP/1.1\r\nHost: lb\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    await reader.readexactly(length)


async def new_connections(listen: int, n: int) -> None:
    """``n`` client connections to the listener, one after another, one request each."""
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        await one_request(reader, writer)
        writer.close()
        await writer.wait_closed()


async def test_a_keep_alive_request_makes_no_getpid_call(make_backend, tmp_path):
    """asyncio.get_running_loop() checks for a fork with a getpid system call on every call;
    an exchange once asked for the loop that way, one system call per request for nothing.
    Counted with strace on a real process: far fewer getpid calls than requests (the few
    left are the timers' and the health checks', not the requests')."""
    requests = 1000
    async with serving_lbproxy(make_backend, tmp_path) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.listen)

        async def work() -> None:
            for _ in range(requests):
                await one_request(reader, writer)

        counted = await syscalls(served.lb.proc.pid, "getpid", work)
        writer.close()
    assert counted["getpid"] < requests // 4, counted


async def test_a_new_connection_makes_no_getpid_call(make_backend, tmp_path):
    """A new client connection once made a getpid system call for nothing: its protocol
    asked asyncio for the running loop (and a TLS one did twice). Now the listener hands its
    loop down: far fewer getpid calls than connections."""
    connections = 300
    async with serving_lbproxy(make_backend, tmp_path) as served:
        counted = await syscalls(
            served.lb.proc.pid, "getpid", lambda: new_connections(served.listen, connections)
        )
    assert counted["getpid"] < connections // 4, counted


async def test_an_accepted_connection_closes_its_descriptor_once(make_backend, tmp_path):
    """The listener accepts with the C-level accept and hands uvloop a bare _socket.socket;
    uvloop closes such a file object itself after closing the transport's descriptor, which
    would close the same number a second time (EBADF, or by then another file's: a thread
    may have opened one in between). The object lets go of the descriptor once the
    transport has it: no close of a connection's fails."""
    connections = 200
    async with serving_lbproxy(make_backend, tmp_path) as served:

        async def closed_all() -> bool:
            # The proxy closes each client connection when it sees the client's FIN.
            async with served.session.get(f"http://127.0.0.1:{served.admin}/status") as r:
                status = await r.json()
            (web,) = status["listeners"]
            return bool(web["connections_active"] == 0)

        async def work_and_settle() -> None:
            await new_connections(served.listen, connections)
            await wait_for(closed_all, timeout=30, what="every client connection closed")

        counted, failed = await syscalls_and_errors(served.lb.proc.pid, "close", work_and_settle)
    assert counted["close"] >= connections, counted
    assert failed["close"] == 0, (counted, failed)
