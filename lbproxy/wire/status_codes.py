"""Health checks' expected status codes: the classes and codes a check may accept, and the
parsing of a configured ``expected_codes`` list. Pure (no lbproxy import), so both the config
schema and ``health`` use it without one importing the other."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

# Status classes a check may accept. 1xx is left out on purpose: it is never the final
# response to a check's GET.
CODE_CLASSES: Final[Mapping[str, int]] = {
    "http_2xx": 2,
    "http_3xx": 3,
    "http_4xx": 4,
    "http_5xx": 5,
}
CODE_MIN: Final = 100
CODE_MAX: Final = 599


def is_digits(text: str) -> bool:
    # str.isdigit alone accepts "²" and other non-ASCII digits that int() rejects.
    return text.isascii() and text.isdigit()


def parse_expected_codes(items: Sequence[object]) -> tuple[str | int, ...]:
    """Validate and normalise a configured ``expected_codes`` list.

    Classes come back lower-case ("HTTP_2XX" -> "http_2xx"), digit strings come back as
    ints ("200" -> 200), duplicates are dropped, order is kept. Raises ValueError naming
    the first bad item.
    """
    if isinstance(items, (str, bytes)):
        raise ValueError(f"expected a list of status classes or codes, got the string {items!r}")
    if not items:
        raise ValueError("expected at least one status class or code, got an empty list")
    out: list[str | int] = []
    for index, item in enumerate(items):
        value = _parse_code(item)
        if value is None:
            raise ValueError(
                f"item {index} ({item!r}) is neither a status class "
                f"({', '.join(CODE_CLASSES)}) nor a status code {CODE_MIN}..{CODE_MAX}"
            )
        if value not in out:
            out.append(value)
    return tuple(out)


def _parse_code(item: object) -> str | int | None:
    if isinstance(item, bool):  # an int subclass, but True is not status code 1
        return None
    if isinstance(item, str):
        text = item.strip()
        if not is_digits(text):
            return text.lower() if text.lower() in CODE_CLASSES else None
        item = int(text)
    if isinstance(item, int) and CODE_MIN <= item <= CODE_MAX:
        return item
    return None
