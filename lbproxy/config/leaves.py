"""The leaf types of the config file, for declarations: each is ``Annotated[<runtime type>,
Leaf(<units parser>, <kind>, <JSON schema>)]``, so a key's type says at once how it is parsed,
its bounds and unit, and what an editor may offer (``60``, ``"30s"``; ``8192``, ``"8KiB"``).
"""

from __future__ import annotations

from typing import Annotated, Any

from ..wire.cidrs import IPNetwork
from .declare import Leaf
from .model import MAX_WEIGHT, Address
from .units import (
    _admin_host,
    _bool,
    _check_host,
    _choice,
    _cidr,
    _codes,
    _cookie_name,
    _dns_name,
    _drain_code,
    _duration_or_zero,
    _env_name,
    _file_path,
    _int_in,
    _media_types,
    _name,
    _path,
    _positive_number,
    _prefix,
    _rate,
    _resolver,
    _rule_host,
    _secret,
    _size,
    _slb_id,
    _string,
    _token,
    parse_address,
    parse_bandwidth,
    parse_duration,
)

_DURATION_TEXT = {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"}
_SIZE_TEXT = {"type": "string", "pattern": r"^\s*\d+\s*(B|k|K|KB|KiB|M|MB|MiB)?\s*$"}
_RATE_TEXT = {
    "type": "string",
    "pattern": r"^\s*\d+(\.\d+)?\s*(B|k|K|KB|KiB|M|MB|MiB|G|GB|GiB)?(/s)?\s*$",
}
_ADDRESS = {"type": "string", "pattern": r"^\s*(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):\d+\s*$"}
_STR = {"type": "string"}


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


def choice(*choices: str) -> Leaf:
    return Leaf(_choice(*choices), "one of " + ", ".join(choices), {"enum": list(choices)})


def _bind(value: Any) -> Address:
    return parse_address(value, allow_port_zero=True)


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
Bool = Annotated[bool, Leaf(_bool, "true or false", {"type": "boolean"})]
Name = Annotated[str, Leaf(_name, "name", {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+$"})]
String = Annotated[str, Leaf(_string, "string", _STR)]
FilePath = Annotated[str, Leaf(_file_path, "file path", {"type": "string", "minLength": 1})]
EnvName = Annotated[
    str, Leaf(_env_name, "variable name", {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"})
]
AdminHost = Annotated[str, Leaf(_admin_host, "host name or IP", _STR)]
UrlPath = Annotated[str, Leaf(_path, "path", {"type": "string", "pattern": "^/"})]
Prefix = Annotated[str, Leaf(_prefix, "path prefix", {"type": "string", "pattern": "^/"})]
Token = Annotated[str, Leaf(_token, "token", {"type": "string", "minLength": 1})]
CheckHost = Annotated[str, Leaf(_check_host, "host", _STR)]
RuleHost = Annotated[str, Leaf(_rule_host, "host or *.domain", _STR)]
CookieName = Annotated[str, Leaf(_cookie_name, "cookie name", _STR)]
Secret = Annotated[
    str, Leaf(_secret, "secret, 16+ characters", {"type": "string", "minLength": 16})
]
SlbId = Annotated[str, Leaf(_slb_id, "visible ASCII", {"type": "string", "maxLength": 256})]
DnsName = Annotated[str, Leaf(_dns_name, "DNS name", _STR)]
Address_ = Annotated[Address, Leaf(parse_address, "host:port", _ADDRESS)]
BindAddress = Annotated[Address, Leaf(_bind, "host:port (port 0: any)", _ADDRESS)]
Resolver = Annotated[
    Address,
    Leaf(_resolver, "ip or ip:port", {"type": "string"}),
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
MediaTypes = Annotated[
    frozenset[str],
    Leaf(_media_types, "list of media types", {"type": "array", "items": {"type": "string"}}),
]
Codes = Annotated[
    tuple[str | int, ...],
    Leaf(
        _codes,
        "list of http_2xx..http_5xx or codes",
        {
            "type": "array",
            "minItems": 1,
            "items": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        },
    ),
]
DrainCode = Annotated[int, Leaf(_drain_code, "1001 or 1012", {"enum": [1001, 1012]})]
Cidr = Annotated[IPNetwork, Leaf(_cidr, "CIDR", {"type": "string"})]


# The same leaves for keys whose default is None: a null written in the file is still refused.
RuleHost_: Leaf = RuleHost.__metadata__[0]  # type: ignore[attr-defined]
FilePath_: Leaf = FilePath.__metadata__[0]  # type: ignore[attr-defined]
Bool_: Leaf = Bool.__metadata__[0]  # type: ignore[attr-defined]
Weight_: Leaf = Weight.__metadata__[0]  # type: ignore[attr-defined]
