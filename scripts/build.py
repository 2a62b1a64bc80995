"""Keeps this checkout's build of lbproxy current: ``python scripts/build.py [--extra NAME]``.

In a checkout lbproxy is installed editable, and ``setup.py`` compiles the hot modules in
place: ``lbproxy/wire/http1.cpython-*.so`` next to ``lbproxy/wire/http1.py``, where it shadows
the source.
So a compiled module built from older sources would silently run instead of the code being
tested. This script prevents that: it fingerprints everything the build reads (every
``lbproxy/**/*.py``, since mypyc compiles against the types of the interpreted modules too,
``setup.py``, ``pyproject.toml``, the interpreter) and reinstalls, which rebuilds, whenever the
fingerprint differs from the one recorded in ``lbproxy/.build-stamp`` by the last build.
``scripts/test``, ``scripts/demo`` and ``conftest.py`` (before any test imports lbproxy) run it.

``LBPROXY_PURE=1`` asks for the pure-Python build (``setup.py`` then removes the compiled
modules); without it the compiled build is wanted. ``--check`` only reports (exit 1 when a
build is due); ``--pure-tree DIR`` copies the sources without any compiled module to DIR, for
the pure smoke run of ``scripts/test``. Standard library only: it runs in a bare venv.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = ROOT / "lbproxy" / ".build-stamp"
VENV = ROOT / ".venv"


def wanted() -> str:
    return "pure" if os.environ.get("LBPROXY_PURE", "") not in ("", "0") else "compiled"


def fingerprint(root: Path = ROOT) -> str:
    h = hashlib.sha256(sys.version.encode())
    files = [*sorted((root / "lbproxy").rglob("*.py")), root / "setup.py", root / "pyproject.toml"]
    for path in files:
        h.update(b"\0" + path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def compiled_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "lbproxy").iterdir() if p.suffix in (".so", ".pyd"))


def recorded(root: Path = ROOT) -> dict[str, str]:
    try:
        data = json.loads((root / STAMP.relative_to(ROOT)).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def due(kind: str, root: Path = ROOT) -> str | None:
    """Why the in-place build must be remade to be a current ``kind`` build, or None."""
    if kind == "pure" and not compiled_files(root):
        return None  # nothing compiled shadows the sources: they are what runs
    stamp = recorded(root)
    if not stamp:
        return "no build recorded"
    if stamp.get("wanted") != kind:
        return f"the {stamp.get('wanted')} build is installed, the {kind} one is wanted"
    if stamp.get("fingerprint") != fingerprint(root):
        return "the sources changed since the last build"
    if stamp.get("built") == "compiled" and not compiled_files(root):
        return "the compiled modules are gone"
    return None


class BuildFailed(Exception):
    pass


def pip(args: list[str], kind: str, quiet: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    env = dict(os.environ, LBPROXY_PURE="1" if kind == "pure" else "0")
    # setuptools' warning that an editable install is one: this is what is wanted here
    env["PYTHONWARNINGS"] = "ignore:Editable installation:UserWarning"
    done = subprocess.run(cmd, env=env, capture_output=quiet, text=True)
    if done.returncode != 0:
        output = (done.stdout or "") + (done.stderr or "")
        raise BuildFailed(f"building lbproxy ({kind}) failed: {' '.join(cmd)}\n{output[-6000:]}")


def build_requirements() -> list[str]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["build-system"]["requires"])


def install(extra: str, quiet: bool) -> None:
    """The venv gets the build's requirements and ``extra``'s packages, lbproxy editable (pure,
    quickly: the compiled build comes next, once everything it type-checks against is here)."""
    pip(build_requirements(), "pure", quiet)
    pip(["--no-build-isolation", "-e", f"{ROOT}[{extra}]"], "pure", quiet)


def build(kind: str, reason: str, quiet: bool) -> str:
    """Reinstall lbproxy editable, which builds it in place; record and say what was built.

    Without build isolation: mypyc type-checks lbproxy against the packages of this venv, as
    mypy does, and pip needs no minute to set up an environment of its own. ``quiet`` (under
    pytest, which would swallow it anyway): pip's output is shown only if the build fails.
    """
    before = fingerprint()  # an edit made during the build leaves the stamp stale: rebuilt next
    if not quiet:
        print(f"==> building lbproxy ({kind}): {reason}", file=sys.stderr, flush=True)
    started = time.monotonic()
    STAMP.unlink(missing_ok=True)  # a failed build must not look current
    pip(["--no-build-isolation", "--no-deps", "-e", str(ROOT)], kind, quiet)
    built = "compiled" if compiled_files() else "pure"
    STAMP.write_text(json.dumps({"wanted": kind, "built": built, "fingerprint": before}) + "\n")
    summary = f"built lbproxy ({built}) in {time.monotonic() - started:.0f} s: {reason}"
    if built != kind:
        summary += " (the compiled build could not be made: see setup.py's message)"
    if not quiet:
        print(f"==> {summary}", file=sys.stderr, flush=True)
    return summary


def ensure(kind: str, extra: str | None = None, quiet: bool = False) -> str | None:
    """Make the in-place build a current ``kind`` build, and the venv hold ``extra``'s packages.

    Returns what was built, or None when all was current.
    """
    with open(ROOT / "lbproxy" / ".build-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs starting at once build only once
        if extra is not None:
            deps = VENV / f".installed-{extra}"
            pyproject = (ROOT / "pyproject.toml").stat().st_mtime
            if not deps.exists() or pyproject > deps.stat().st_mtime:
                install(extra, quiet)
                deps.touch()
                STAMP.unlink(missing_ok=True)  # that install was the pure build
        reason = due(kind)
        return None if reason is None else build(kind, reason, quiet)


def pure_tree(dest: Path) -> None:
    """A copy of this checkout's sources with no compiled module (and no venv, caches, VCS)."""
    skip = {
        ".venv",
        ".git",
        "build",
        ".demo",
        "__pycache__",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
        ".hypothesis",
        ".build-stamp",
        ".build-lock",
    }

    def ignore(directory: str, names: list[str]) -> set[str]:
        out = {n for n in names if n in skip or n.endswith((".so", ".pyd", ".egg-info"))}
        return out | ({"out"} if Path(directory) == ROOT / "bench" else set())

    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(ROOT, dest, ignore=ignore)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--extra", help="also install this extra's packages (test, backends)")
    p.add_argument("--check", action="store_true", help="exit 1 when a build is due")
    p.add_argument("--pure-tree", type=Path, metavar="DIR", help="copy the pure sources to DIR")
    args = p.parse_args()
    if args.pure_tree:
        pure_tree(args.pure_tree)
        return 0
    if args.check:
        reason = due(wanted())
        print(reason or "current")
        return 1 if reason else 0
    try:
        ensure(wanted(), args.extra)
    except BuildFailed as exc:
        print(f"==> {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
