"""Loaded by pytest before any test module imports lbproxy.

A compiled module next to its source shadows it (see scripts/build.py), so this rebuilds the
in-place build whenever a source changed since it was made: no test ever runs stale compiled
code. It keeps the kind of build the checkout has (compiled, or pure after
``LBPROXY_PURE=1 scripts/test``), tells the tests which one that is (``LBPROXY_EXPECT_BUILD``,
unless scripts/test already said) and shows it in pytest's header.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any


def _build_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "lbproxy_build_script", Path(__file__).parent / "scripts" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build = _build_script()
_kind = str(_build.recorded().get("wanted") or ("compiled" if _build.compiled_files() else "pure"))
_rebuilt = _build.ensure(_kind, quiet=True)
os.environ.setdefault("LBPROXY_EXPECT_BUILD", str(_build.recorded().get("built") or _kind))


def pytest_report_header() -> str:
    from lbproxy import buildinfo

    compiled = len(buildinfo.compiled_modules())
    header = f"lbproxy build: {buildinfo.kind()} ({compiled} modules compiled)"
    return f"{header}; {_rebuilt}" if _rebuilt else header
