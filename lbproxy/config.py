"""The configuration model: every key lbproxy reads, its type, its default and its validation.

Owns:
- the frozen dataclasses describing a whole config file (listeners, server groups, servers,
  health checks, admin, access log) and every timeout the proxy uses — no timeout literal
  lives anywhere else;
- ``parse_config(mapping)``, which validates a parsed YAML document and reports *every*
  problem at once, each with its place in the file (``server_groups.rs1.servers[1].address``);
- ``load_config(path)``, the only place that reads the file and parses YAML.

Nothing here opens a socket or touches the event loop, so the whole model is tested in memory.
Unknown keys are errors: a typo must never be silently ignored.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import yaml

from . import balancer, health

T = TypeVar("T")

DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_ADMIN_BIND = "127.0.0.1:8404"


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one ``place: message`` line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Every timeout of a connection, taken once when it starts and kept for its life."""

    idle: float = DEFAULT_IDLE_TIMEOUT  # no byte either way for this long -> close
    request: float = DEFAULT_REQUEST_TIMEOUT  # upstream response head not received -> 504
    connect: float = DEFAULT_CONNECT_TIMEOUT  # upstream TCP connect


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    bind: Address
    server_group: str
    protocol: str = "http"
    timeouts: Timeouts = field(default_factory=Timeouts)
    x_forwarded_for: bool = True


@dataclass(frozen=True, slots=True)
class Server:
    address: Address
    weight: int = 100


@dataclass(frozen=True, slots=True)
class HealthCheck:
    enabled: bool = True
    protocol: str = "http"
    path: str = "/"
    method: str = "HEAD"
    host: str = ""
    port: int = 0
    interval: float = 2.0
    timeout: float = 5.0
    healthy_threshold: int = 3
    unhealthy_threshold: int = 3
    expected_codes: tuple[str | int, ...] = ("http_2xx", "http_3xx")


@dataclass(frozen=True, slots=True)
class ServerGroup:
    name: str
    servers: tuple[Server, ...]
    scheduler: str = "rr"
    health_check: HealthCheck = field(default_factory=HealthCheck)
    keepalive_connections: int = 32  # idle upstream connections kept per server
    keepalive_timeout: float = 30.0  # an idle pooled upstream connection is closed after this


@dataclass(frozen=True, slots=True)
class Admin:
    bind: Address = Address("127.0.0.1", 8404)


@dataclass(frozen=True, slots=True)
class AccessLog:
    enabled: bool = True
    format: str = "text"
    path: str = ""  # empty -> stderr


@dataclass(frozen=True, slots=True)
class Config:
    listeners: tuple[Listener, ...]
    server_groups: tuple[ServerGroup, ...]
    admin: Admin = field(default_factory=Admin)
    access_log: AccessLog = field(default_factory=AccessLog)
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    # sha256 of the file's bytes; not part of equality, so a comment-only edit is a no-op reload.
    digest: str = field(default="", compare=False)

    def group(self, name: str) -> ServerGroup:
        for g in self.server_groups:
            if g.name == name:
                return g
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------
# Validation machinery: a Path-tracking reader that records problems instead of raising, so one
# run reports everything wrong with the file.

_MISSING = object()


class _Reader:
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
                    self.error(where, f"unknown key (allowed: {', '.join(allowed)})")
        return value

    def get(
        self,
        m: Mapping[str, Any],
        key: str,
        path: str,
        conv: Callable[[Any], T],
        default: T | object = _MISSING,
    ) -> T | None:
        where = f"{path}.{key}" if path else key
        if key not in m:
            if default is _MISSING:
                self.error(where, "required")
                return None
            return default  # type: ignore[return-value]
        try:
            return conv(m[key])
        except ValueError as exc:
            self.error(where, str(exc))
            return None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


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


def parse_address(value: Any, *, allow_port_zero: bool = False) -> Address:
    """``host:port`` or ``[v6]:port`` -> Address. Port 0 (any free port) only where allowed."""
    if not isinstance(value, str):
        raise ValueError(f"expected host:port, got {_show(value)}")
    text = value.strip()
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
    if not port_text.isdigit():
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
    if not isinstance(value, str) or not value.startswith("/") or any(c in value for c in " \r\n"):
        raise ValueError(f"expected a path starting with '/', got {_show(value)}")
    return value


def _codes(value: Any) -> tuple[str | int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a non-empty list like [http_2xx, 301], got {_show(value)}")
    return health.parse_expected_codes(value)


# ---------------------------------------------------------------------------------------------

_TOP_KEYS = ("listeners", "server_groups", "admin", "access_log", "shutdown_timeout")
_LISTENER_KEYS = (
    "name",
    "bind",
    "protocol",
    "server_group",
    "idle_timeout",
    "request_timeout",
    "connect_timeout",
    "x_forwarded_for",
)
_GROUP_KEYS = ("scheduler", "servers", "health_check", "keepalive_connections", "keepalive_timeout")
_SERVER_KEYS = ("address", "weight")
_CHECK_KEYS = (
    "enabled",
    "protocol",
    "path",
    "method",
    "host",
    "port",
    "interval",
    "timeout",
    "healthy_threshold",
    "unhealthy_threshold",
    "expected_codes",
)


def parse_config(doc: Any) -> Config:
    """Validate a parsed YAML document; raise ConfigError listing every problem found."""
    r = _Reader()
    if doc is None:
        raise ConfigError(["the config file is empty"])
    top = r.mapping(doc, "", _TOP_KEYS)
    if top is None:
        raise ConfigError(r.problems)

    groups = _server_groups(r, top.get("server_groups", _MISSING))
    listeners = _listeners(r, top.get("listeners", _MISSING), {g.name for g in groups})

    admin = Admin()
    admin_doc = r.mapping(top.get("admin"), "admin", ("bind",))
    if admin_doc is not None:
        bind = r.get(
            admin_doc,
            "bind",
            "admin",
            lambda v: parse_address(v, allow_port_zero=True),
            Admin().bind,
        )
        if bind is not None:
            admin = Admin(bind=bind)

    access_log = AccessLog()
    log_doc = r.mapping(top.get("access_log"), "access_log", ("enabled", "format", "path"))
    if log_doc is not None:
        d = AccessLog()
        enabled = r.get(log_doc, "enabled", "access_log", _bool, d.enabled)
        fmt = r.get(log_doc, "format", "access_log", _choice("text", "json"), d.format)
        path = r.get(log_doc, "path", "access_log", _string, d.path)
        if enabled is not None and fmt is not None and path is not None:
            access_log = AccessLog(enabled, fmt, path)

    shutdown = r.get(top, "shutdown_timeout", "", parse_duration, DEFAULT_SHUTDOWN_TIMEOUT)

    binds: dict[Address, str] = {}
    for i, lst in enumerate(listeners):
        if lst.bind in binds:
            r.error(f"listeners[{i}].bind", f"{lst.bind} is already used by {binds[lst.bind]!r}")
        binds[lst.bind] = f"listener {lst.name}"
    if admin.bind.port != 0 and admin.bind in binds:
        r.error("admin.bind", f"{admin.bind} is already used by {binds[admin.bind]}")

    if r.problems:
        raise ConfigError(r.problems)
    assert shutdown is not None
    return Config(
        listeners=tuple(listeners),
        server_groups=tuple(groups),
        admin=admin,
        access_log=access_log,
        shutdown_timeout=shutdown,
    )


def _listeners(r: _Reader, doc: Any, group_names: set[str]) -> list[Listener]:
    if doc is _MISSING:
        r.error("listeners", "required (a list with at least one listener)")
        return []
    if not isinstance(doc, list) or not doc:
        r.error("listeners", f"expected a non-empty list of listeners, got {_show(doc)}")
        return []
    out: list[Listener] = []
    seen: set[str] = set()
    for i, item in enumerate(doc):
        path = f"listeners[{i}]"
        m = r.mapping(item, path, _LISTENER_KEYS)
        if m is None:
            continue
        name = r.get(m, "name", path, _name)
        if name is not None:
            if name in seen:
                r.error(f"{path}.name", f"duplicate listener name {name!r}")
            seen.add(name)
        bind = r.get(m, "bind", path, lambda v: parse_address(v, allow_port_zero=True))
        protocol = r.get(m, "protocol", path, _choice("http"), "http")
        group = r.get(m, "server_group", path, _name)
        if group is not None and group not in group_names:
            known = ", ".join(sorted(group_names)) or "none defined"
            r.error(f"{path}.server_group", f"no server group {group!r} (known: {known})")
        idle = r.get(m, "idle_timeout", path, parse_duration, DEFAULT_IDLE_TIMEOUT)
        request = r.get(m, "request_timeout", path, parse_duration, DEFAULT_REQUEST_TIMEOUT)
        connect = r.get(m, "connect_timeout", path, parse_duration, DEFAULT_CONNECT_TIMEOUT)
        xff = r.get(m, "x_forwarded_for", path, _bool, True)
        if None in (name, bind, protocol, group, idle, request, connect, xff):
            continue
        assert name and bind and protocol and group and idle and request and connect
        assert xff is not None
        out.append(Listener(name, bind, group, protocol, Timeouts(idle, request, connect), xff))
    return out


def _server_groups(r: _Reader, doc: Any) -> list[ServerGroup]:
    if doc is _MISSING:
        r.error("server_groups", "required (a mapping of group name to group)")
        return []
    m = r.mapping(doc, "server_groups", None)
    if m is None:
        return []
    if not m:
        r.error("server_groups", "expected at least one server group")
    out: list[ServerGroup] = []
    for gname, gdoc in m.items():
        path = f"server_groups.{gname}"
        try:
            _name(gname)
        except ValueError as exc:
            r.error(path, f"bad group name: {exc}")
            continue
        g = r.mapping(gdoc, path, _GROUP_KEYS)
        if g is None:
            continue
        scheduler = r.get(g, "scheduler", path, _choice(*balancer.SCHEDULERS), "rr")
        servers = _servers(r, g.get("servers", _MISSING), f"{path}.servers")
        check = _health_check(r, g.get("health_check"), f"{path}.health_check")
        d = ServerGroup(gname, ())
        keepalive = r.get(
            g, "keepalive_connections", path, _int_in(0, 10000), d.keepalive_connections
        )
        ka_timeout = r.get(g, "keepalive_timeout", path, parse_duration, d.keepalive_timeout)
        if None in (scheduler, servers, check, keepalive, ka_timeout):
            continue
        assert scheduler and servers is not None and check and keepalive is not None
        assert ka_timeout
        out.append(ServerGroup(gname, servers, scheduler, check, keepalive, ka_timeout))
    return out


def _servers(r: _Reader, doc: Any, path: str) -> tuple[Server, ...] | None:
    if doc is _MISSING:
        r.error(path, "required (a list of servers, may be empty)")
        return None
    if doc is None:
        return ()
    if not isinstance(doc, list):
        r.error(path, f"expected a list of servers, got {_show(doc)}")
        return None
    out: list[Server] = []
    seen: set[Address] = set()
    ok = True
    for i, item in enumerate(doc):
        spath = f"{path}[{i}]"
        if isinstance(item, str):  # shorthand: "- 127.0.0.1:5001"
            item = {"address": item}
        m = r.mapping(item, spath, _SERVER_KEYS)
        if m is None:
            ok = False
            continue
        address = r.get(m, "address", spath, parse_address)
        weight = r.get(m, "weight", spath, _int_in(0, 100), 100)
        if address is None or weight is None:
            ok = False
            continue
        if address in seen:
            r.error(f"{spath}.address", f"duplicate server {address}")
            ok = False
        seen.add(address)
        out.append(Server(address, weight))
    return tuple(out) if ok else None


def _health_check(r: _Reader, doc: Any, path: str) -> HealthCheck | None:
    m = r.mapping(doc, path, _CHECK_KEYS)
    if m is None:
        return None
    d = HealthCheck()
    values = (
        r.get(m, "enabled", path, _bool, d.enabled),
        r.get(m, "protocol", path, _choice("http", "tcp"), d.protocol),
        r.get(m, "path", path, _path, d.path),
        r.get(m, "method", path, _choice("HEAD", "GET"), d.method),
        r.get(m, "host", path, _string, d.host),
        r.get(m, "port", path, _int_in(0, 65535), d.port),
        r.get(m, "interval", path, parse_duration, d.interval),
        r.get(m, "timeout", path, parse_duration, d.timeout),
        r.get(m, "healthy_threshold", path, _int_in(1, 100), d.healthy_threshold),
        r.get(m, "unhealthy_threshold", path, _int_in(1, 100), d.unhealthy_threshold),
        r.get(m, "expected_codes", path, _codes, d.expected_codes),
    )
    if any(v is None for v in values):
        return None
    return HealthCheck(*values)  # type: ignore[arg-type]


def load_config(path: str) -> Config:
    """Read and validate the file at ``path``; every failure is a ConfigError with clear lines."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from None
    try:
        doc = yaml.safe_load(raw)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError([f"{where}: YAML syntax error: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML error: {exc}"]) from None
    config = parse_config(doc)
    return replace(config, digest=hashlib.sha256(raw).hexdigest())
