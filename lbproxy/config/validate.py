"""``parse_config(document)``: a parsed YAML document into the model, every problem at once.

pydantic validates the document against the declarations (``top.CONFIG``); each problem comes
back with its place, written as the file is (``server_groups.rs1.servers[1].address``), and
the list is put in the order the document is written (a left-out key sorts after its
parent's keys), so the file reads top to bottom.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .declare import Loc, problems_of
from .groups import ServerChange
from .model import ConfigError
from .top import CONFIG, Config

SERVER_CHANGE: TypeAdapter[ServerChange] = TypeAdapter(ServerChange)


def parse_config(doc: Any) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem found."""
    if doc is None:
        raise ConfigError(["the config file is empty"])
    try:
        return CONFIG.validate_python(doc)
    except ValidationError as exc:
        problems = sorted(problems_of(exc), key=lambda p: _position(doc, p[0]))
        raise ConfigError([_problem(loc, message) for loc, message in problems]) from None


def _problem(loc: Loc, message: str) -> str:
    place = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).removeprefix(".")
    return f"{place}: {message}" if place else message


def _position(doc: Any, loc: Loc) -> tuple[int, ...]:
    """Where ``loc`` is written in ``doc``: the index of each step in its mapping or list; a
    step the document does not have (a required key left out) sorts after what it has, and a
    problem of a whole section after those inside it."""
    out: list[int] = []
    node = doc
    for step in loc:
        if isinstance(node, Mapping) and step in node:
            out.append(list(node).index(step))
            node = node[step]
        elif isinstance(node, list) and isinstance(step, int) and step < len(node):
            out.append(step)
            node = node[step]
        else:
            out.append(len(node) if isinstance(node, Mapping | list) else 0)
            return tuple(out)
    # A problem of a whole section comes after the problems inside it.
    return (*out, 1 << 30) if isinstance(node, Mapping | list) else tuple(out)


def parse_server_change(body: Any) -> tuple[list[str], ServerChange | None]:
    """A runtime API body (``admin``): (problems, the change); every problem at once."""
    try:
        return [], SERVER_CHANGE.validate_python(body)
    except ValidationError as exc:
        return [_problem(loc, message) for loc, message in problems_of(exc)], None
