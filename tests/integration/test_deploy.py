"""``deploy/`` (issue 14): the systemd unit and its user, checked as systemd would.

- ``systemd-analyze verify`` finds nothing to say about the unit (with ExecStart pointing at
  this checkout's console script, the one change an installer makes); a typo would be found;
- the unit's own ExecStart and ExecReload lines, run as systemd runs them: READY=1 on the
  notify socket once serving (``Type=notify``), the ExecReload command reloads, SIGTERM
  (systemd's stop) sends STOPPING=1 and exits 0;
- ``systemd-sysusers`` creates the dedicated user from ``deploy/lbproxy.sysusers``.

``systemd`` (systemd-analyze, systemd-sysusers) is installed by scripts/test; PID 1 need not
be systemd.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.support import config_doc, free_port, wait_for

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "lbproxy.service"
SYSUSERS = REPO / "deploy" / "lbproxy.sysusers"
INSTALLED = "/usr/local/bin/lbproxy"
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "lbproxy")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: scripts/test installs it (apt-get install systemd)")
    return path


def unit_lines(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of the unit by key (every occurrence, in order)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def installed_copy(tmp_path: Path, text: str | None = None) -> Path:
    """The unit as installed here: ExecStart names this checkout's console script."""
    text = UNIT.read_text() if text is None else text
    assert INSTALLED in text
    path = tmp_path / "lbproxy.service"
    path.write_text(text.replace(INSTALLED, CONSOLE_SCRIPT))
    return path


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), "verify", str(path)],
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    r = verify(installed_copy(tmp_path))
    assert (r.returncode, r.stdout + r.stderr) == (0, "")
    # Not vacuous: a misspelt key is reported.
    typo = UNIT.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHoem=yes")
    r = verify(installed_copy(tmp_path, typo))
    assert "Unknown key 'ProtectHoem'" in r.stdout + r.stderr


def test_unit_settings_the_issue_asks_for() -> None:
    keys = unit_lines(UNIT.read_text())
    assert keys["Type"] == ["notify"]
    assert keys["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert keys["User"] == ["lbproxy"] and keys["Group"] == ["lbproxy"]
    assert keys["ProtectSystem"] == ["strict"] and keys["NoNewPrivileges"] == ["yes"]
    assert int(keys["LimitNOFILE"][0]) >= 65536


async def test_the_units_commands_notify_reload_and_stop(make_backend, tmp_path: Path) -> None:
    backend = await make_backend("A")
    port, admin = free_port(), free_port()
    config = tmp_path / "lb.yaml"
    doc = config_doc([backend.address], listener={"bind": f"127.0.0.1:{port}"})
    doc["admin"] = {"bind": f"127.0.0.1:{admin}"}
    config.write_text(yaml.safe_dump(doc))
    keys = unit_lines(UNIT.read_text())
    (start,) = keys["ExecStart"]
    argv = shlex.split(start.replace(INSTALLED, CONSOLE_SCRIPT))
    argv[argv.index("--config") + 1] = str(config)

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    messages: list[str] = []
    loop = asyncio.get_running_loop()
    loop.add_reader(notify.fileno(), lambda: messages.append(notify.recv(4096).decode()))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_for(lambda: "READY=1" in messages, 20, "READY=1 from lbproxy")
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{port}/whoami") as r,
        ):
            assert await r.text() == "A"  # ready means serving

        (reload,) = keys["ExecReload"]
        cmd = shlex.split(reload.replace("$MAINPID", str(proc.pid)))
        assert subprocess.run(cmd, check=False, timeout=10).returncode == 0
        assert proc.stderr is not None
        seen: list[str] = []

        async def logged(text: str) -> bool:
            while not any(text in line for line in seen):
                seen.append((await proc.stderr.readline()).decode())  # type: ignore[union-attr]
            return True

        await asyncio.wait_for(logged("reload (SIGHUP)"), 20)
        proc.send_signal(signal.SIGTERM)  # what `systemctl stop` sends
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        await wait_for(lambda: "STOPPING=1" in messages, 5, "STOPPING=1")
        assert messages == ["READY=1", "STOPPING=1"]
    finally:
        loop.remove_reader(notify.fileno())
        notify.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_sysusers_creates_the_dedicated_user(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = subprocess.run(
        [tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    users = {
        line.split(":")[0]: line.split(":")
        for line in (root / "etc/passwd").read_text().splitlines()
    }
    assert users["lbproxy"][6] == "/usr/sbin/nologin"
    groups = (root / "etc/group").read_text()
    assert any(line.startswith("lbproxy:") for line in groups.splitlines())
