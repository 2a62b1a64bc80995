"""The package layout is the architecture, and this test holds it.

``lbproxy/`` has one subpackage per layer, from the top down:

- ``run/``      the process: command line, supervisor, worker entry point;
- ``control/``  what runs around the data path: the application, reloads, runtime server
  control, drains, health checkers, DNS discovery, the admin listener;
- ``proxy/``    the data path: sockets, HTTP/1 and HTTP/2 fronts, exchanges, tunnels, pools;
- ``core/``     the pure core: decisions and state in plain Python (no event loop, no sockets);
- ``config/``   the config schema, declared once, and its loader;
- ``wire/``     byte formats: HTTP/1 heads, WebSocket frames, header rules.

A module imports only from its own layer or the layers below it (function-level and
type-checking imports included), never in a circle; the pure layers import no I/O library;
and the import stack stays shallow.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "lbproxy"

# Top to bottom. Top-level modules: the entry point above everything, the rest at the bottom.
LAYERS = ("__main__", "run", "control", "proxy", "core", "config", "wire", "buildinfo", "__init__")
PURE = ("core", "config", "wire")
IO_LIBRARIES = ("asyncio", "ssl", "uvloop", "aiohttp", "selectors")
# Modules on the longest chain of imports that run: 15 in the flat package this replaced, 14
# after the first cut into layers, 9 after the second, 8 now. Chains 8 long: the config's
# (__main__, cli, then loading, admin or doc, top, listeners, sections, words, wire: the
# declarations nest as the file does, over the leaf kinds, which import only leaf, model and
# wire) and the data path's (__main__, cli, app, client or http2, exchange, dispatch,
# exchange_base, wire.http1). The app is given what sits on top of it rather than importing it
# (its config file as ``loading.ConfigFile``, its listeners' front ends as ``Fronts``); the
# imports of annotations alone are made for type checking only. The core's chain is snapshot
# (3). A ratchet: it may only go down.
MAX_DEPTH = 8
# A module a reader can hold in mind, a class that owns one thing: about 600 and 300 lines.
# Byte parsers written out for speed may be longer, each saying so in its docstring.
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 300
LONG_PARSERS = ("lbproxy.wire.http1",)


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    if node.module:
        return [".".join([*base, node.module])]
    return [".".join(base)]


def _nodes(tree: ast.AST, runtime: bool) -> list[ast.AST]:
    """Every node, or (``runtime``) those outside ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        found.append(node)
        if runtime and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def _graph(runtime: bool = False) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each module's lbproxy imports (as modules that exist), and its top-level libraries;
    ``runtime``: only the imports that run (not those for type checking alone)."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    libraries: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        libs: set[str] = set()
        for node in _nodes(ast.parse(path.read_text()), runtime):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                targets = _resolve(name, path.name == "__init__.py", node)
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("lbproxy"):
                    targets = [node.module]
                else:
                    libs.add(node.module.split(".")[0])
            if isinstance(node, ast.ImportFrom) and len(targets) == 1:
                # "from pkg import a, b": the submodules a and b where they exist, else pkg
                subs = [f"{targets[0]}.{a.name}" for a in node.names]
                if all(s in files for s in subs):
                    targets = subs
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("lbproxy"):
                        targets.append(a.name)
                    else:
                        libs.add(a.name.split(".")[0])
            for t in targets:
                # "from .x import name": the module x, or the submodule x.name if one exists
                if t in files and t != name:
                    deps.add(t)
        graph[name] = deps
        libraries[name] = libs
    return graph, libraries


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return [*path[path.index(d) :], d]
            if d not in state and (found := visit(d)) is not None:
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)) is not None:
            return found
    return None


def _longest(graph: dict[str, set[str]]) -> list[str]:
    """The longest import path (the graph has no circle)."""
    memo: dict[str, list[str]] = {}

    def down(m: str) -> list[str]:
        if m not in memo:
            below = [down(d) for d in graph.get(m, ())]
            memo[m] = [m, *max(below, key=len, default=[])]
        return memo[m]

    return max((down(m) for m in graph), key=len)


def test_every_module_sits_in_a_layer() -> None:
    graph, _ = _graph()
    assert {"lbproxy.run.cli", "lbproxy.proxy.exchange", "lbproxy.core.snapshot"} <= set(graph)
    strays = sorted(m for m in graph if _layer(m) not in LAYERS)
    assert not strays, f"modules outside the layers {LAYERS}: {strays}"


def test_imports_only_go_down() -> None:
    graph, _ = _graph()
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = sorted(
        f"{m} ({_layer(m)}) imports {d} ({_layer(d)})"
        for m, deps in graph.items()
        for d in deps
        if rank[_layer(d)] < rank[_layer(m)]
    )
    assert not upward, "imports that run back up:\n" + "\n".join(upward)


def test_the_module_graph_has_no_circle() -> None:
    graph, _ = _graph()
    circle = _cycle(graph)
    assert circle is None, " -> ".join(circle or ())


def test_the_pure_layers_import_no_io() -> None:
    _, libraries = _graph()
    io = sorted(
        f"{m} imports {lib}"
        for m, libs in libraries.items()
        if _layer(m) in PURE
        for lib in libs
        if lib in IO_LIBRARIES
    )
    assert not io, "\n".join(io)


def test_the_import_stack_is_shallow() -> None:
    """Counted over the imports that run: one made for type checking alone loads nothing."""
    graph, _ = _graph(runtime=True)
    path = _longest(graph)
    assert len(path) <= MAX_DEPTH, " -> ".join(path)


def test_no_module_or_class_is_too_long() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module(path)
        text = path.read_text()
        lines = text.count("\n")
        if name in LONG_PARSERS:
            doc = ast.get_docstring(ast.parse(text)) or ""
            assert "long" in doc, f"{name}: a long parser says why in its docstring"
        elif lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None:
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_long.append(f"{name}.{node.name}: {size} lines")
    assert not too_long, "\n".join(too_long)


def test_the_checks_find_what_they_look_for() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert _longest({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"c"}}) == ["a", "b", "c"]
    assert _layer("lbproxy.proxy.tunnel") == "proxy"
    assert _layer("lbproxy.buildinfo") == "buildinfo"
