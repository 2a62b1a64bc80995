"""``python -m backends.chat`` as a real process: serving, Redis down, clean signal exits."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from backends.chat.__main__ import parse_args
from tests.backends.helpers import connect, recv_json, say
from tests.backends.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"(\S+) listening on (http://\S+)")
BAD_SIGNS = ("Traceback", "Task was destroyed", "Unclosed", "never awaited", "ERROR")


class Backend:
    """A ``python -m backends.chat`` process and what it has logged so far."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.urls: dict[str, str] = {}

    async def read_until(self, pattern: str, timeout: float = 10.0) -> str:
        """The first line logged (so far, or from now on) that contains ``pattern``."""
        for line in self.lines:
            if pattern in line:
                return line
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stderr.readline()
                assert raw, f"backend exited before logging {pattern!r}:\n" + self.log
                line = raw.decode(errors="replace").rstrip()
                self.lines.append(line)
                if m := LISTENING.search(line):
                    self.urls[m.group(1)] = m.group(2)
                if pattern in line:
                    return line

    async def wait_listening(self, *names: str) -> None:
        for name in names:
            if name not in self.urls:
                await self.read_until(f"{name} listening on")

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """Send ``sig``, collect the rest of stderr, return the exit status."""
        assert self.proc.stderr is not None
        self.proc.send_signal(sig)
        try:
            async with asyncio.timeout(10):
                while raw := await self.proc.stderr.readline():
                    self.lines.append(raw.decode(errors="replace").rstrip())
                return await self.proc.wait()
        except TimeoutError:
            pytest.fail(f"backend did not exit within 10 s of {sig.name}:\n{self.log}")

    @property
    def log(self) -> str:
        return "\n".join(self.lines)


Launcher = Callable[..., Awaitable[Backend]]


@pytest.fixture
async def launch() -> AsyncIterator[Launcher]:
    started: list[Backend] = []

    async def start(*args: str) -> Backend:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-X",
            "dev",  # asyncio debug mode: would report un-awaited coroutines, leaks, etc.
            "-m",
            "backends.chat",
            *args,
            cwd=ROOT,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        backend = Backend(proc)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        if backend.proc.returncode is None:
            backend.proc.kill()
            await backend.proc.wait()


def assert_clean(backend: Backend) -> None:
    for bad in BAD_SIGNS:
        assert bad not in backend.log, f"{bad!r} in the backend's log:\n{backend.log}"


async def test_serves_with_redis_and_exits_cleanly_on_sigterm(
    launch: Launcher, redis_server: RedisServer
) -> None:
    backend = await launch("--port", "0", "--name", "ECS01", "--redis", redis_server.url)
    await backend.wait_listening("ECS01")
    url = backend.urls["ECS01"]
    await backend.read_until("redis connected")
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/whoami") as resp:
            assert await resp.text() == "ECS01"
        ws = await connect(session, url + "/ws", "ECS01")
        await say(ws, "alice", "hi")
        assert (await recv_json(ws))["text"] == "hi"
        assert await backend.stop(signal.SIGTERM) == 0
        closing = await ws.receive(timeout=5)
        assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert "shutting down" in backend.log
    assert_clean(backend)


async def test_two_backends_in_one_process_share_a_memory_bus(launch: Launcher) -> None:
    backend = await launch("--port", "0", "--name", "ECS01", "--port", "0", "--name", "ECS02")
    await backend.wait_listening("ECS01", "ECS02")
    async with aiohttp.ClientSession() as session:
        alice = await connect(session, backend.urls["ECS01"] + "/ws", "ECS01")
        bob = await connect(session, backend.urls["ECS02"] + "/ws", "ECS02")
        await say(bob, "bob", "hello from ECS02")
        msg = await recv_json(alice)
        assert (msg["user"], msg["text"], msg["backend"]) == ("bob", "hello from ECS02", "ECS02")
        assert await backend.stop(signal.SIGINT) == 0
    assert_clean(backend)


async def test_redis_down_still_serves_local_users(launch: Launcher) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    backend = await launch(
        "--port", "0", "--name", "ECS01", "--redis", dead, "--log-level", "DEBUG"
    )  # fmt: skip
    await backend.wait_listening("ECS01")
    line = await backend.read_until("redis unavailable")
    assert line.rstrip().endswith("; retrying")
    url = backend.urls["ECS01"]
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/health") as resp:
            assert resp.status == 200
            assert await resp.text() == "ok"
        alice = await connect(session, url + "/ws")
        carol = await connect(session, url + "/ws")
        await say(alice, "alice", "anyone?")
        assert (await recv_json(carol))["text"] == "anyone?"
        for attempt in (2, 3):  # two retries fail too, but aren't logged as new outages
            await backend.read_until(f"attempt {attempt} failed")
        assert await backend.stop() == 0
    assert backend.log.count("redis unavailable") == 1
    assert "ERROR" not in backend.log and "Traceback" not in backend.log


async def test_port_in_use_exits_with_status_1(launch: Launcher) -> None:
    first = await launch("--port", "0", "--name", "ECS01")
    await first.wait_listening("ECS01")
    port = first.urls["ECS01"].rsplit(":", 1)[1]
    second = await launch("--port", port, "--name", "ECS02")
    assert second.proc.stderr is not None
    err = (await asyncio.wait_for(second.proc.stderr.read(), 10)).decode()
    assert await asyncio.wait_for(second.proc.wait(), 10) == 1
    assert "cannot listen" in err
    assert "Traceback" not in err
    assert await first.stop() == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "5001", "--name", "A", "--port", "5002"],
        ["--port", "5001", "--name", "A", "--port", "5002", "--name", "A"],
        ["--name", "A"],
        ["--port", "70000"],
    ],
)
def test_bad_arguments_exit_with_status_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        parse_args(args)
    assert exc_info.value.code == 2


def test_default_names_and_multiple_backends() -> None:
    args = parse_args(["--port", "5001", "--port", "5002"])
    assert args.name == ["chat5001", "chat5002"]
    assert args.redis is None and args.host == "127.0.0.1"
