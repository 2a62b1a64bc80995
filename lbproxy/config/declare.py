"""How a config key is declared, and how pydantic turns a declaration into validation.

A key is one field of a frozen slotted dataclass (``sections``, ``listeners``, ``groups``,
``top``): its type, default and one-line description (``Field(description=...)``) are written
there, and its parsing, bounds and unit come from a ``leaf.Leaf`` (a parser that raises
ValueError with the message for the person editing the file, plus the JSON schema of what it
accepts). pydantic
validates the whole document against those declarations (one ``TypeAdapter``) and reports every
problem at once with its place; a class's rules between keys (``_rules``) run in the same pass.

``declared`` attaches that pass to a dataclass: unknown keys (with "did you mean"), then the
fields, then the rules; every problem becomes one ``config`` error at its place, so the caller
only formats ``place: message``. Validation happens once per load; the objects it returns are
plain dataclasses the hot path reads as cheaply as ever.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler, ValidationError
from pydantic.fields import FieldInfo
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema

from .model import _show

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]
T = TypeVar("T")


class Items:
    """``Annotated`` metadata of a list: refuses anything but a list (``non_empty``: an empty
    one too) with ``expected a list of <noun>, got ...`` before its items are validated."""

    def __init__(self, noun: str, *, non_empty: bool = False) -> None:
        self.noun = noun
        self.non_empty = non_empty

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        def check(value: Any, inner: core_schema.ValidatorFunctionWrapHandler) -> Any:
            if isinstance(value, tuple):
                return inner(value)
            if value is None and not self.non_empty:
                return inner([])  # "servers:" with nothing after it: an empty list
            if not isinstance(value, list) or (self.non_empty and not value):
                some = "a non-empty list" if self.non_empty else "a list"
                what = self.noun if self.noun.startswith("like ") else f"of {self.noun}"
                raise ValueError(f"expected {some} {what}, got {_show(value)}")
            return inner(value)

        return core_schema.no_info_wrap_validator_function(check, handler(source))

    def __get_pydantic_json_schema__(
        self, cs: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        out = handler(cs)
        return {**out, "minItems": 1} if self.non_empty else out


def file_keys(cls: type) -> tuple[str, ...]:
    """The keys the file may give ``cls``, in declaration order: its init fields (under their
    alias when ``Field(alias=...)`` names one) except the internal ones (``_internal``: filled
    in by the loader, never written in the file)."""
    internal: tuple[str, ...] = getattr(cls, "_internal", ())
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in internal:
            continue
        alias = None
        for meta in getattr(hints[f.name], "__metadata__", ()):
            if isinstance(meta, FieldInfo) and meta.alias:
                alias = meta.alias
        out.append(alias or f.name)
    return tuple(out)


def declared(cls: type[T]) -> type[T]:
    """Make the dataclass ``cls`` a section of the file (see the module docstring).

    ``cls._required`` (optional): file key -> what to say after "required" when it is left out.
    ``cls._rules(raw, value)``, if defined, returns the problems between keys: ``raw`` is the
    mapping as written, ``value`` the validated object or None when a field was wrong."""
    hints: Mapping[str, str] = getattr(cls, "_required", {})

    def hook(c: type, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        inner = handler(source)
        keys = file_keys(cls)

        def validate(raw: Any, fields: core_schema.ValidatorFunctionWrapHandler) -> Any:
            if isinstance(raw, cls):
                return raw
            if raw is None:
                raw = {}
            shorthand = getattr(cls, "_shorthand", None)
            if shorthand is not None and isinstance(raw, str):
                raw = {shorthand: raw}  # "- 127.0.0.1:5001" for "- address: 127.0.0.1:5001"
            if not isinstance(raw, Mapping):
                raise ValueError(f"expected a mapping, got {_show(raw)}")
            problems: list[Problem] = []
            for key in raw:
                if not isinstance(key, str) or key not in keys:
                    problems.append(((str(key),), unknown_key(key, keys)))
            value = None
            try:
                value = fields({k: v for k, v in raw.items() if k in keys})
            except ValidationError as exc:
                problems += problems_of(exc, hints)
            rules = getattr(cls, "_rules", None)
            if rules is not None:
                problems += rules(raw, value)
            if problems:
                raise_problems(cls.__name__, problems)
            return value

        # The class's definition name goes to the wrapper, so every use of the class (not only
        # the first) runs these checks.
        ref = cast(dict[str, Any], inner).pop("ref", None)
        return core_schema.no_info_wrap_validator_function(validate, inner, ref=ref)

    cls.__get_pydantic_core_schema__ = classmethod(hook)  # type: ignore[attr-defined]
    return cls


def raise_problems(title: str, problems: list[Problem]) -> None:
    raise ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(
                type=PydanticCustomError("config", "{m}", {"m": message}), loc=loc, input=None
            )
            for loc, message in problems
        ],
    )


def problems_of(exc: ValidationError, hints: Mapping[str, str] | None = None) -> list[Problem]:
    """Each pydantic error of ``exc`` as (place, message) in the config's own words."""
    out: list[Problem] = []
    for e in exc.errors(include_url=False):
        loc: Loc = tuple(e["loc"])
        ctx = e.get("ctx") or {}
        if e["type"] == "config":
            message = str(ctx["m"])
        elif e["type"] == "value_error":
            message = str(ctx["error"])
        elif e["type"] == "missing":
            hint = (hints or {}).get(str(loc[-1])) if loc else None
            message = f"required ({hint})" if hint else "required"
        else:  # a type no leaf of the config produces; kept readable all the same
            message = f"{e['msg'][:1].lower()}{e['msg'][1:]}, got {_show(e['input'])}"
        if loc and loc[-1] == "[key]":  # a mapping's key (a group's name) was refused
            loc, message = (*loc[:-2], loc[-2]), f"bad group name: {message}"
        out.append((loc, message))
    return out


def unknown_key(key: object, allowed: tuple[str, ...]) -> str:
    """The message for a key outside ``allowed``: the closest allowed key first when one is
    close enough to be a typo (``idle_timout`` -> ``idle_timeout``), then every allowed key."""
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.75)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}allowed: {', '.join(allowed)})"


def given(raw: Mapping[str, Any], key: str, parse: Callable[[Any], T]) -> T | None:
    """``raw[key]`` parsed by ``parse``; None when absent or wrong (its field reports that)."""
    if key not in raw:
        return None
    try:
        return parse(raw[key])
    except ValueError:
        return None
