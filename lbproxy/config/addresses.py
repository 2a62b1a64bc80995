"""Leaf values of the config file that say where: ``host:port`` addresses (listeners' binds,
servers), name servers, CIDRs, the hosts rules and the admin listener match, DNS names to look
up and Redis URLs, each a parser and its leaf type (``leaf.Leaf``).

Pure: no I/O, no YAML; it imports only ``leaf``, ``model`` and ``wire``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from ..wire.cidrs import IPNetwork
from .leaf import STR, Leaf
from .model import DNS_PORT, Address, _show

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


def _redis_url(value: Any) -> str:
    """``cluster.redis``: ``redis://``, ``rediss://`` (TLS) or ``unix://``; a password may sit
    in it (``redis://:secret@host:6379/0``), so the value is never echoed back."""
    if not isinstance(value, str) or not _REDIS_URL.fullmatch(value.strip()):
        raise ValueError(
            "expected a Redis URL like redis://host:6379/0, rediss://:password@host:6380/0 "
            "or unix:///run/redis.sock"
        )
    return value.strip()


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


_ADMIN_HOST = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


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

_ADDRESS = {"type": "string", "pattern": r"^\s*(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):\d+\s*$"}


def _bind(value: Any) -> Address:
    return parse_address(value, allow_port_zero=True)


AdminHost = Annotated[str, Leaf(_admin_host, "host name or IP", STR)]
RuleHost = Annotated[str, Leaf(_rule_host, "host or *.domain", STR)]
DnsName = Annotated[str, Leaf(_dns_name, "DNS name", STR)]
RedisUrl = Annotated[
    str,
    Leaf(
        _redis_url,
        "redis:// or rediss:// URL",
        {"type": "string", "pattern": "^(redis|rediss|unix)://"},
    ),
]
Address_ = Annotated[Address, Leaf(parse_address, "host:port", _ADDRESS)]
BindAddress = Annotated[Address, Leaf(_bind, "host:port (port 0: any)", _ADDRESS)]
Resolver = Annotated[
    Address,
    Leaf(_resolver, "ip or ip:port", {"type": "string"}),
]
Cidr = Annotated[IPNetwork, Leaf(_cidr, "CIDR", {"type": "string"})]
RuleHost_: Leaf = RuleHost.__metadata__[0]  # type: ignore[attr-defined]
DnsName_: Leaf = DnsName.__metadata__[0]  # type: ignore[attr-defined]
