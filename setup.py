"""Builds lbproxy: the hot modules compiled with mypyc, or every module as pure Python.

Every module of ``lbproxy/`` (subpackages too) is compiled except those in ``INTERPRETED`` (the
cold ones: run once at start or reload, or only for the operator; compiling them buys nothing;
a subpackage named there is interpreted whole), so a module added later is compiled by
default. All compiled modules share one C extension (``lbproxy/_mypyc__mypyc*.so``) so that
calls between them stay native.

The pure-Python build (the same sources, interpreted) is made instead when ``LBPROXY_PURE=1``
is set, or when no C compiler or no Python headers are found (``gcc`` and ``python3-dev`` on
Debian). A pure build in place (an editable install) also removes the compiled modules an
earlier one left next to the sources, since those would shadow them.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import setup  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent
PACKAGE = ROOT / "lbproxy"
INTERPRETED = frozenset(
    {
        "__init__",
        "__main__",
        "buildinfo",
        "config",  # the package: model, validation, loading (once per start or reload)
        "run",  # the command line, the supervisor, the worker's start, the signals
        # control: what runs at start, on a reload, on a timer or for the operator
        "control.admin",
        "control.admin_guard",
        "control.checker",
        "control.cluster",  # Redis, on a timer
        "control.discovery",  # DNS lookups on a timer (its decisions: core.dns, drain too)
        "control.drain",
        "control.fleet_member",  # at start and reload; its record, twice a second
        "control.fleet_shed",  # a shed asked (the operator), the young ones read twice a second
        "control.history",  # the history's timer, every few seconds (its arithmetic: core.history)
        "control.ramp",  # slow starts: a timer a few dozen times per window
        "control.rebalance",  # a look once a second, closes spread over it
        "control.loading",
        "control.reload",
        "control.shutdown",  # once, at the end
        "control.status_charts",
        "control.status_page",
        "control.sweep",  # a timer, every half keep-alive
        "core.dns",
        "core.fleet",  # the fleet's records and merges, twice a second (control.cluster)
        "core.history",  # a few hundred numbers every 5 s, and for the operator
        "proxy.tls",
        # a subclass of ssl.SSLContext (a compiled class cannot subclass it); per new
        # backend connection only
        "proxy.upstream_tls",
        # the layer packages' faces (a docstring each; the package name alone would mean all of it)
        "control.__init__",
        "core.__init__",
        "proxy.__init__",
        "wire.__init__",
    }
)
# Plain C extensions of the compiled build (the head scanner, the accept loop; each has its
# Python path for the pure build, chosen at import): module name -> source.
C_EXTENSIONS = {
    "wire._headscan": "lbproxy/wire/_headscan.c",
    "proxy._accept": "lbproxy/proxy/_accept.c",
}
GROUP = "lbproxy._mypyc"  # the shared library of every compiled module: lbproxy/_mypyc__mypyc*.so


def module_name(path: Path) -> str:
    """``lbproxy/config/load.py`` -> ``config.load``; ``lbproxy/run/cli.py`` -> ``cli``."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def interpreted(path: Path) -> bool:
    """A module listed in INTERPRETED, or any module of a subpackage listed there (``config``
    covers ``config/__init__.py``, ``config/load.py``...)."""
    parts = module_name(path).split(".")
    return any(".".join(parts[:n]) in INTERPRETED for n in range(1, len(parts) + 1))


def compiled_sources() -> list[str]:
    return sorted(
        p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py") if not interpreted(p)
    )


def why_pure() -> str | None:
    """None when the compiled build can be made, else why not."""
    if os.environ.get("LBPROXY_PURE", "") not in ("", "0"):
        return "LBPROXY_PURE is set"
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc}) found"
    include = sysconfig.get_paths()["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        return f"no Python headers ({include}/Python.h) found"
    return None


def building_in_place() -> bool:
    """An editable install (or ``build_ext --inplace``): the build lands next to the sources."""
    return "editable_wheel" in sys.argv or bool({"--inplace", "-i"} & set(sys.argv))


def remove_inplace_builds() -> None:
    for p in PACKAGE.rglob("*"):
        if p.suffix in (".so", ".pyd"):
            p.unlink()


def ext_modules() -> list[object]:
    if sys.argv[1:2] in (["egg_info"], ["dist_info"], ["sdist"]):
        return []  # pip asks for metadata first: no need to run mypyc for it (about 30 s)
    reason = why_pure()
    if reason is not None:
        print(f"lbproxy: building the pure-Python build ({reason})", file=sys.stderr)
        if building_in_place():
            remove_inplace_builds()
        return []
    from mypyc.build import mypycify

    os.chdir(ROOT)  # mypyc takes paths relative to the project and reads its mypy config
    print("lbproxy: compiling the hot modules with mypyc", file=sys.stderr)
    # --warn-unreachable: mypyc trusts mypy's narrowing, so code that mypy takes for unreachable
    # (say `self.x is not None` after a loop on `self.x is None` whose body set it through a
    # method) is compiled as unreachable: the build refuses it rather than miscompile it.
    mypy_args = ["--warn-unreachable"]
    sources = compiled_sources()
    if not sources:  # mypyc would fall back to mypy's own file list and compile all of that
        raise SystemExit("lbproxy: INTERPRETED leaves no module to compile (setup.py)")
    from setuptools import Extension

    scanners = [
        Extension(f"lbproxy.{name}", [src], extra_compile_args=["-O2"])
        for name, src in C_EXTENSIONS.items()
    ]
    return [*mypycify([*mypy_args, *sources], opt_level="3", group_name=GROUP), *scanners]


if __name__ == "__main__":  # setuptools runs it so; tests import it for INTERPRETED
    setup(ext_modules=ext_modules())
