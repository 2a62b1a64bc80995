"""Which build runs (compiled with mypyc, or pure), and the guard against stale compiled code.

The whole suite runs on the compiled build and a smoke run on the pure one (scripts/test);
LBPROXY_EXPECT_BUILD says which of the two this run must be.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import pytest

import lbproxy.proxy.client
from lbproxy import buildinfo
from tests.support import expected_build

REPO = Path(__file__).resolve().parents[2]
# The modules issue 13 measured as the hot path: compiled whenever the build is.
HOT = {
    "wire.http1", "wire.headers", "proxy.client", "proxy.tunnel", "proxy.tunnel_end",
    "proxy.upstream",
    "core.balancer", "core.metrics", "core.snapshot", "core.sticky", "core.rules", "core.health",
    "proxy.access_log", "control.app",
}  # fmt: skip


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_that_runs_is_the_expected_one():
    assert buildinfo.kind() == expected_build()


def test_compiled_build_compiles_every_module_but_the_cold_ones():
    setup = load(REPO / "setup.py", "lbproxy_setup")
    every = {
        setup.module_name(p)
        for p in (REPO / "lbproxy").rglob("*.py")
        if p.name != "__init__.py"  # a package's face: not listed as a module
    }
    cold = {m for m in every if setup.interpreted(REPO / "lbproxy" / (m.replace(".", "/") + ".py"))}
    compiled = set(buildinfo.compiled_modules())
    if expected_build() == buildinfo.PURE:
        assert compiled == set()
        assert lbproxy.proxy.client.__file__.endswith(".py")
        return
    assert compiled == (every - cold) | set(setup.C_EXTENSIONS)
    assert compiled >= HOT
    assert {"run.cli", "config.model", "run.supervisor", "control.admin"} <= cold
    # what the tests imported is the compiled code, not the source next to it
    assert not lbproxy.proxy.client.__file__.endswith(".py")


def test_the_pure_build_is_made_when_asked_or_when_nothing_can_compile(monkeypatch, tmp_path):
    setup = load(REPO / "setup.py", "lbproxy_setup")
    monkeypatch.delenv("LBPROXY_PURE", raising=False)
    monkeypatch.delenv("CC", raising=False)
    assert setup.why_pure() is None  # scripts/test installed gcc and the Python headers
    monkeypatch.setenv("LBPROXY_PURE", "0")
    assert setup.why_pure() is None
    monkeypatch.setenv("LBPROXY_PURE", "1")
    assert setup.why_pure() == "LBPROXY_PURE is set"
    monkeypatch.delenv("LBPROXY_PURE")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc") + " -pthread")
    assert setup.why_pure() == f"no C compiler ({tmp_path / 'no-such-cc'}) found"


@pytest.fixture
def build_script() -> ModuleType:
    return load(REPO / "scripts" / "build.py", "lbproxy_build_script")


def fake_checkout(root: Path) -> None:
    (root / "lbproxy").mkdir()
    (root / "lbproxy" / "http1.py").write_text("x = 1\n")
    (root / "lbproxy" / "config.py").write_text("y = 1\n")
    (root / "setup.py").write_text("")
    (root / "pyproject.toml").write_text("")


def record(script: ModuleType, root: Path, wanted: str) -> None:
    stamp = {"wanted": wanted, "built": wanted, "fingerprint": script.fingerprint(root)}
    (root / "lbproxy" / ".build-stamp").write_text(json.dumps(stamp))


def test_an_edit_of_any_source_makes_the_compiled_build_due(tmp_path, build_script):
    fake_checkout(tmp_path)
    assert build_script.due("compiled", tmp_path) == "no build recorded"
    (tmp_path / "lbproxy" / "http1.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    record(build_script, tmp_path, "compiled")
    assert build_script.due("compiled", tmp_path) is None
    # an interpreted module counts too: mypyc compiles against its types and constants
    for edited in ("lbproxy/http1.py", "lbproxy/config.py", "setup.py", "pyproject.toml"):
        path = tmp_path / edited
        before = path.read_text()
        path.write_text(before + "# edited\n")
        assert build_script.due("compiled", tmp_path) == "the sources changed since the last build"
        path.write_text(before)
        assert build_script.due("compiled", tmp_path) is None
    (tmp_path / "lbproxy" / "exchange.py").write_text("")  # a new module is compiled too
    assert build_script.due("compiled", tmp_path) is not None
    (tmp_path / "lbproxy" / "exchange.py").unlink()
    (tmp_path / "lbproxy" / "http1.cpython-311-x86_64-linux-gnu.so").unlink()
    assert build_script.due("compiled", tmp_path) == "the compiled modules are gone"


def test_switching_between_the_builds_rebuilds(tmp_path, build_script):
    fake_checkout(tmp_path)
    so = tmp_path / "lbproxy" / "http1.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"")
    record(build_script, tmp_path, "compiled")
    # compiled modules would shadow the sources: they must go before a pure run
    assert build_script.due("pure", tmp_path) is not None
    so.unlink()
    record(build_script, tmp_path, "pure")
    assert build_script.due("pure", tmp_path) is None
    assert build_script.due("compiled", tmp_path) is not None
    # with nothing compiled, the sources are what runs: a pure tree is never stale
    (tmp_path / "lbproxy" / "http1.py").write_text("x = 2\n")
    assert build_script.due("pure", tmp_path) is None


def test_the_pure_tree_has_no_compiled_module(tmp_path, build_script):
    dest = tmp_path / "pure"
    build_script.pure_tree(dest)
    assert (dest / "lbproxy" / "proxy" / "client.py").read_bytes() == (
        REPO / "lbproxy" / "proxy" / "client.py"
    ).read_bytes()
    assert (dest / "tests" / "unit" / "test_build.py").exists()
    assert not list((dest / "lbproxy").rglob("*.so"))
    assert not (dest / "lbproxy" / ".build-stamp").exists()
    assert not (dest / ".venv").exists()


def test_scripts_test_and_demo_share_one_install_and_one_build(tmp_path, build_script, monkeypatch):
    """scripts/test then scripts/demo (or the reverse) installs and builds once: both install
    the same lock into the same venv, and the install is redone only when its content changes."""
    scripts = [(REPO / "scripts" / name).read_text() for name in ("test", "demo")]
    calls = [[ln for ln in s.splitlines() if ln.split()[:1] == ["ensure_venv"]] for s in scripts]
    assert calls == [["ensure_venv"], ["ensure_venv"]]  # no per-script extra or argument

    fake_checkout(tmp_path)
    lock = tmp_path / "requirements.lock"
    lock.write_text("aiohttp==3.14.5 \\\n    --hash=sha256:" + "0" * 64 + "\n")
    venv = tmp_path / ".venv"
    venv.mkdir()
    so = tmp_path / "lbproxy" / "http1.cpython-311-x86_64-linux-gnu.so"
    pips: list[tuple[str, str]] = []

    def pip(args: list[str], kind: str, quiet: bool) -> None:  # what setup.py would leave
        pips.append((kind, " ".join(a for a in args if a.startswith("-"))))
        if "-e" in args:
            so.write_bytes(b"") if kind == "compiled" else so.unlink(missing_ok=True)

    monkeypatch.setattr(build_script, "pip", pip)

    def run_script() -> list[tuple[str, str]]:  # what ensure_venv does: build.py --install
        pips.clear()
        build_script.ensure("compiled", packages=True, quiet=True, root=tmp_path, venv=venv)
        return list(pips)

    everything = [
        ("pure", "--require-hashes -r"),
        ("pure", "--no-build-isolation --no-deps -e"),
        ("compiled", "--no-build-isolation --no-deps -e"),
    ]
    assert run_script() == everything  # the first script on a fresh checkout
    assert run_script() == []  # the other script: nothing to install, nothing to build
    assert build_script.ensure("compiled", quiet=True, root=tmp_path, venv=venv) is None  # pytest
    later = lock.stat().st_mtime + 100
    os.utime(lock, (later, later))  # touched (a checkout, a fresh clone), not changed
    assert run_script() == []
    lock.write_text(lock.read_text().replace("3.14.5", "3.14.6"))
    changed = "requirements.lock changed since the last install"
    assert build_script.install_due(tmp_path, venv) == changed
    assert run_script() == everything  # and the build is remade against the new packages
    assert run_script() == []
