"""The reader that validation walks the document with: it records a problem (``place:
message``) instead of raising, so one run reports everything wrong with the file."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from .units import _show

T = TypeVar("T")

MISSING = object()


class Reader:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}" if path else message)

    def mapping(
        self, value: Any, path: str, allowed: tuple[str, ...] | None
    ) -> Mapping[str, Any] | None:
        """``value`` as a mapping; every key outside ``allowed`` (None: any) is reported."""
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.error(path, f"expected a mapping, got {_show(value)}")
            return None
        if allowed is not None:
            for key in value:
                if not isinstance(key, str) or key not in allowed:
                    where = f"{path}.{key}" if path else str(key)
                    self.error(where, unknown_key(key, allowed))
        return value

    def get(
        self,
        m: Mapping[str, Any],
        key: str,
        path: str,
        conv: Callable[[Any], T],
        default: T | object = MISSING,
    ) -> T | None:
        where = f"{path}.{key}" if path else key
        if key not in m:
            if default is MISSING:
                self.error(where, "required")
                return None
            return default  # type: ignore[return-value]
        try:
            return conv(m[key])
        except ValueError as exc:
            self.error(where, str(exc))
            return None


def unknown_key(key: object, allowed: tuple[str, ...]) -> str:
    """The message for a key outside ``allowed``: the closest allowed key first when one is
    close enough to be a typo (``idle_timout`` -> ``idle_timeout``), then every allowed key."""
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.75)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key ({hint}allowed: {', '.join(allowed)})"
