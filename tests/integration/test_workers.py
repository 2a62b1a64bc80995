"""Multi-worker mode (issue 8): ``python -m lbproxy --config F --workers N`` as an operator runs it.

Every test starts the real command as a subprocess on free ports, with real backends in this
process, and looks only at sockets, signals, /status, /metrics, the log and /proc. Which
worker answered a connection is read from /proc: the accepted socket (listener port <-> our
client port) is found in /proc/net/tcp and its inode among the workers' open descriptors, so
nothing in lbproxy exists only for these tests.

Covers: every worker serves and /metrics and /status sum them exactly; a worker killed with
SIGKILL is restarted (after 0.5 s, then 1 s if it dies again soon) while traffic continues
without a failed request; reload fan-out by SIGHUP, file change and POST /-/reload, and a
reload that fails validation (bad value, an address in use, a port 0 listener) changes no
worker; a second lbproxy on the same port fails instead of sharing it; health checks run
once however many workers there are, and every worker follows the checked state within one
check interval; a passive failure seen by one worker keeps every worker off that server;
SIGTERM drains gracefully and a second one stops at once, and a killed supervisor's workers
stop too, leaving no worker behind; ``--workers`` arguments and the port 0 refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support import Backend, backend_app, config_doc, free_port, read_response, wait_for

REPO = Path(__file__).resolve().parents[2]
PAD = 4096  # every config file written here has this size (see ``write_config``)
START_TIMEOUT = 20.0


# ------------------------------------------------------------------------------ /proc helpers


def alive(pid: int) -> bool:
    """True while any thread of ``pid`` runs (a killed process shows its first thread as a
    zombie while the others are still exiting and holding its descriptors)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:  # gone (ENOENT, or ESRCH while it is being torn down)
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            return True
    return False


def listening(port: int) -> set[str]:
    """The inodes of the sockets listening on ``port`` (one per worker, SO_REUSEPORT)."""
    with open("/proc/net/tcp") as f:
        next(f)
        rows = [line.split() for line in f]
    return {r[9] for r in rows if r[3] == "0A" and int(r[1].rsplit(":", 1)[1], 16) == port}


def sockets_of(pid: int) -> set[str]:
    """The inodes of the sockets ``pid`` has open."""
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                out.add(link[8:-1])
    return out


def socket_owners(listen_port: int, pids: list[int]) -> dict[int, int]:
    """Client port -> the pid among ``pids`` holding the accepted socket of that connection."""
    inodes: dict[str, int] = {}  # inode of an accepted socket -> the client's port
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == listen_port and fields[9] != "0":
                inodes[f"socket:[{fields[9]}]"] = int(fields[2].rsplit(":", 1)[1], 16)
    owners: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    client = inodes.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
                    if client is not None:
                        owners[client] = pid
    return owners


# ------------------------------------------------------------------------------ the processes


@dataclass
class Reply:
    status: int
    body: str
    pid: int | None  # the worker that accepted the connection, when asked


class Cluster:
    """A running ``lbproxy --workers N`` (the supervisor), its log and its admin API."""

    def __init__(self, proc: asyncio.subprocess.Process, path: Path, port: int, admin: int):
        self.proc = proc
        self.path = path
        self.port = port
        self.admin = f"http://127.0.0.1:{admin}"
        self.lines: list[str] = []
        self.seen_pids: set[int] = set()
        assert proc.stderr is not None
        self._reader = asyncio.get_running_loop().create_task(self._read(proc.stderr))
        self.session = aiohttp.ClientSession()

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def logged(self, text: str) -> int:
        return sum(1 for line in self.lines if text in line)

    async def wait_logged(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        await wait_for(lambda: self.logged(text) >= count, timeout, f"{text!r} x{count} logged")

    async def status(self) -> dict[str, Any]:
        async with self.session.get(f"{self.admin}/status") as r:
            assert r.status == 200
            st: dict[str, Any] = await r.json()
        self.seen_pids.update(w["pid"] for w in st["workers"])
        return st

    async def worker_pids(self) -> list[int]:
        return [w["pid"] for w in (await self.status())["workers"]]

    async def metrics(self) -> Metrics:
        async with self.session.get(f"{self.admin}/metrics") as r:
            assert r.status == 200
            return Metrics(await r.text())

    async def reload(self) -> tuple[int, dict[str, Any]]:
        async with self.session.post(f"{self.admin}/-/reload", json={}) as r:
            return r.status, await r.json()

    async def request(self, path: str = "/whoami", timeout: float = 5.0) -> Reply:
        """One request over a new connection."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            return await self._exchange(reader, writer, path, timeout)
        finally:
            writer.close()

    async def _exchange(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        path: str,
        timeout: float,
    ) -> Reply:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: lb\r\n\r\n".encode())
        async with asyncio.timeout(timeout):
            resp = await read_response(reader)
        return Reply(resp.status, resp.body.decode(), None)

    async def spread(self, n: int, path: str = "/whoami") -> list[Reply]:
        """``n`` sequential requests, each over a new connection, and which worker took each.

        The connections stay open (keep-alive) until all are answered, so /proc still shows
        which worker holds each one.
        """
        pids = await self.worker_pids()
        replies: list[tuple[Reply, int]] = []
        writers: list[asyncio.StreamWriter] = []
        try:
            for _ in range(n):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writers.append(writer)
                reply = await self._exchange(reader, writer, path, 5.0)
                replies.append((reply, writer.get_extra_info("sockname")[1]))
            owners = socket_owners(self.port, pids)
        finally:
            for w in writers:
                w.close()
        for reply, client in replies:
            reply.pid = owners.get(client)
        assert all(r.pid in pids for r, _ in replies), replies
        return [r for r, _ in replies]

    async def stop(self) -> None:
        """Leave nothing running: SIGTERM twice (graceful, then at once), then SIGKILL."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.05)
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        for pid in self.seen_pids:  # only workers of this supervisor, by pid
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self._reader, 5)
        await self.session.close()

    async def exit_code(self, timeout: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._reader, 5)
        return code


class Metrics:
    """A /metrics scrape, parsed with prometheus-client's own parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include ``labels``."""
        found = [
            s.value
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert found, f"no sample {name}{labels}"
        return sum(found)

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {tuple(sorted(s.labels.items())): s.value for s in self.samples if s.name == name}


def write_config(path: Path, doc: dict[str, Any], keep_signature: bool = False) -> None:
    """Write ``doc`` padded to PAD bytes, in place. With ``keep_signature`` the size, inode
    and mtime stay as they were, so the 1 s file watcher does not see the change and only
    the trigger under test (SIGHUP, POST /-/reload) reloads it."""
    text = yaml.safe_dump(doc, sort_keys=False)
    assert len(text) < PAD
    text += "#" * (PAD - len(text) - 1) + "\n"
    st = path.stat() if keep_signature else None
    with open(path, "r+" if path.exists() else "w") as f:
        f.write(text)
    if st is not None:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def lb_doc(
    servers: list[str], port: int, admin: int, group: dict[str, Any] | None = None, **top: Any
) -> dict[str, Any]:
    return config_doc(
        servers,
        listener={"bind": f"127.0.0.1:{port}"},
        group=group,
        admin={"bind": f"127.0.0.1:{admin}"},
        **top,
    )


async def spawn(path: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lbproxy",
        "--config",
        str(path),
        *args,
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


Start = Callable[..., Awaitable[Cluster]]


@pytest.fixture
async def start_lbproxy(tmp_path: Path) -> AsyncIterator[Start]:
    """``await start_lbproxy(servers, workers=2, group=..., **top)``: a cluster serving on a
    free listener port, every worker serving and every checked server up."""
    started: list[Cluster] = []

    async def start(
        servers: list[str],
        workers: str | int = 2,
        group: dict[str, Any] | None = None,
        name: str = "lb.yaml",
        **top: Any,
    ) -> Cluster:
        port, admin = free_port(), free_port()
        path = tmp_path / name
        write_config(path, lb_doc(servers, port, admin, group, **top))
        c = Cluster(await spawn(path, "--workers", str(workers)), path, port, admin)
        started.append(c)

        async def ready() -> bool:
            if c.proc.returncode is not None:
                raise AssertionError(f"lbproxy exited {c.proc.returncode}:\n" + "\n".join(c.lines))
            try:
                st = await c.status()
            except aiohttp.ClientError:
                return False
            serving = all(w["alive"] and w["serving"] for w in st["workers"])
            if serving and st["workers"]:
                # Any process of this user may join a port with SO_REUSEPORT: one of another
                # test run given the same free port would take some of our connections.
                ours = set().union(*(sockets_of(w["pid"]) for w in st["workers"]))
                assert listening(port) <= ours, f"port {port} is shared with another process"
            up = all(s["state"] == "up" for g in st["server_groups"] for s in g["servers"])
            return serving and up

        await wait_for(ready, START_TIMEOUT, "every worker serving and every server up")
        return c

    yield start
    for c in started:
        await c.stop()


@pytest.fixture
async def start_backend() -> AsyncIterator[Callable[[web.Application], Awaitable[Backend]]]:
    started: list[Backend] = []

    async def start(app: web.Application) -> Backend:
        b = await Backend(app).start()
        started.append(b)
        return b

    yield start
    for b in started:
        await b.stop()


def sick_app(name: str) -> tuple[web.Application, dict[str, bool]]:
    """A backend whose /health answers 503 while ``flag["sick"]``; everything else works."""
    flag = {"sick": False}
    app = backend_app(name)

    @web.middleware
    async def health(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/health" and flag["sick"]:
            return web.Response(status=503, text="sick")
        resp: web.StreamResponse = await handler(request)
        return resp

    app.middlewares.append(health)
    return app, flag


def count(backend: Backend, path: str) -> int:
    return sum(1 for _, p, _ in backend.requests if p == path)


def names(replies: list[Reply]) -> list[str]:
    return [r.body for r in replies]


# ------------------------------------------------------------------- serving and the sums


async def test_every_worker_serves_and_metrics_status_are_the_exact_sum(
    make_backend, start_lbproxy
):
    a = await make_backend("A")
    b = await make_backend("B")
    lb = await start_lbproxy([a.address, b.address], workers=2)
    st = await lb.status()
    assert [(w["index"], w["alive"], w["serving"], w["restarts"]) for w in st["workers"]] == [
        (0, True, True, 0),
        (1, True, True, 0),
    ]
    pids = [w["pid"] for w in st["workers"]]
    assert len(set(pids)) == 2 and st["pid"] not in pids
    assert all(alive(p) for p in pids)

    n = 60
    replies = await lb.spread(n)
    assert {r.status for r in replies} == {200}
    assert {r.pid for r in replies} == set(pids)  # both workers answered
    # Each worker round-robins on its own: every worker that took 2+ requests used both.
    for pid in pids:
        mine = names([r for r in replies if r.pid == pid])
        if len(mine) >= 2:
            assert set(mine) == {"A", "B"}, (pid, mine)
    assert count(a, "/whoami") + count(b, "/whoami") == n

    await wait_for(lambda: _no_active(lb), 5, "every client connection closed in every worker")
    m = await lb.metrics()
    assert m.total("lbproxy_requests_total") == n
    assert m.total("lbproxy_requests_total", listener="web", code="200") == n
    assert m.total("lbproxy_requests_total", server=a.address) == count(a, "/whoami")
    assert m.total("lbproxy_requests_total", server=b.address) == count(b, "/whoami")
    assert m.series("lbproxy_connections_total") == {(("listener", "web"),): n}
    assert m.total("lbproxy_connections_active") == 0
    assert m.total("lbproxy_request_duration_seconds_count") == n
    # Health state is the supervisor's: one series per server, 1, not 1 per worker.
    assert m.series("lbproxy_backend_up") == {
        (("server", a.address), ("server_group", "rs1")): 1.0,
        (("server", b.address), ("server_group", "rs1")): 1.0,
    }
    # Checks counted once: what the backends saw (a check may be in flight while scraping).
    for backend in (a, b):
        checks = m.total("lbproxy_health_checks_total", server=backend.address)
        assert checks >= 1
        assert checks <= count(backend, "/health") <= checks + 1

    st = await lb.status()
    (lst,) = st["listeners"]
    assert (lst["connections_total"], lst["requests_total"], lst["connections_active"]) == (
        n,
        n,
        0,
    )
    servers = {s["address"]: s for s in st["server_groups"][0]["servers"]}
    assert servers[a.address]["requests_total"] == count(a, "/whoami")
    assert servers[b.address]["requests_total"] == count(b, "/whoami")
    assert [s["state"] for s in servers.values()] == ["up", "up"]
    assert st["server_groups"][0]["servers_up"] == 2


async def _no_active(lb: Cluster) -> bool:
    return (await lb.metrics()).total("lbproxy_connections_active") == 0


# ------------------------------------------------------------------------------- supervisor


async def respawned(lb: Cluster, index: int, pid: int) -> float:
    """Wait until worker ``index`` is no longer ``pid`` (spawned again): when that was seen."""

    async def spawned() -> bool:
        return (await lb.status())["workers"][index]["pid"] != pid

    await wait_for(spawned, 10, f"worker {index} spawned again")
    return time.monotonic()


async def serving(lb: Cluster, index: int) -> bool:
    return bool((await lb.status())["workers"][index]["serving"])


async def test_killed_worker_is_restarted_while_traffic_continues(make_backend, start_lbproxy):
    a = await make_backend("A")
    lb = await start_lbproxy([a.address], workers=2)
    old = await lb.worker_pids()
    victim = old[0]

    results: list[Reply | BaseException] = []
    kill = asyncio.Event()
    killed_at: list[tuple[int, float]] = []  # (requests answered before, time)
    done = asyncio.Event()

    async def kill_victim() -> None:
        os.kill(victim, signal.SIGKILL)
        killed_at.append((len(results), time.monotonic()))
        # Connections queued on its listening socket are lost with it (reset by the kernel):
        # wait until every thread of it is gone, its sockets closed, as a real pause between
        # two requests. (That takes tens of ms after the kill.)
        await wait_for(lambda: not alive(victim), 5, "the killed worker's sockets closed")

    async def traffic() -> None:
        # New connection per request, one at a time. The kill happens between two requests
        # (none in flight on the victim's connections), so every request must be answered.
        while not done.is_set():
            if kill.is_set() and not killed_at:
                await kill_victim()
            try:
                results.append(await lb.request())
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                results.append(exc)

    loop_task = asyncio.create_task(traffic())
    try:
        await wait_for(lambda: len(results) >= 20, 10, "traffic before the kill")
        kill.set()
        spawned_at = await respawned(lb, 0, victim)
        await wait_for(lambda: serving(lb, 0), 10, "worker 0 serving again")
        during = len(results) - killed_at[0][0]
        after = len(results)
        await wait_for(lambda: len(results) >= after + 20, 10, "traffic after the restart")
    finally:
        done.set()
        await loop_task

    failures = [r for r in results if not (isinstance(r, Reply) and r.status == 200)]
    assert failures == []
    assert during >= 5  # the other worker served alone while worker 0 was being restarted
    # Not before RESTART_DELAY (0.5 s, the log line above says which delay was planned); the
    # upper bound is only a hang guard: under load the respawn is seen late.
    assert 0.48 <= spawned_at - killed_at[0][1] < 0.5 + 5
    st = await lb.status()
    w0, w1 = st["workers"]
    assert (w0["index"], w0["alive"], w0["serving"], w0["restarts"]) == (0, True, True, 1)
    assert (w1["pid"], w1["restarts"]) == (old[1], 0)
    assert w0["pid"] not in old and alive(w0["pid"])
    assert lb.logged(f"worker 0 (pid {victim}) exited with -9 after ") == 1
    assert lb.logged("; restarting in 0.5s") == 1
    # The new worker takes connections too.
    replies = await lb.spread(30)
    assert {r.pid for r in replies} == {w0["pid"], old[1]}
    assert names(replies) == ["A"] * 30

    # Dying again soon after its restart: the delay doubles (a crash loop is not a busy loop).
    second = w0["pid"]
    os.kill(second, signal.SIGKILL)
    killed = time.monotonic()
    assert 0.98 <= await respawned(lb, 0, second) - killed < 1.0 + 5  # doubled: not before 1 s
    await wait_for(lambda: serving(lb, 0), 10, "worker 0 serving again")
    assert lb.logged(f"worker 0 (pid {second}) exited with -9 after ") == 1
    assert lb.logged("; restarting in 1.0s") == 1
    w0, w1 = (await lb.status())["workers"]
    assert (w0["restarts"], w1["restarts"], w1["pid"]) == (2, 0, old[1])

    # The supervisor's history: both restarts as events, and the workers' traffic summed into
    # the series it samples (every 5 s: the second point gives the first rate).
    async def history() -> dict[str, Any]:
        async with lb.session.get(f"{lb.admin}/status/history") as r:
            assert r.status == 200
            data: dict[str, Any] = await r.json()
            return data

    h = await history()
    restarts = [e["text"] for e in h["events"] if e["kind"] == "worker"]
    assert [t.split(" exited")[0] for t in restarts] == [
        f"worker 0 (pid {victim})",
        f"worker 0 (pid {second})",
    ]
    await lb.spread(20)

    async def sampled() -> bool:
        fine = (await history())["resolutions"][0]
        series = fine["servers"][f"rs1/{a.address}"]["series"]
        return any(v for v in series["requests"])

    await wait_for(sampled, 15, "a rate of A's requests in the supervisor's history")

    # A's WebSocket figures take the same path: an open tunnel's messages (a worker adds its
    # open tunnels' to what it reports), then its end by close code class.
    def ws_series(fine: dict[str, Any]) -> dict[str, list[float | None]]:
        series: dict[str, list[float | None]] = fine["servers"][f"rs1/{a.address}"]["series"]
        return series

    async with lb.session.ws_connect(f"http://127.0.0.1:{lb.port}/ws") as ws:
        for i in range(20):
            await ws.send_str(f"m{i}")
            assert (await ws.receive()).data == f"m{i}"

        async def messages_sampled() -> bool:
            series = ws_series((await history())["resolutions"][0])
            return any(series["ws_messages_in"]) and any(series["ws_messages_out"])

        await wait_for(messages_sampled, 15, "an open tunnel's messages in A's history")
        assert not ws.closed

    async def close_sampled() -> bool:
        return any(ws_series((await history())["resolutions"][0])["closes_1000"])

    await wait_for(close_sampled, 15, "the tunnel's 1000 close in A's history")


# ------------------------------------------------------------------------------- reload


@pytest.mark.parametrize("trigger", ["SIGHUP", "file change", "admin"])
async def test_reload_reaches_every_worker_and_a_bad_one_reaches_none(
    trigger, make_backend, start_lbproxy
):
    a = await make_backend("A")
    b = await make_backend("B")
    lb = await start_lbproxy([a.address], workers=2)
    port, admin = lb.port, int(lb.admin.rsplit(":", 1)[1])
    assert names(await lb.spread(10)) == ["A"] * 10

    async def reload(doc: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
        write_config(lb.path, doc, keep_signature=trigger != "file change")
        if trigger == "SIGHUP":
            lb.proc.send_signal(signal.SIGHUP)
        elif trigger == "admin":
            return await lb.reload()
        return None

    answer = await reload(lb_doc([b.address], port, admin))
    if answer is not None:
        assert answer == (
            200,
            {
                "result": "ok",
                "changed": True,
                "summary": f"groups changed: rs1; servers added: rs1/{b.address}; "
                f"servers removed: rs1/{a.address}",
            },
        )

    async def on_b() -> bool:
        # /status asks every worker for its stats after the supervisor sent it the new
        # config: an answer means the worker has applied it.
        servers = (await lb.status())["server_groups"][0]["servers"]
        return [(s["address"], s["state"]) for s in servers] == [(b.address, "up")]

    await wait_for(on_b, 5, "the new config with B up")
    pids = await lb.worker_pids()
    replies = await lb.spread(40)
    assert names(replies) == ["B"] * 40
    assert {r.pid for r in replies} == set(pids)
    a_seen = count(a, "/whoami")

    # A config that fails validation reaches no worker.
    bad = lb_doc(
        [a.address], port, admin, group={"servers": [{"address": a.address, "weight": 500}]}
    )
    answer = await reload(bad)
    if answer is not None:
        status, body = answer
        assert (status, body["result"], len(body["errors"])) == (400, "error", 1)
        # file:line: place: message
        where, problem = body["errors"][0].split(": ", 1)
        assert where.rsplit(":", 1)[1].isdigit(), where
        assert problem == "server_groups.rs1.servers[0].weight: expected an integer 0..100, got 500"

    async def failed(n: int) -> bool:
        m = await lb.metrics()
        return m.total("lbproxy_config_reloads_total", result="failure") == n

    await wait_for(lambda: failed(1), 5, "the failed reload to be counted")
    replies = await lb.spread(40)
    assert names(replies) == ["B"] * 40
    assert {r.pid for r in replies} == set(pids)
    assert count(a, "/whoami") == a_seen
    m = await lb.metrics()
    assert m.total("lbproxy_config_reloads_total", result="success") == 1
    assert m.total("lbproxy_config_reloads_total", result="failure") == 1
    assert m.total("lbproxy_config_last_reload_success") == 0
    assert lb.logged(f"reload ({trigger}) failed") == 1
    assert lb.logged("could not apply the config") == 0
    if trigger != "file change":
        assert lb.logged("file change") == 0

    if trigger == "SIGHUP":
        # A worker started after the reload gets the config in force, not the first one.
        victim = pids[1]
        os.kill(victim, signal.SIGKILL)

        async def restarted() -> bool:
            w1 = (await lb.status())["workers"][1]
            return w1["pid"] != victim and w1["serving"]

        await wait_for(restarted, 10, "worker 1 restarted")
        new_pids = await lb.worker_pids()
        replies = await lb.spread(30)
        assert {r.pid for r in replies} == set(new_pids)
        assert names(replies) == ["B"] * 30


async def test_reload_the_workers_cannot_bind_changes_no_worker(make_backend, start_lbproxy):
    a = await make_backend("A")
    b = await make_backend("B")
    lb = await start_lbproxy([a.address], workers=2)
    port, admin = lb.port, int(lb.admin.rsplit(":", 1)[1])
    pids = await lb.worker_pids()

    # An address another program holds (without SO_REUSEPORT) cannot be shared.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        held = taken.getsockname()[1]
        doc = lb_doc([b.address], port, admin)
        doc["listeners"].append(
            {"name": "extra", "bind": f"127.0.0.1:{held}", "server_group": "rs1"}
        )
        write_config(lb.path, doc, keep_signature=True)
        status, body = await lb.reload()
    assert status == 400
    assert body["result"] == "error"
    assert len(body["errors"]) == 1
    assert body["errors"][0].startswith(f"listeners[1].bind: cannot listen on 127.0.0.1:{held}: ")

    # Port 0 would give each worker a port of its own: refused at reload as at start.
    doc = lb_doc([b.address], port, admin)
    doc["listeners"].append({"name": "extra", "bind": "127.0.0.1:0", "server_group": "rs1"})
    write_config(lb.path, doc, keep_signature=True)
    status, body = await lb.reload()
    assert status == 400
    assert body == {
        "result": "error",
        "errors": ["listeners[1].bind: port 0 cannot be shared by workers; name a port"],
    }

    replies = await lb.spread(30)
    assert names(replies) == ["A"] * 30
    assert {r.pid for r in replies} == set(pids)
    st = await lb.status()
    assert [x["name"] for x in st["listeners"]] == ["web"]
    assert [s["address"] for s in st["server_groups"][0]["servers"]] == [a.address]
    m = await lb.metrics()
    assert m.total("lbproxy_config_reloads_total", result="failure") == 2
    assert m.total("lbproxy_config_reloads_total", result="success") == 0
    assert lb.logged("could not apply the config") == 0


async def test_a_second_lbproxy_on_the_same_port_does_not_join_the_first(
    make_backend, start_lbproxy, tmp_path
):
    """SO_REUSEPORT lets any process of the same user join a port: a second lbproxy
    started by mistake must fail to bind, as a single-process one does, not take a share
    of the first one's connections."""
    a = await make_backend("A")
    lb = await start_lbproxy([a.address], workers=2)
    path = tmp_path / "second.yaml"
    admin = free_port()
    write_config(path, lb_doc([a.address], lb.port, admin))
    second = Cluster(await spawn(path, "--workers", "2"), path, lb.port, admin)
    try:
        assert await second.exit_code(timeout=15) == 1
    finally:
        await second.stop()
    errors = [line for line in second.lines if " ERROR " in line]
    assert len(errors) == 1, second.lines
    assert errors[0].endswith(
        f" ERROR lbproxy: listeners[0].bind: cannot listen on 127.0.0.1:{lb.port}: "
        "Address already in use"
    )
    assert len(listening(lb.port)) == 2  # the first one's two workers, no more


# ------------------------------------------------------------------------------- health


async def test_health_checks_run_once_not_once_per_worker(start_backend, start_lbproxy):
    single = await start_backend(backend_app("single"))
    multi = await start_backend(backend_app("multi"))
    one = await start_lbproxy([single.address], workers=1, name="one.yaml")
    three = await start_lbproxy([multi.address], workers=3, name="three.yaml")
    assert (await one.status())["workers"] == []
    assert len(await three.worker_pids()) == 3

    # Interval 200ms: over a window of T seconds one checker makes at most T / 0.2 + 1 checks
    # (a loaded machine only makes it fewer); three workers each checking would make three
    # times that. Both are counted until each has made 10 checks (events, not a fixed sleep).
    s0, m0, t0 = count(single, "/health"), count(multi, "/health"), time.monotonic()
    await wait_for(lambda: count(single, "/health") - s0 >= 10, 30, "10 checks of one worker")
    await wait_for(lambda: count(multi, "/health") - m0 >= 10, 30, "10 checks of three workers")
    window = time.monotonic() - t0
    n1 = count(single, "/health") - s0
    n3 = count(multi, "/health") - m0
    assert n1 <= window / 0.2 + 2, (n1, window)
    assert n3 <= window / 0.2 + 2, (n3, window)  # once, not once per worker (3x)
    m = await three.metrics()
    checks = m.total("lbproxy_health_checks_total", server=multi.address)
    assert checks <= count(multi, "/health") <= checks + 1


async def test_every_worker_follows_the_health_state_before_its_next_answer(
    make_backend, start_backend, start_lbproxy
):
    unhealthy, healthy = 2, 2
    a = await make_backend("A")
    app, flag = sick_app("B")
    b = await start_backend(app)
    lb = await start_lbproxy(
        [a.address, b.address],
        workers=3,
        group={
            "health_check": {
                "interval": "200ms",
                "timeout": "1s",
                "path": "/health",
                "unhealthy_threshold": unhealthy,
                "healthy_threshold": healthy,
            }
        },
    )
    pids = await lb.worker_pids()

    def uses(replies: list[Reply]) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {}
        for r in replies:
            out.setdefault(r.pid or 0, set()).add(r.body)
        return out

    before = await lb.spread(60)
    assert uses(before) == {pid: {"A", "B"} for pid in pids}

    # The supervisor's checks decide (not before thresholds x interval); every worker follows
    # its broadcast before it answers the next stats request (the status is gathered from every
    # worker over the same channel), so once the status says down, a further status request is
    # the event that proves every worker has the new state: no sleep for a guessed time.
    async def b_is(state: str) -> bool:
        return bool((await lb.status())["server_groups"][0]["servers"][1]["state"] == state)

    flag["sick"] = True
    await wait_for(lambda: b_is("down"), 15, "the supervisor to take B down")
    await lb.status()
    b_seen = count(b, "/whoami")
    replies = await lb.spread(60)
    assert uses(replies) == {pid: {"A"} for pid in pids}
    assert count(b, "/whoami") == b_seen
    st = await lb.status()
    assert [s["state"] for s in st["server_groups"][0]["servers"]] == ["up", "down"]

    flag["sick"] = False
    await wait_for(lambda: b_is("up"), 15, "the supervisor to bring B back")
    await lb.status()
    replies = await lb.spread(60)
    assert uses(replies) == {pid: {"A", "B"} for pid in pids}
    m = await lb.metrics()
    assert m.total("lbproxy_backend_up", server=b.address) == 1


async def test_a_passive_failure_in_one_worker_keeps_every_worker_off_the_server(
    make_backend, start_lbproxy
):
    a = await make_backend("A")
    b = await make_backend("B")
    b_port = b.port
    # Checks pass once at start, then not again during the test.
    lb = await start_lbproxy(
        [a.address, b.address],
        workers=2,
        group={"health_check": {"interval": "60s", "timeout": "1s", "path": "/health"}},
    )
    pids = await lb.worker_pids()
    await b.stop()  # B now refuses connections; no worker has one pooled

    async def b_down() -> bool:
        r = await lb.request()
        assert (r.status, r.body) == (200, "A")  # the refused connect is retried on A
        servers = (await lb.status())["server_groups"][0]["servers"]
        return servers[1]["state"] == "down"

    await wait_for(b_down, 5, "a passive failure to take B down")
    # Every worker has processed the broadcast once it answered this (later) stats request.
    await lb.status()
    first_failures = (await lb.metrics()).total(
        "lbproxy_upstream_errors_total", server=b.address, kind="connect"
    )
    assert 1 <= first_failures <= len(pids)

    attempts = 0

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal attempts
        attempts += 1
        writer.close()

    server = await asyncio.start_server(counted, "127.0.0.1", b_port)
    try:
        replies = await lb.spread(40)
    finally:
        server.close()
        await server.wait_closed()
    assert attempts == 0
    assert [(r.status, r.body) for r in replies] == [(200, "A")] * 40
    assert {r.pid for r in replies} == set(pids)
    m = await lb.metrics()
    assert (
        m.total("lbproxy_upstream_errors_total", server=b.address, kind="connect") == first_failures
    )
    assert m.total("lbproxy_backend_up", server=b.address) == 0
    assert m.total("lbproxy_backend_up", server=a.address) == 1


# ------------------------------------------------------------------------------- shutdown


async def test_sigterm_drains_in_flight_requests_and_leaves_no_worker(make_backend, start_lbproxy):
    a = await make_backend("A")
    lb = await start_lbproxy([a.address], workers=2, shutdown_timeout="30s")
    pids = await lb.worker_pids()
    slow = asyncio.create_task(lb.request("/sleep/1"))
    await wait_for(lambda: count(a, "/sleep/1") == 1, 5, "the slow request at the backend")
    start = time.monotonic()
    lb.proc.send_signal(signal.SIGTERM)
    await lb.wait_logged("SIGTERM: stopping 2 workers gracefully")
    await lb.wait_logged("listener web stopped accepting", count=2)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", lb.port)
    reply = await asyncio.wait_for(slow, 5)
    assert (reply.status, reply.body) == (200, "A slept")
    assert await lb.exit_code(timeout=20) == 0
    assert time.monotonic() - start < 20  # once drained, not at shutdown_timeout (30 s)
    assert not any(alive(p) for p in pids)
    assert lb.lines[-1].endswith(" INFO lbproxy: stopped")
    assert lb.logged("Traceback") == 0
    assert lb.logged("exited with") == 0  # not a restart: no worker was restarted


async def test_second_sigterm_stops_at_once(make_backend, start_lbproxy):
    a = await make_backend("A")
    lb = await start_lbproxy([a.address], workers=2, shutdown_timeout="30s")
    pids = await lb.worker_pids()
    slow = asyncio.create_task(lb.request("/sleep/30", timeout=10))
    await wait_for(lambda: count(a, "/sleep/30") == 1, 5, "the slow request at the backend")
    lb.proc.send_signal(signal.SIGTERM)
    await lb.wait_logged("listener web stopped accepting", count=2)
    assert lb.proc.returncode is None  # waiting for /sleep/30
    start = time.monotonic()
    lb.proc.send_signal(signal.SIGTERM)
    assert await lb.exit_code(timeout=15) == 0
    assert time.monotonic() - start < 15  # at once, not after /sleep/30 or shutdown_timeout
    assert lb.logged("SIGTERM again: stopping now") == 1
    with pytest.raises((OSError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(slow, 5)  # cut, not answered
    assert not any(alive(p) for p in pids)
    assert lb.logged("Traceback") == 0


async def test_workers_stop_when_the_supervisor_is_killed(make_backend, start_lbproxy):
    a = await make_backend("A")
    lb = await start_lbproxy([a.address], workers=2)
    pids = await lb.worker_pids()
    lb.proc.kill()  # no chance to stop them: they see their control channel close
    await lb.proc.wait()
    await wait_for(lambda: not any(alive(p) for p in pids), 10, "the orphaned workers to exit")
    assert listening(lb.port) == set()


# ------------------------------------------------------------------------------- arguments


async def test_workers_auto_is_one_per_cpu(make_backend, start_lbproxy):
    a = await make_backend("A")
    lb = await start_lbproxy([a.address], workers="auto")
    st = await lb.status()
    assert len(st["workers"]) == len(os.sched_getaffinity(0))
    assert all(w["serving"] for w in st["workers"])


@pytest.mark.parametrize("value", ["0", "x", "-1", "257"])
async def test_bad_workers_value_exits_2(value, tmp_path):
    path = tmp_path / "lb.yaml"
    write_config(path, lb_doc(["127.0.0.1:1"], free_port(), free_port()))
    proc = await spawn(path, "--workers", value)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 2
    lines = err.decode().splitlines()
    assert lines[-1] == (
        f"lbproxy: error: argument --workers: expected a number 1..256 or 'auto', got {value!r}"
    )
    assert "Traceback" not in err.decode()


async def test_port_zero_listener_with_workers_exits_2(tmp_path):
    path = tmp_path / "lb.yaml"
    doc = config_doc(["127.0.0.1:1"], admin={"bind": f"127.0.0.1:{free_port()}"})
    doc["listeners"].insert(
        0, {"name": "first", "bind": f"127.0.0.1:{free_port()}", "server_group": "rs1"}
    )
    write_config(path, doc)  # listeners[1] ("web") binds port 0
    proc = await spawn(path, "--workers", "2")
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 2
    errors = [line for line in err.decode().splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert errors[0].endswith(
        " ERROR lbproxy: listeners[1].bind: port 0 cannot be shared by workers; name a port"
    )
    assert "Traceback" not in err.decode()


async def test_counters_do_not_go_down_when_a_worker_dies(make_backend, start_lbproxy):
    """A dead worker's counters stay in the sum (Prometheus would read a drop as a reset)."""
    a = await make_backend("A")
    lb = await start_lbproxy([a.address], workers=2)
    await lb.spread(40)
    before = (await lb.metrics()).total("lbproxy_requests_total")
    assert before == 40  # the scrape also records every worker's numbers
    victim = (await lb.worker_pids())[0]
    os.kill(victim, signal.SIGKILL)
    await respawned(lb, 0, victim)
    await wait_for(lambda: serving(lb, 0), 10, "worker 0 serving again")
    m = await lb.metrics()
    assert m.total("lbproxy_requests_total") == before
    await lb.spread(10)
    assert (await lb.metrics()).total("lbproxy_requests_total") == before + 10
