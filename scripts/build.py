"""Keeps this checkout's build of lbproxy current: ``python scripts/build.py [--install]``.

In a checkout lbproxy is installed editable, and ``setup.py`` compiles the hot modules in
place: ``lbproxy/wire/http1.cpython-*.so`` next to ``lbproxy/wire/http1.py``, where it shadows
the source.
So a compiled module built from older sources would silently run instead of the code being
tested. This script prevents that: it fingerprints everything the build reads (every
``lbproxy/**/*.py``, since mypyc compiles against the types of the interpreted modules too,
``setup.py``, ``pyproject.toml``, the interpreter) and reinstalls, which rebuilds, whenever the
fingerprint differs from the one recorded in ``lbproxy/.build-stamp`` by the last build.
``scripts/test``, ``scripts/demo`` and ``conftest.py`` (before any test imports lbproxy) run it.

``--install`` (scripts/test and scripts/demo) first makes ``.venv`` hold exactly the packages of
``requirements.lock`` (``scripts/lock`` writes it: every dependency, extra and build requirement,
hash-checked), whenever the lock's content differs from the one recorded in
``.venv/.installed-lock`` by the last install. Both scripts install the same lock, so one
script's install and build serve the other: ``scripts/test`` then ``scripts/demo`` builds once.

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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = ROOT / "lbproxy" / ".build-stamp"
VENV = ROOT / ".venv"
LOCK_FILE = "requirements.lock"
INSTALLED = ".installed-lock"  # in the venv: the sha256 of the lock it was installed from


def wanted() -> str:
    return "pure" if os.environ.get("LBPROXY_PURE", "") not in ("", "0") else "compiled"


def fingerprint(root: Path = ROOT) -> str:
    h = hashlib.sha256(sys.version.encode())
    pkg = root / "lbproxy"
    sources = sorted([*pkg.rglob("*.py"), *pkg.rglob("*.c")])  # the C scanners too
    files = [*sources, root / "setup.py", root / "pyproject.toml"]
    for path in files:
        h.update(b"\0" + path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()


def compiled_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "lbproxy").rglob("*") if p.suffix in (".so", ".pyd"))


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
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    env = dict(os.environ, LBPROXY_PURE="1" if kind == "pure" else "0")
    # setuptools' warning that an editable install is one: this is what is wanted here
    env["PYTHONWARNINGS"] = "ignore:Editable installation:UserWarning"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    # pip's notes on configured find-links folders that hold no such package: noise here
    output = "".join(
        line
        for line in (done.stdout + done.stderr).splitlines(keepends=True)
        if "is ignored: it is neither a file nor a directory" not in line
    )
    if not quiet:
        print(output, end="", file=sys.stderr, flush=True)
    if done.returncode != 0:
        what = f"pip failed (exit {done.returncode}; lbproxy {kind})"
        raise BuildFailed(f"{what}: {' '.join(cmd)}\n{output[-6000:]}")


def lock_digest(root: Path = ROOT) -> str:
    return hashlib.sha256((root / LOCK_FILE).read_bytes()).hexdigest()


def install_due(root: Path = ROOT, venv: Path = VENV) -> str | None:
    """Why the venv must be installed from the lock again, or None. On the lock's content, not
    its mtime: a checkout, a rebase or a fresh clone touches files without changing them."""
    try:
        installed = (venv / INSTALLED).read_text().strip()
    except OSError:
        return f"no install from {LOCK_FILE} recorded"
    if installed != lock_digest(root):
        return f"{LOCK_FILE} changed since the last install"
    return None


def install(reason: str, quiet: bool, root: Path = ROOT, venv: Path = VENV) -> None:
    """The venv gets every package of the lock, hash-checked, then lbproxy editable without
    its dependencies (pure, quickly: the compiled build comes next, once everything it
    type-checks against is here). The build stamp goes: the build is remade against them."""
    digest = lock_digest(root)  # an edit of the lock during the install: installed again next
    if not quiet:
        print(f"==> installing Python packages from {LOCK_FILE}: {reason}", file=sys.stderr)
    (venv / INSTALLED).unlink(missing_ok=True)  # a failed install must not look current
    (root / STAMP.relative_to(ROOT)).unlink(missing_ok=True)
    pip(["--require-hashes", "-r", str(root / LOCK_FILE)], "pure", quiet)
    pip(["--no-build-isolation", "--no-deps", "-e", str(root)], "pure", quiet)
    (venv / INSTALLED).write_text(digest + "\n")


def build(kind: str, reason: str, quiet: bool, root: Path = ROOT) -> str:
    """Reinstall lbproxy editable, which builds it in place; record and say what was built.

    Without build isolation: mypyc type-checks lbproxy against the packages of this venv, as
    mypy does, and pip needs no minute to set up an environment of its own. ``quiet`` (under
    pytest, which would swallow it anyway): pip's output is shown only if the build fails.
    """
    before = fingerprint(root)  # an edit during the build leaves the stamp stale: rebuilt next
    if not quiet:
        print(f"==> building lbproxy ({kind}): {reason}", file=sys.stderr, flush=True)
    started = time.monotonic()
    stamp = root / STAMP.relative_to(ROOT)
    stamp.unlink(missing_ok=True)  # a failed build must not look current
    pip(["--no-build-isolation", "--no-deps", "-e", str(root)], kind, quiet)
    built = "compiled" if compiled_files(root) else "pure"
    stamp.write_text(json.dumps({"wanted": kind, "built": built, "fingerprint": before}) + "\n")
    summary = f"built lbproxy ({built}) in {time.monotonic() - started:.0f} s: {reason}"
    if built != kind:
        summary += " (the compiled build could not be made: see setup.py's message)"
    if not quiet:
        print(f"==> {summary}", file=sys.stderr, flush=True)
    return summary


def ensure(
    kind: str, packages: bool = False, quiet: bool = False, root: Path = ROOT, venv: Path = VENV
) -> str | None:
    """Make the in-place build a current ``kind`` build and, with ``packages``, the venv hold
    the lock's packages. Returns what was built, or None when all was current.
    """
    with open(root / "lbproxy" / ".build-lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs starting at once build only once
        if packages and (why := install_due(root, venv)) is not None:
            install(why, quiet, root, venv)
        reason = due(kind, root)
        return None if reason is None else build(kind, reason, quiet, root)


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
    p.add_argument(
        "--install", action="store_true", help=f"also install .venv's packages from {LOCK_FILE}"
    )
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
        ensure(wanted(), packages=args.install)
    except BuildFailed as exc:
        print(f"==> {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
