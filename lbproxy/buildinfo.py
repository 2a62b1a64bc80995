"""Which build of lbproxy runs: the hot modules compiled with mypyc, or every module pure Python.

Owns the answer that ``lbproxy --version``, ``/status`` and the status page give. The build is
chosen when lbproxy is installed (``setup.py``); here it is only observed: a module the import
system loads from a C extension is a compiled one.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import pkgutil
from functools import cache

COMPILED = "compiled (mypyc)"
PURE = "pure"


@cache
def compiled_modules() -> tuple[str, ...]:
    """The modules of the lbproxy package that load (or were loaded) as compiled extensions."""
    from . import __path__ as package_path

    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    names = []
    # Every module of every layer subpackage (walking imports the packages: their faces only).
    for info in pkgutil.walk_packages(package_path, prefix=f"{__package__}."):
        if info.name.endswith("__mypyc") or info.ispkg:  # mypyc's shared library; a package
            continue
        spec = importlib.util.find_spec(info.name)
        if spec is not None and spec.origin is not None and spec.origin.endswith(suffixes):
            names.append(info.name.removeprefix(f"{__package__}."))
    return tuple(sorted(names))


def kind() -> str:
    """``"compiled (mypyc)"`` or ``"pure"``."""
    return COMPILED if compiled_modules() else PURE
