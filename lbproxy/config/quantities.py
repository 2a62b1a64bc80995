"""Leaf values of the config file that are amounts: durations (``30s``, ``500ms``), sizes
(``8KiB``, ``1MiB``), bandwidths (``10MiB/s``), request rates and numbers within bounds (weights,
ports), each a parser and its leaf type (``leaf.Leaf``): ``60`` or ``"30s"``, ``8192`` or
``"8KiB"``.

Pure: no I/O, no YAML; it imports only ``leaf``, ``model`` and ``wire``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Annotated, Any

from .leaf import Leaf
from .model import MAX_WEIGHT, _show

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")


_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``60``, ``60s``, ``500ms``, ``2m``, ``1h`` -> seconds (a positive float)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 60s, 500ms or 2m, got {_show(value)}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise ValueError(f"expected a duration like 60s, 500ms or 2m, got {_show(value)}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected a positive duration, got {_show(value)}")
    return seconds


def _duration_or_zero(value: Any) -> float:
    """A duration that may also be 0 (``0``, ``0s``): "off"."""
    if not isinstance(value, bool):
        m = _DURATION.match(value) if isinstance(value, str) else None
        if value == 0 or (m is not None and float(m.group(1)) == 0):
            return 0.0
    return parse_duration(value)


def _int_in(low: int, high: int) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer {low}..{high}, got {_show(value)}")
        if not low <= value <= high:
            raise ValueError(f"expected an integer {low}..{high}, got {value}")
        return value

    return conv


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a positive number, got {_show(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive number, got {_show(value)}")
    return float(value)


def _above_one(value: Any) -> float:
    """A factor over 1 (a rebalance's tolerance: 1 would move tunnels forever)."""
    number = _positive_number(value)
    if number <= 1:
        raise ValueError(f"must be above 1, got {_show(value)}")
    return number


def _rate(value: Any) -> float:
    """Requests per second: a positive number (``0.5`` is one every two seconds)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a positive number of requests per second, got {_show(value)}")
    if not math.isfinite(value) or not 0 < value <= 1_000_000:
        raise ValueError(f"expected a number of requests per second 0..1000000, got {value}")
    return float(value)


_BANDWIDTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|k|K|KB|KiB|M|MB|MiB|G|GB|GiB)?(?:/s)?\s*$")


_RATE_UNIT = {None: 1, "B": 1, "k": 1 << 10, "K": 1 << 10, "KB": 1 << 10, "KiB": 1 << 10}
_RATE_UNIT.update({"M": 1 << 20, "MB": 1 << 20, "MiB": 1 << 20})
_RATE_UNIT.update({"G": 1 << 30, "GB": 1 << 30, "GiB": 1 << 30})


def parse_bandwidth(value: Any) -> int:
    """``10MiB/s``, ``512KiB/s``, ``1048576`` (bytes per second; K, M, G are binary)."""
    wanted = "expected a bandwidth like 10MiB/s, 512KiB/s or 1048576 (bytes per second)"
    if isinstance(value, bool):
        raise ValueError(f"{wanted}, got {_show(value)}")
    if isinstance(value, int):
        rate = value
    elif isinstance(value, str) and (found := _BANDWIDTH.match(value)):
        rate = int(float(found.group(1)) * _RATE_UNIT[found.group(2)])
    else:
        raise ValueError(f"{wanted}, got {_show(value)}")
    if not 1024 <= rate <= 1 << 40:
        raise ValueError(f"expected a bandwidth of at least 1KiB/s, got {_show(value)}")
    return rate


_SIZE = re.compile(r"^\s*(\d+)\s*(B|k|K|KB|KiB|M|MB|MiB)?\s*$")


_SIZE_UNIT = {None: 1, "B": 1, "k": 1024, "K": 1024, "KB": 1024, "KiB": 1024}
_SIZE_UNIT.update({"M": 1 << 20, "MB": 1 << 20, "MiB": 1 << 20})


def parse_size(value: Any) -> int:
    """``8192``, ``8KiB``, ``8k``, ``1MiB`` -> bytes (K and M are binary: 1024, 1048576)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 8192, 8KiB or 1MiB, got {_show(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _SIZE_UNIT[m.group(2)]
    raise ValueError(f"expected a size like 8192, 8KiB or 1MiB, got {_show(value)}")


def _size(low: int, high: int) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        n = parse_size(value)
        if not low <= n <= high:
            raise ValueError(f"expected a size {low}..{high} bytes, got {n}")
        return n

    return conv


# A server's weight, wherever one is given: the file, discovery, the runtime API.
parse_weight = _int_in(0, MAX_WEIGHT)


# The leaf types.

_DURATION_TEXT = {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"}
_SIZE_TEXT = {"type": "string", "pattern": r"^\s*\d+\s*(B|k|K|KB|KiB|M|MB|MiB)?\s*$"}
_RATE_TEXT = {
    "type": "string",
    "pattern": r"^\s*\d+(\.\d+)?\s*(B|k|K|KB|KiB|M|MB|MiB|G|GB|GiB)?(/s)?\s*$",
}


def _show_size(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def size(low: int, high: int) -> Leaf:
    """Bytes: ``8192``, ``"8KiB"``, ``"1MiB"`` (binary units), from ``low`` to ``high``."""
    number = {"type": "integer", "minimum": low, "maximum": high}
    kind = f"size, {_show_size(low)}..{_show_size(high)}"
    return Leaf(_size(low, high), kind, {"anyOf": [number, _SIZE_TEXT]})


def integer(low: int, high: int) -> Leaf:
    return Leaf(
        _int_in(low, high),
        f"integer {low}..{high}",
        {"type": "integer", "minimum": low, "maximum": high},
    )


Duration = Annotated[
    float,
    Leaf(
        parse_duration,
        "duration",
        {"anyOf": [{"type": "number", "exclusiveMinimum": 0}, _DURATION_TEXT]},
    ),
]
DurationOrZero = Annotated[
    float,
    Leaf(
        _duration_or_zero,
        "duration, 0: off",
        {"anyOf": [{"type": "number", "minimum": 0}, _DURATION_TEXT]},
    ),
]
Weight = Annotated[
    int,
    Leaf(
        _int_in(0, MAX_WEIGHT),
        f"integer 0..{MAX_WEIGHT}",
        {"type": "integer", "minimum": 0, "maximum": MAX_WEIGHT},
    ),
]
Port = Annotated[int, integer(1, 65535)]
PositiveNumber = Annotated[
    float, Leaf(_positive_number, "number > 0", {"type": "number", "exclusiveMinimum": 0})
]
AboveOne = Annotated[
    float, Leaf(_above_one, "number > 1", {"type": "number", "exclusiveMinimum": 1})
]
Rate = Annotated[
    float,
    Leaf(
        _rate,
        "per second, 0..1000000",
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1_000_000},
    ),
]
Bandwidth = Annotated[
    int,
    Leaf(
        parse_bandwidth,
        "bytes per second, 1 KiB/s..1 TiB/s",
        {"anyOf": [{"type": "integer", "minimum": 1024, "maximum": 1 << 40}, _RATE_TEXT]},
    ),
]
Weight_: Leaf = Weight.__metadata__[0]  # type: ignore[attr-defined]
PositiveNumber_: Leaf = PositiveNumber.__metadata__[0]  # type: ignore[attr-defined]
AboveOne_: Leaf = AboveOne.__metadata__[0]  # type: ignore[attr-defined]
DurationOrZero_: Leaf = DurationOrZero.__metadata__[0]  # type: ignore[attr-defined]
