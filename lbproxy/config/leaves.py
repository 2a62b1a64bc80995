"""Leaf values of the config file: durations (``30s``), sizes (``1MiB``), bandwidths
(``10MiB/s``), addresses, names, paths, CIDRs... each parsed by a function from a YAML value to
the runtime value that raises ValueError with a message written for the person editing the
file, and declared as a leaf type ``Annotated[<runtime type>, Leaf(<parser>, <kind>, <JSON
schema>)]``, so a key's type says at once how it is parsed, its bounds and unit, and what an
editor may offer (``60``, ``"30s"``; ``8192``, ``"8KiB"``).

Pure: no I/O, no YAML. It imports no other declaration module (only ``model`` and ``wire``), so
the declarations (``sections``, ``groups``, ``listeners``, ``top``) sit right above it.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from ..wire.cidrs import IPNetwork
from ..wire.status_codes import parse_expected_codes
from .model import DNS_PORT, MAX_WEIGHT, MIN_STICKY_SECRET, Address, _show


class Leaf:
    """``Annotated`` metadata of a leaf value: ``parse`` validates and converts it (its
    ValueError is the problem's message), ``schema`` is the JSON schema of what it accepts and
    ``kind`` names it in the README (``duration``, ``size 64 B..1 MiB``...)."""

    def __init__(self, parse: Callable[[Any], Any], kind: str, schema: dict[str, Any]) -> None:
        self.parse = parse
        self.kind = kind
        self.schema = schema

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(self.parse)

    def __get_pydantic_json_schema__(
        self, cs: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {**self.schema, "x-kind": self.kind}


# The parsers.

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


_HOST = re.compile(r"[A-Za-z0-9._-]+")  # a DNS name (docker-style '_' too) or an IPv4 address


def parse_address(value: Any, *, allow_port_zero: bool = False) -> Address:
    """``host:port`` or ``[v6]:port`` -> Address. Port 0 (any free port) only where allowed."""
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {_show(value)}")
    text = value.strip()
    if "://" in text:  # "http://10.0.0.1:80", as nginx's proxy_pass would take it
        raise ValueError(f"expected host:port without a scheme, got {value!r}")
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"expected [ipv6]:port, got {value!r}")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address in {value!r}") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected host:port, got {value!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets, [{host}]:{port_text}, got {value!r}")
        if not _HOST.fullmatch(host):
            raise ValueError(f"expected host:port with a host name or IPv4 address, got {value!r}")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"expected host:port with a numeric port, got {value!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port must be {low}..65535, got {port}")
    return Address(host, port)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_show(value)}")
    return value


def _duration_or_zero(value: Any) -> float:
    """A duration that may also be 0 (``0``, ``0s``): "off"."""
    if not isinstance(value, bool):
        m = _DURATION.match(value) if isinstance(value, str) else None
        if value == 0 or (m is not None and float(m.group(1)) == 0):
            return 0.0
    return parse_duration(value)


def _drain_code(value: Any) -> int:
    if isinstance(value, bool) or value not in (1001, 1012):
        raise ValueError(
            f"expected 1001 (Going Away) or 1012 (Service Restart), got {_show(value)}"
        )
    return int(value)


def _int_in(low: int, high: int) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer {low}..{high}, got {_show(value)}")
        if not low <= value <= high:
            raise ValueError(f"expected an integer {low}..{high}, got {value}")
        return value

    return conv


def _choice(*choices: str) -> Callable[[Any], str]:
    def conv(value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {_show(value)}")
        return value

    return conv


def _name(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", value):
        raise ValueError(f"expected a name of letters, digits, '_', '.', '-', got {_show(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_show(value)}")
    return value


def _path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or not _header_safe(value):
        raise ValueError(f"expected a path starting with '/', got {_show(value)}")
    return value


def _header_safe(text: str) -> bool:
    """No space or control character: ``text`` goes verbatim into a check's request head."""
    return not any(c <= " " or c == "\x7f" for c in text)


def _token(value: Any) -> str:
    """A bearer token: visible ASCII, no spaces (it is compared with a header value)."""
    if (
        not isinstance(value, str)
        or not value
        or not value.isascii()
        or not value.isprintable()
        or " " in value
    ):
        # The value is a secret: never echo it.
        raise ValueError("expected a non-empty token of visible ASCII characters, no spaces")
    return value


def _check_host(value: Any) -> str:
    if not isinstance(value, str) or not _header_safe(value):
        raise ValueError(f"expected a Host header value like example.com, got {_show(value)}")
    return value


_RULE_HOST = re.compile(r"(?:\*\.)?[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


def _rule_host(value: Any) -> str:
    """A rule's host: ``chat.example.com``, ``*.example.com`` or ``[::1]`` -> lower case,
    without a trailing dot (requests are normalised the same way by ``rules.Router``)."""
    wanted = "expected a host like chat.example.com or *.example.com"
    if not isinstance(value, str):
        raise ValueError(f"{wanted}, got {_show(value)}")
    host = value.strip().lower()
    if host.endswith("."):
        host = host[:-1]
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"not an IPv6 address in {value!r}") from None
        return host
    if _RULE_HOST.fullmatch(host):
        return host
    if host == "*":
        raise ValueError("'*' matches every host: leave host out instead")
    if "*" in host:
        raise ValueError(f"a wildcard is only a leading '*.' like *.example.com, got {value!r}")
    if ":" in host:
        raise ValueError(f"a host without a port (rules match any port), got {value!r}")
    raise ValueError(f"{wanted}, got {value!r}")


def _prefix(value: Any) -> str:
    """A path prefix: starts with '/', no space, control character, '?' or '#'."""
    path = _path(value)
    if "?" in path or "#" in path:
        raise ValueError(f"expected a path prefix without '?' or '#', got {value!r}")
    return path


# RFC 6265 cookie-name: an RFC 2616 token.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _cookie_name(value: Any) -> str:
    if not isinstance(value, str) or not _TOKEN.fullmatch(value):
        raise ValueError(
            f"expected a cookie name of letters, digits and !#$%&'*+-.^_`|~, got {_show(value)}"
        )
    return value


def _codes(value: Any) -> tuple[str | int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list like [http_2xx, 301], got {_show(value)}")
    return parse_expected_codes(value)


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a positive number, got {_show(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive number, got {_show(value)}")
    return float(value)


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


_MEDIA_TYPE = re.compile(r"[a-z0-9!#$&^_.+-]+/[a-z0-9!#$&^_.+-]+")


def _media_types(value: Any) -> frozenset[str]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of media types like [text/csv], got {_show(value)}")
    out = set()
    for item in value:
        text = item.strip().lower() if isinstance(item, str) else None
        if text is None or not _MEDIA_TYPE.fullmatch(text):
            raise ValueError(
                f"expected media types like text/csv (no parameters), got {_show(item)}"
            )
        out.add(text)
    return frozenset(out)


def _slb_id(value: Any) -> str:
    """The instance name sent as SLB-ID: visible ASCII without spaces (a header value)."""
    if not isinstance(value, str) or not value or not value.isascii() or not value.isprintable():
        raise ValueError(f"expected a name of visible ASCII characters, got {_show(value)}")
    if " " in value or len(value) > 256:
        raise ValueError(f"expected a name without spaces, at most 256 characters, got {value!r}")
    return value


def _cidr(value: Any) -> IPNetwork:
    """``10.0.0.0/8``, ``2001:db8::/32`` or a single address (a /32 or /128)."""
    if not isinstance(value, str):
        raise ValueError(f"expected a CIDR like 10.0.0.0/8 or 2001:db8::/32, got {_show(value)}")
    text = value.strip()
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError:
        pass
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(
            f"expected a CIDR like 10.0.0.0/8 or 2001:db8::/32, got {value!r}"
        ) from None
    raise ValueError(f"{value!r} has host bits set (did you mean {net}?)")


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


def _file_path(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a file path, got {_show(value)}")
    return value


def _secret(value: Any) -> str:
    """``sticky_session.secret``: printable, long enough to be a key. Never echoed."""
    if not isinstance(value, str) or not value.isprintable():
        raise ValueError("expected a string of printable characters")
    if len(value) < MIN_STICKY_SECRET:
        raise ValueError(f"expected at least {MIN_STICKY_SECRET} characters")
    return value


_DNS_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def _dns_name(value: Any) -> str:
    """A DNS name to look up: lower case, without a trailing dot."""
    wanted = "expected a DNS name like chat.internal or _chat._tcp.example.com"
    if not isinstance(value, str):
        raise ValueError(f"{wanted}, got {_show(value)}")
    name = value.strip().lower().removesuffix(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(x) for x in name.split(".")):
        raise ValueError(f"{wanted}, got {value!r}")
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    raise ValueError(f"{value!r} is an address, not a name: list it under servers instead")


_REDIS_URL = re.compile(r"(redis|rediss|unix)://[^\s]+")
_KEY_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]{1,64}")


def _redis_url(value: Any) -> str:
    """``cluster.redis``: ``redis://``, ``rediss://`` (TLS) or ``unix://``; a password may sit
    in it (``redis://:secret@host:6379/0``), so the value is never echoed back."""
    if not isinstance(value, str) or not _REDIS_URL.fullmatch(value.strip()):
        raise ValueError(
            "expected a Redis URL like redis://host:6379/0, rediss://:password@host:6380/0 "
            "or unix:///run/redis.sock"
        )
    return value.strip()


def _key_prefix(value: Any) -> str:
    if not isinstance(value, str) or not _KEY_PREFIX.fullmatch(value):
        raise ValueError(
            f"expected 1 to 64 of A-Z a-z 0-9 _ . : {{ }} -, like lbproxy:, got {_show(value)}"
        )
    return value


def _resolver(value: Any) -> Address:
    if isinstance(value, str):
        try:
            return Address(str(ipaddress.ip_address(value.strip())), DNS_PORT)
        except ValueError:
            pass
    addr = parse_address(value)
    try:
        ipaddress.ip_address(addr.host)
    except ValueError:
        raise ValueError(f"a name server is an IP address (ip or ip:port), got {value!r}") from None
    return addr


# A server's weight, wherever one is given: the file, discovery, the runtime API.
parse_weight = _int_in(0, MAX_WEIGHT)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ADMIN_HOST = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


def _env_name(value: Any) -> str:
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise ValueError(
            f"expected an environment variable name like LB_ADMIN_TOKEN, got {_show(value)}"
        )
    return value


def _admin_host(value: Any) -> str:
    """One of ``admin.allowed_hosts``: a host name or an IP address, without a port (any port
    matches); lowercased, a trailing dot and IPv6 brackets removed."""
    text = value.strip().lower().rstrip(".") if isinstance(value, str) else ""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    if _ADMIN_HOST.fullmatch(text):
        return text
    if ":" in text or "/" in text:
        raise ValueError(f"a host name or IP address without a port or scheme, got {_show(value)}")
    raise ValueError(f"expected a host name like admin.example.com, got {_show(value)}")


def bind_is_loopback(bind: Address) -> bool:
    """Whether only this machine can reach ``bind``: a loopback address or ``localhost``."""
    if bind.host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(bind.host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


# The leaf types.

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
RedisUrl = Annotated[
    str,
    Leaf(
        _redis_url,
        "redis:// or rediss:// URL",
        {"type": "string", "pattern": "^(redis|rediss|unix)://"},
    ),
]
KeyPrefix = Annotated[str, Leaf(_key_prefix, "key prefix", {"type": "string", "maxLength": 64})]
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
String_: Leaf = String.__metadata__[0]  # type: ignore[attr-defined]
DnsName_: Leaf = DnsName.__metadata__[0]  # type: ignore[attr-defined]
PositiveNumber_: Leaf = PositiveNumber.__metadata__[0]  # type: ignore[attr-defined]
DurationOrZero_: Leaf = DurationOrZero.__metadata__[0]  # type: ignore[attr-defined]
