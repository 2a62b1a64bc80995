"""Reading a config file: the only place that opens it and parses YAML.

``load_yaml`` parses the YAML (refusing a key given twice); ``with_lines`` gives each problem
found in the document the file and line it comes from (``lb.yaml:14:
server_groups.rs1.servers[1].address: ...``): the document is composed a second time with its
node marks and each problem's place is walked down that tree. Validating the document
(``top.parse_config``), digesting the bytes and checking the certificate files a config names
happen above this layer (``control.loading``, with ``proxy.tls``), so this module imports no
declaration and sits low.

Kept apart from the model so a module that only wants ``Address`` never imports yaml.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .model import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a key given twice in one mapping (plain YAML keeps the last one, so a
    second ``rs1:`` group or a second ``bind:`` would silently replace the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor" merges; keys it brings may be overridden
            key = self.construct_object(key_node, deep=deep)
            try:
                line = first.get(key)
            except TypeError:
                continue  # unhashable: SafeConstructor reports it
            if line is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {line})", key_node.start_mark
                )
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_config_file(path: str) -> bytes:
    """The config file's bytes; a missing or unreadable file is a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from None


def load_yaml(raw: bytes, path: str = "<config>") -> Any:
    """The YAML document in config file bytes (``path`` names them in messages); a syntax
    error or a key given twice is a ConfigError at its line and column."""
    try:
        doc = yaml.load(raw, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError([f"{where}: YAML syntax error: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML error: {exc}"]) from None
    return doc


# A problem's place: dotted keys and [i] indexes, then ": " and the message.
_PLACE = re.compile(r"^([A-Za-z0-9_.\-\[\]]+): ")


def with_lines(problems: list[str], raw: bytes, path: str) -> list[str]:
    """``problems`` (``place: message``) as ``path:line: place: message``, the line being where
    the place is written, or where its nearest written parent is (a required key left out)."""
    try:
        root = yaml.compose(raw, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None  # the document loaded once already; never expected, but lines are a bonus
    out = []
    for problem in problems:
        found = _PLACE.match(problem)
        line = line_of(root, found.group(1)) if found and root is not None else None
        if line is None and root is not None:
            line = root.start_mark.line + 1
        out.append(f"{path}:{line}: {problem}" if line is not None else f"{path}: {problem}")
    return out


def line_of(node: yaml.Node | None, place: str) -> int | None:
    """The 1-based line of ``place`` (``server_groups.rs1.servers[1].address``) in the tree
    under ``node``: the deepest node of the place that the file has."""
    if node is None:
        return None
    line = node.start_mark.line + 1
    rest = place
    while rest:
        if rest.startswith("["):
            end = rest.find("]")
            index = rest[1:end]
            if not isinstance(node, yaml.SequenceNode) or not index.isdigit():
                break
            items = node.value
            if int(index) >= len(items):
                break
            node = items[int(index)]
            line = node.start_mark.line + 1
            rest = rest[end + 1 :].removeprefix(".")
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        # A group name may hold dots: take the longest key that the place starts with.
        best: tuple[yaml.Node, yaml.Node] | None = None
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if (
                isinstance(key, str)
                and rest.startswith(key)
                and rest[len(key) : len(key) + 1] in ("", ".", "[")
                and (best is None or len(key) > len(best[0].value))
            ):
                best = (key_node, value_node)
        if best is None:
            break
        line = best[0].start_mark.line + 1
        node = best[1]
        rest = rest[len(best[0].value) :].removeprefix(".")
    return line
