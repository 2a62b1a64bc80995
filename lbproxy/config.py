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
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import yaml

from . import balancer, health, tls
from .client_limits import Cidrs

T = TypeVar("T")

DEFAULT_IDLE_TIMEOUT = 60.0
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0
DEFAULT_CLIENT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_REQUEST_LINE = 8192
DEFAULT_MAX_HEADER_SIZE = 32768
DEFAULT_MAX_HEADER_COUNT = 100
# Not user settings: after accept() fails for lack of descriptors or memory (EMFILE, ENFILE,
# ENOBUFS, ENOMEM) a listener stops accepting for this long, then tries again.
ACCEPT_RETRY_DELAY = 0.1
# Not a user setting: after an error answer to a client that may still be sending, how long
# the proxy goes on reading (and dropping) before it closes (RFC 9112 9.6).
LINGER_TIMEOUT = 2.0
# A WebSocket the proxy closes (drain, shutdown): how long the close handshake may take once
# both close frames are out, and how long a frame in flight may take to end before them.
WS_CLOSE_HANDSHAKE_TIMEOUT = 2.0
WS_CLOSE_FRAME_WAIT = 10.0
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
DEFAULT_ADMIN_BIND = "127.0.0.1:8404"
# Multi-worker internals (not user settings): how long the supervisor waits for a worker to
# start serving, and for a worker to answer a stats request before /metrics goes without it.
WORKER_START_TIMEOUT = 30.0
WORKER_STATS_TIMEOUT = 2.0
# At exit, how long the access log may take to write out its queued lines.
ACCESS_LOG_DRAIN_TIMEOUT = 5.0
DEFAULT_STICKY_COOKIE = "SERVERID"
DEFAULT_STICKY_COOKIE_TIMEOUT = 1000.0
DEFAULT_SOCKETIO_PATH = "/socket.io/"
DEFAULT_DISCOVERY_INTERVAL = 10.0
DEFAULT_DNS_TIMEOUT = 2.0
# Never re-resolve a name more often than this, whatever its records' TTL says.
MIN_DISCOVERY_INTERVAL = 1.0
# Empty answers (the name is gone, or has no such records) that go on for this many intervals
# empty the group; until then the last known servers are kept.
DISCOVERY_EMPTY_INTERVALS = 3
DNS_PORT = 53
MIN_STICKY_SECRET = 16  # characters of sticky_session.secret
DEFAULT_CLIENT_TABLE_SIZE = 65536
DEFAULT_GZIP_MIN_LENGTH = 1024


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
    # A request head (and a new connection's TLS handshake and first head) must be complete
    # this long after its first byte (for a new connection: after the accept), else 408.
    client_header: float = DEFAULT_CLIENT_HEADER_TIMEOUT


@dataclass(frozen=True, slots=True)
class Rule:
    """A forwarding rule: requests for ``host`` (exact, ``*.suffix`` or None for any host)
    whose path starts with ``path`` go to ``server_group``. Precedence: ``rules.Router``."""

    host: str | None  # lower case, no trailing dot; "*.example.com" for a wildcard
    path: str  # a prefix starting with "/"
    server_group: str


@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate chain (leaf first) and its private key, PEM files."""

    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class Tls:
    """An https listener's TLS: its certificates (the first is the default; the others are
    served to clients whose SNI names them), security policy and client-certificate check."""

    certificates: tuple[Certificate, ...]
    policy: str | None = None  # a tls.POLICIES name; None: TLS 1.2 and up, Python's ciphers
    client_ca: str | None = None  # PEM file of the CAs client certificates must chain to
    client_auth: str | None = None  # "required" or "optional"; None: no client certificate
    # sha256 of every file's bytes, filled in by ``loads_config``: a renewed certificate makes
    # the config differ, so a reload re-reads it even when the YAML is unchanged.
    digest: str = ""

    @property
    def cert(self) -> str:
        """The default certificate's chain file."""
        return self.certificates[0].cert

    @property
    def key(self) -> str:
        return self.certificates[0].key

    @property
    def files(self) -> tuple[str, ...]:
        """Every file this TLS is built from (certificates, keys, client CA), in order."""
        out = [f for c in self.certificates for f in (c.cert, c.key)]
        if self.client_ca is not None:
            out.append(self.client_ca)
        return tuple(out)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class Acl:
    """Which client addresses a listener takes: ``allow`` only those in ``cidrs``, ``deny``
    everyone but them. IPv4-mapped IPv6 clients (``::ffff:a.b.c.d``) count as IPv4."""

    mode: str  # "allow" or "deny"
    cidrs: tuple[IPNetwork, ...]
    _set: Cidrs = field(init=False, compare=False, repr=False)  # the lookup, built once

    def __post_init__(self) -> None:
        object.__setattr__(self, "_set", Cidrs(self.cidrs))

    def matches(self, ip: str) -> bool:
        """Whether ``ip`` (a peer address as the socket reports it) is in ``cidrs``."""
        return self._set.matches(ip)

    def allows(self, ip: str) -> bool:
        return self.matches(ip) == (self.mode == "allow")


@dataclass(frozen=True, slots=True)
class WebSocketPolicy:
    """``listeners[].websocket``: what a client may send through a WebSocket tunnel. Only
    client-to-server traffic is limited; server-to-client never is."""

    max_message_size: int = 0  # bytes of one message (all its fragments); 0: no limit
    messages_per_second: float = 0.0  # data messages per second per tunnel; 0: no limit
    burst: int = 1  # messages allowed at once above the rate (the token bucket's size)


@dataclass(frozen=True, slots=True)
class Forwarding:
    """CLB's optional forwarding headers (``x_forwarded_for`` stays its own key): each on
    replaces whatever the client sent under that name. ``proto`` None follows
    ``x_forwarded_for``, as before these keys existed."""

    proto: bool | None = None  # X-Forwarded-Proto: http or https
    port: bool = False  # X-Forwarded-Port: the listener's port
    client_srcport: bool = False  # X-Forwarded-Client-Srcport: the client's source port
    slb_ip: bool = False  # SLB-IP: the listener address the client connected to
    slb_id: str = ""  # SLB-ID: this instance's name; empty: not sent
    # Any of the balancer-owned headers on: read once per request, so worked out once here.
    extra: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        extra = self.port or self.client_srcport or self.slb_ip or bool(self.slb_id)
        object.__setattr__(self, "extra", extra)


@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Per-client limits of a listener (``limits``); 0 means no limit of that kind."""

    connections_per_client: int = 0
    requests_per_second: float = 0.0
    burst: int = 1  # the token bucket's size: requests allowed at once after a quiet spell
    table_size: int = DEFAULT_CLIENT_TABLE_SIZE  # clients remembered (least recently seen go)


@dataclass(frozen=True, slots=True)
class Gzip:
    """On-the-fly compression of a listener's text responses (``gzip: true``)."""

    types: frozenset[str]  # media types compressed: CLB's list plus ``gzip_types``
    min_length: int = DEFAULT_GZIP_MIN_LENGTH  # a smaller Content-Length is sent as it is


# CLB's compressed types (Gzip on by default there); ``gzip_types`` adds to them.
GZIP_TYPES = frozenset(
    {
        "text/html",
        "text/plain",
        "text/css",
        "text/xml",
        "application/javascript",
        "application/x-javascript",
        "text/javascript",  # not in CLB's list: JavaScript's registered type (RFC 9239)
        "application/json",
        "application/xml",
        "application/rss+xml",
        "application/atom+xml",
        "image/svg+xml",
    }
)


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    bind: Address
    server_group: str
    protocol: str = "http"  # "http" or "https"
    timeouts: Timeouts = field(default_factory=Timeouts)
    x_forwarded_for: bool = True
    rules: tuple[Rule, ...] = ()  # in file order; the listener's server_group is the default
    max_request_line: int = DEFAULT_MAX_REQUEST_LINE  # bytes; over it -> 414
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE  # bytes of the whole head; over it -> 431
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT  # header fields; over it -> 431
    max_connections: int = 0  # open client connections; 0: unlimited
    tls: Tls | None = None  # set exactly when protocol is https
    redirect_https: int = 0  # an http listener answering 301 to https on this port; 0: off
    acl: Acl | None = None  # None: every client
    websocket: WebSocketPolicy | None = None  # None: no message limits
    forwarding: Forwarding = field(default_factory=Forwarding)
    trusted_proxies: Cidrs | None = None  # peers whose X-Forwarded-For ``limits`` believes
    limits: ClientLimits | None = None  # None: no per-client limits
    bandwidth: int = 0  # bytes per second in each direction; 0: unlimited
    gzip: Gzip | None = None  # None: responses pass uncompressed
    http2: bool = True  # https: ALPN offers h2 (then http/1.1); False: http/1.1 only


@dataclass(frozen=True, slots=True)
class Server:
    address: Address
    weight: int = 100
    discovered: bool = False  # from DNS (``discovery``), not written in the file


@dataclass(frozen=True, slots=True)
class Discovery:
    """A group's servers from DNS: every address of ``dns`` becomes a server ``ip:port``.

    A name whose first label starts with ``_`` (``_chat._tcp.example.com``) is looked up as
    SRV (each record names its port and weight); any other name as A and AAAA, with ``port``
    and ``weight`` for every address.
    """

    dns: str  # lower case, no trailing dot
    port: int = 0  # A/AAAA: the servers' port; 0 with SRV
    interval: float = DEFAULT_DISCOVERY_INTERVAL  # re-resolve at least this often
    weight: int = 100  # A/AAAA servers' weight
    timeout: float = DEFAULT_DNS_TIMEOUT  # one lookup (every retry included)

    @property
    def srv(self) -> bool:
        return self.dns.startswith("_")


@dataclass(frozen=True, slots=True)
class HealthCheck:
    enabled: bool = True
    protocol: str = "http"  # "http", "tcp" or "websocket"
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
    # An idle pooled upstream connection is closed after this; below common backend keep-alive
    # timeouts (Node.js: 5 s) so a connection the backend is about to close is never reused.
    keepalive_timeout: float = 4.0
    hash_key: str = "client_ip"  # what sh hashes: "client_ip" or "x_forwarded_for"
    sticky: StickySession | None = None  # None: no session persistence
    # A draining server's open WebSockets: 0 leaves them until they end; above 0 the proxy
    # closes them itself (close frames both ways), spread evenly over this window.
    drain_timeout: float = 0.0
    drain_close_code: int = 1001  # 1001 Going Away, or 1012 Service Restart
    discovery: Discovery | None = None  # None: only the servers written in the file


@dataclass(frozen=True, slots=True)
class StickySession:
    """Session persistence of a group (``sticky_session``); see ``sticky.py``.

    ``type`` None means no cookie persistence (only Socket.IO sid routing, ``socketio``).
    ``insert``: the proxy sets cookie ``cookie`` to an opaque token of the server, with
    Max-Age ``cookie_timeout``. ``server``: the backend's own cookie ``cookie`` pins the client
    to the server that set it; ``cookie_timeout`` is then how long an unused value is remembered.
    """

    type: str | None = None  # None, "insert" or "server"
    cookie: str = DEFAULT_STICKY_COOKIE
    cookie_timeout: float = DEFAULT_STICKY_COOKIE_TIMEOUT
    socketio: bool = False
    socketio_path: str = DEFAULT_SOCKETIO_PATH
    # The key of the insert cookie's token; "" keeps the built-in key. Never printed.
    secret: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class Admin:
    bind: Address = Address("127.0.0.1", 8404)
    token: str = ""  # non-empty: POST /-/reload needs "Authorization: Bearer <token>"


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
    resolvers: tuple[Address, ...] = ()  # name servers for discovery; (): the system's
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
        return "a list" if value else "an empty list"
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
    return health.parse_expected_codes(value)


# ---------------------------------------------------------------------------------------------

_TOP_KEYS = ("listeners", "server_groups", "admin", "access_log", "shutdown_timeout", "resolvers")
_LISTENER_KEYS = (
    "name",
    "bind",
    "protocol",
    "server_group",
    "idle_timeout",
    "request_timeout",
    "connect_timeout",
    "x_forwarded_for",
    "rules",
    "client_header_timeout",
    "max_request_line",
    "max_header_size",
    "max_header_count",
    "max_connections",
    "tls",
    "redirect_https",
    "acl",
    "http2",
    "websocket",
    # edge keys (issue 16): _edge
    "x_forwarded_proto",
    "x_forwarded_port",
    "x_forwarded_client_srcport",
    "slb_ip",
    "slb_id",
    "trusted_proxies",
    "limits",
    "bandwidth",
    "gzip",
    "gzip_types",
    "gzip_min_length",
)
_LIMITS_KEYS = ("connections_per_client", "requests_per_second", "burst", "table_size")
_TLS_KEYS = ("cert", "key", "certificates", "policy", "client_ca", "client_auth")
_CERT_KEYS = ("cert", "key")
_ACL_KEYS = ("mode", "cidrs")
_WS_POLICY_KEYS = ("max_message_size", "messages_per_second", "burst")
_RULE_KEYS = ("host", "path", "server_group")
_GROUP_KEYS = (
    "scheduler",
    "servers",
    "health_check",
    "keepalive_connections",
    "keepalive_timeout",
    "hash_key",
    "sticky_session",
    "drain_timeout",
    "drain_close_code",
    "discovery",
)
_DISCOVERY_KEYS = ("dns", "port", "interval", "weight", "timeout")
_STICKY_KEYS = ("type", "cookie", "cookie_timeout", "socketio", "socketio_path", "secret")
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
    # Every group *declared*, valid or not: a group with its own problems (already reported)
    # must not also make each listener that uses it report "no server group".
    groups_doc = top.get("server_groups")
    declared = {str(k) for k in groups_doc} if isinstance(groups_doc, Mapping) else set()
    listeners = _listeners(r, top.get("listeners", _MISSING), declared)

    admin = Admin()
    admin_doc = r.mapping(top.get("admin"), "admin", ("bind", "token"))
    if admin_doc is not None:
        token = r.get(admin_doc, "token", "admin", _token, "")
        bind = r.get(
            admin_doc,
            "bind",
            "admin",
            lambda v: parse_address(v, allow_port_zero=True),
            Admin().bind,
        )
        if bind is not None and token is not None:
            admin = Admin(bind=bind, token=token)

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
    resolvers = _resolvers(r, top.get("resolvers"))

    for lst in listeners:
        if admin.bind.port != 0 and admin.bind == lst.bind:
            r.error("admin.bind", f"{admin.bind} is already used by listener {lst.name}")

    if r.problems:
        raise ConfigError(r.problems)
    assert shutdown is not None and resolvers is not None
    return Config(
        listeners=tuple(listeners),
        server_groups=tuple(groups),
        admin=admin,
        access_log=access_log,
        shutdown_timeout=shutdown,
        resolvers=resolvers,
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
    binds: dict[Address, str] = {}
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
        if bind is not None and bind.port != 0:  # port 0: a free port each, never a clash
            if bind in binds:
                r.error(f"{path}.bind", f"{bind} is already used by {binds[bind]}")
            else:
                binds[bind] = f"listener {name}" if name is not None else path
        protocol = r.get(m, "protocol", path, _choice("http", "https"), "http")
        group = r.get(m, "server_group", path, _name)
        if group is not None and group not in group_names:
            known = ", ".join(sorted(group_names)) or "none defined"
            r.error(f"{path}.server_group", f"no server group {group!r} (known: {known})")
        idle = r.get(m, "idle_timeout", path, parse_duration, DEFAULT_IDLE_TIMEOUT)
        request = r.get(m, "request_timeout", path, parse_duration, DEFAULT_REQUEST_TIMEOUT)
        connect = r.get(m, "connect_timeout", path, parse_duration, DEFAULT_CONNECT_TIMEOUT)
        xff = r.get(m, "x_forwarded_for", path, _bool, True)
        rules = _rules(r, m.get("rules"), f"{path}.rules", group_names)
        header = r.get(
            m, "client_header_timeout", path, parse_duration, DEFAULT_CLIENT_HEADER_TIMEOUT
        )
        before = len(r.problems)
        hardening = _hardening(r, m, path, protocol)
        edge = _edge(r, m, path, xff)
        if None in (name, bind, protocol, group, idle, request, connect, xff, rules, header):
            continue
        if len(r.problems) > before:
            continue
        assert name and bind and protocol and group and idle and request and connect and header
        assert xff is not None and rules is not None
        timeouts = Timeouts(idle, request, connect, header)
        out.append(Listener(name, bind, group, protocol, timeouts, xff, rules, **hardening, **edge))
    return out


def _hardening(r: _Reader, m: Mapping[str, Any], path: str, protocol: str | None) -> dict[str, Any]:
    """A listener's limits, TLS, https redirect and ACL, as Listener keyword arguments.

    Problems are reported on ``r``; the caller compares problem counts."""
    d = Listener("", Address("", 0), "")
    out: dict[str, Any] = {
        "max_request_line": r.get(
            m, "max_request_line", path, _size(64, 1 << 20), d.max_request_line
        ),
        "max_header_size": r.get(
            m, "max_header_size", path, _size(1024, 1 << 20), d.max_header_size
        ),
        "max_header_count": r.get(
            m, "max_header_count", path, _int_in(1, 10000), d.max_header_count
        ),
        "max_connections": r.get(
            m, "max_connections", path, _int_in(0, 10_000_000), d.max_connections
        ),
    }
    line, size = out["max_request_line"], out["max_header_size"]
    if line is not None and size is not None and line > size:
        r.error(
            f"{path}.max_header_size",
            f"must be at least max_request_line ({line}): the request line is part of the head",
        )
    if "tls" in m:
        if protocol == "http":
            r.error(f"{path}.tls", "only used with protocol: https")
        tls_config = _tls(r, m["tls"], f"{path}.tls")
        if tls_config is not None:
            out["tls"] = tls_config
    elif protocol == "https":
        r.error(f"{path}.tls", "required with protocol: https (cert and key, or certificates)")
    if "redirect_https" in m:
        if protocol == "https":
            r.error(f"{path}.redirect_https", "only used with protocol: http")
        out["redirect_https"] = r.get(m, "redirect_https", path, _int_in(1, 65535))
    if "acl" in m:
        out["acl"] = _acl(r, m["acl"], f"{path}.acl")
    if "http2" in m:
        if protocol == "http":
            # No h2c (cleartext HTTP/2): browsers speak HTTP/2 over TLS only.
            r.error(f"{path}.http2", "only used with protocol: https (HTTP/2 is offered by ALPN)")
        out["http2"] = r.get(m, "http2", path, _bool, True)
    if "websocket" in m:
        out["websocket"] = _ws_policy(r, m["websocket"], f"{path}.websocket")
    return out


def _ws_policy(r: _Reader, doc: Any, path: str) -> WebSocketPolicy | None:
    m = r.mapping(doc, path, _WS_POLICY_KEYS)
    if m is None:
        return None
    if "max_message_size" not in m and "messages_per_second" not in m:
        r.error(path, "expected max_message_size and/or messages_per_second")
        return None
    size = r.get(m, "max_message_size", path, _size(1, 1 << 40), 0)
    rate = r.get(m, "messages_per_second", path, _positive_number, 0.0)
    burst = r.get(m, "burst", path, _int_in(1, 1_000_000), None)
    if size is None or rate is None:
        return None
    if burst is None:
        if "burst" in m:
            return None
        burst = max(1, math.ceil(rate))  # a second's worth
    elif not rate:
        r.error(f"{path}.burst", "only used with messages_per_second")
        return None
    return WebSocketPolicy(size, float(rate), burst)


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a positive number, got {_show(value)}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"expected a positive number, got {_show(value)}")
    return float(value)


def _tls(r: _Reader, doc: Any, path: str) -> Tls | None:
    m = r.mapping(doc, path, _TLS_KEYS)
    if m is None:
        return None
    before = len(r.problems)
    pairs: list[Certificate] = []
    if "certificates" in m:
        if "cert" in m or "key" in m:
            r.error(path, "either cert and key, or certificates: not both")
        items = m["certificates"]
        if not isinstance(items, list) or not items:
            r.error(
                f"{path}.certificates",
                f"expected a non-empty list of {{cert, key}}, got {_show(items)}",
            )
            items = []
        for j, item in enumerate(items):
            where = f"{path}.certificates[{j}]"
            cm = r.mapping(item, where, _CERT_KEYS)
            if cm is not None:
                cert = r.get(cm, "cert", where, _file_path)
                key = r.get(cm, "key", where, _file_path)
                if cert is not None and key is not None:
                    pairs.append(Certificate(cert, key))
    else:
        cert = r.get(m, "cert", path, _file_path)
        key = r.get(m, "key", path, _file_path)
        if cert is not None and key is not None:
            pairs.append(Certificate(cert, key))
    policy = r.get(m, "policy", path, _choice(*tls.POLICIES), None)
    client_ca = r.get(m, "client_ca", path, _file_path, None)
    client_auth = r.get(m, "client_auth", path, _choice(*tls.CLIENT_AUTH), None)
    if "client_auth" in m and "client_ca" not in m:
        r.error(f"{path}.client_auth", "needs client_ca (the CAs client certificates chain to)")
    if client_ca is not None and client_auth is None:
        client_auth = "required"  # a CA given means client certificates are wanted
    if len(r.problems) > before:
        return None
    return Tls(tuple(pairs), policy, client_ca, client_auth)


def _edge(r: _Reader, m: Mapping[str, Any], path: str, xff: bool | None) -> dict[str, Any]:
    """A listener's forwarding headers, per-client limits, bandwidth cap and gzip (issue 16),
    as Listener keyword arguments. Problems are reported on ``r``."""
    out: dict[str, Any] = {}
    fwd = Forwarding(
        proto=r.get(m, "x_forwarded_proto", path, _bool, None),
        port=r.get(m, "x_forwarded_port", path, _bool, False) or False,
        client_srcport=r.get(m, "x_forwarded_client_srcport", path, _bool, False) or False,
        slb_ip=r.get(m, "slb_ip", path, _bool, False) or False,
        slb_id=r.get(m, "slb_id", path, _slb_id, "") or "",
    )
    if fwd != Forwarding():
        out["forwarding"] = fwd
    if "trusted_proxies" in m:
        cidrs = _cidr_list(r, m["trusted_proxies"], f"{path}.trusted_proxies")
        if cidrs is not None:
            out["trusted_proxies"] = Cidrs(cidrs) if cidrs else None
    if "limits" in m:
        out["limits"] = _limits(r, m["limits"], f"{path}.limits")
    elif "trusted_proxies" in m:
        r.error(f"{path}.trusted_proxies", "only used with limits (it picks the client address)")
    if "bandwidth" in m:
        out["bandwidth"] = r.get(m, "bandwidth", path, parse_bandwidth)
    gzip = r.get(m, "gzip", path, _bool, False)
    types = r.get(m, "gzip_types", path, _media_types, frozenset())
    min_length = r.get(m, "gzip_min_length", path, _size(0, 1 << 30), DEFAULT_GZIP_MIN_LENGTH)
    if not gzip:
        for key in ("gzip_types", "gzip_min_length"):
            if key in m:
                r.error(f"{path}.{key}", "only used with gzip: true")
    elif types is not None and min_length is not None:
        out["gzip"] = Gzip(GZIP_TYPES | types, min_length)
    del xff  # x_forwarded_proto's default follows it at run time (Forwarding.proto None)
    return out


def _limits(r: _Reader, doc: Any, path: str) -> ClientLimits | None:
    m = r.mapping(doc, path, _LIMITS_KEYS)
    if m is None:
        return None
    d = ClientLimits()
    conns = r.get(m, "connections_per_client", path, _int_in(0, 1_000_000), 0)
    rate = r.get(m, "requests_per_second", path, _rate, 0.0)
    burst = r.get(m, "burst", path, _int_in(1, 1_000_000), None)
    table = r.get(m, "table_size", path, _int_in(16, 10_000_000), d.table_size)
    if burst is not None and not rate:
        r.error(f"{path}.burst", "only used with requests_per_second")
    if conns == 0 and rate == 0.0 and None not in (conns, rate):
        r.error(path, "limits nothing: set connections_per_client and/or requests_per_second")
        return None
    if conns is None or rate is None or table is None or ("burst" in m and burst is None):
        return None
    if burst is None:
        burst = max(1, math.ceil(rate))  # one second's worth
    return ClientLimits(conns, rate, burst, table)


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


def _cidr_list(r: _Reader, doc: Any, path: str) -> tuple[IPNetwork, ...] | None:
    if not isinstance(doc, list):
        r.error(path, f"expected a list of CIDRs like [10.0.0.0/8], got {_show(doc)}")
        return None
    cidrs: list[IPNetwork] = []
    for i, item in enumerate(doc):
        try:
            cidrs.append(_cidr(item))
        except ValueError as exc:
            r.error(f"{path}[{i}]", str(exc))
    return tuple(cidrs) if len(cidrs) == len(doc) else None


def _acl(r: _Reader, doc: Any, path: str) -> Acl | None:
    m = r.mapping(doc, path, _ACL_KEYS)
    if m is None:
        return None
    mode = r.get(m, "mode", path, _choice("allow", "deny"))
    cidrs_doc = m.get("cidrs", _MISSING)
    if cidrs_doc is _MISSING:
        r.error(f"{path}.cidrs", "required (a list like [10.0.0.0/8, '2001:db8::/32'])")
        return None
    if not isinstance(cidrs_doc, list) or not cidrs_doc:
        r.error(f"{path}.cidrs", f"expected a non-empty list of CIDRs, got {_show(cidrs_doc)}")
        return None
    cidrs: list[IPNetwork] = []
    for i, item in enumerate(cidrs_doc):
        try:
            cidrs.append(_cidr(item))
        except ValueError as exc:
            r.error(f"{path}.cidrs[{i}]", str(exc))
    if mode is None or len(cidrs) != len(cidrs_doc):
        return None
    return Acl(mode, tuple(cidrs))


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
        discovery = _discovery(r, g.get("discovery"), f"{path}.discovery")
        servers_doc = g.get("servers", () if "discovery" in g else _MISSING)
        servers = _servers(r, servers_doc, f"{path}.servers")
        check = _health_check(r, g.get("health_check"), f"{path}.health_check")
        d = ServerGroup(gname, ())
        keepalive = r.get(
            g, "keepalive_connections", path, _int_in(0, 10000), d.keepalive_connections
        )
        ka_timeout = r.get(g, "keepalive_timeout", path, parse_duration, d.keepalive_timeout)
        hash_key = r.get(g, "hash_key", path, _choice("client_ip", "x_forwarded_for"), d.hash_key)
        drain = r.get(g, "drain_timeout", path, _duration_or_zero, d.drain_timeout)
        drain_code = r.get(g, "drain_close_code", path, _drain_code, d.drain_close_code)
        before = len(r.problems)
        sticky = _sticky(r, g.get("sticky_session"), f"{path}.sticky_session")
        if None in (scheduler, servers, check, keepalive, ka_timeout, hash_key, drain, drain_code):
            continue
        if len(r.problems) > before:
            continue
        assert scheduler and servers is not None and check and keepalive is not None
        assert ka_timeout and hash_key and drain is not None and drain_code is not None
        out.append(
            ServerGroup(
                gname,
                servers,
                scheduler,
                check,
                keepalive,
                ka_timeout,
                hash_key,
                sticky,
                drain,
                drain_code,
                discovery,
            )
        )
    return out


def _rules(r: _Reader, doc: Any, path: str, group_names: set[str]) -> tuple[Rule, ...] | None:
    """``listeners[i].rules``; None when any rule is wrong (every problem reported)."""
    if doc is None:
        return ()
    if not isinstance(doc, list):
        r.error(path, f"expected a list of rules (host, path, server_group), got {_show(doc)}")
        return None
    before = len(r.problems)
    out: list[Rule] = []
    seen: dict[tuple[str | None, str], int] = {}
    for j, item in enumerate(doc):
        rpath = f"{path}[{j}]"
        m = r.mapping(item, rpath, _RULE_KEYS)
        if m is None:
            continue
        if "host" not in m and "path" not in m:
            r.error(rpath, "a rule needs a host, a path or both")
        host = r.get(m, "host", rpath, _rule_host, None)
        prefix = r.get(m, "path", rpath, _prefix, "/")
        group = r.get(m, "server_group", rpath, _name)
        if group is not None and group not in group_names:
            known = ", ".join(sorted(group_names)) or "none defined"
            r.error(f"{rpath}.server_group", f"no server group {group!r} (known: {known})")
        if prefix is None or group is None or (host is None and "host" in m):
            continue
        key = (host, prefix)
        if key in seen:
            shown = f"host {host!r} and path {prefix!r}" if host else f"path {prefix!r}"
            r.error(rpath, f"duplicate rule: {shown} already in rules[{seen[key]}]")
            continue
        seen[key] = j
        out.append(Rule(host, prefix, group))
    return tuple(out) if len(r.problems) == before else None


def _sticky(r: _Reader, doc: Any, path: str) -> StickySession | None:
    """``server_groups.<name>.sticky_session``; None when absent (no persistence).

    Errors are reported on ``r``; the caller compares problem counts. A key that would have no
    effect (``cookie`` without ``type``, ``socketio_path`` without ``socketio: true``) is an
    error, like an unknown key: the file must not look sticky when it is not.
    """
    if doc is None:
        return None
    m = r.mapping(doc, path, _STICKY_KEYS)
    if m is None:
        return None
    d = StickySession()
    kind = r.get(m, "type", path, _choice("insert", "server"), None)
    if kind == "server" and "cookie" not in m:
        r.error(f"{path}.cookie", "required with type: server (the name of the backend's cookie)")
    cookie = r.get(m, "cookie", path, _cookie_name, d.cookie)
    timeout = r.get(m, "cookie_timeout", path, parse_duration, d.cookie_timeout)
    socketio = r.get(m, "socketio", path, _bool, d.socketio)
    sio_path = r.get(m, "socketio_path", path, _prefix, d.socketio_path)
    secret = r.get(m, "secret", path, _secret, d.secret)
    if "secret" in m and kind != "insert":
        r.error(f"{path}.secret", "only used with type: insert")
    if "type" not in m:
        for key in ("cookie", "cookie_timeout"):
            if key in m:
                r.error(f"{path}.{key}", "only used with type: insert or server")
        if socketio is False:
            r.error(
                path,
                "enables nothing: set type (insert or server) and/or socketio: true"
                " (leave sticky_session out for no persistence)",
            )
    if socketio is False and "socketio_path" in m:
        r.error(f"{path}.socketio_path", "only used with socketio: true")
    if cookie is None or timeout is None or socketio is None or sio_path is None:
        return None
    if secret is None:
        return None
    return StickySession(kind, cookie, timeout, socketio, sio_path, secret)


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


def _discovery(r: _Reader, doc: Any, path: str) -> Discovery | None:
    """``server_groups.<name>.discovery``; None when absent or wrong (problems on ``r``)."""
    if doc is None:
        return None
    m = r.mapping(doc, path, _DISCOVERY_KEYS)
    if m is None:
        return None
    d = Discovery("")
    name = r.get(m, "dns", path, _dns_name)
    srv = name is not None and name.startswith("_")
    if srv and "port" in m:
        r.error(f"{path}.port", "not used with an SRV name (the records carry the ports)")
    elif name is not None and not srv and "port" not in m:
        r.error(f"{path}.port", "required with an A/AAAA name (the servers' port)")
    port = r.get(m, "port", path, _int_in(1, 65535), 0) if not srv else 0
    if srv and "weight" in m:
        r.error(f"{path}.weight", "not used with an SRV name (the records carry the weights)")
    interval = r.get(m, "interval", path, parse_duration, d.interval)
    if interval is not None and interval < MIN_DISCOVERY_INTERVAL:
        r.error(f"{path}.interval", f"must be at least {MIN_DISCOVERY_INTERVAL:g}s")
        interval = None
    weight = r.get(m, "weight", path, _int_in(0, 100), d.weight)
    timeout = r.get(m, "timeout", path, parse_duration, d.timeout)
    if timeout is not None and timeout > 30:
        r.error(f"{path}.timeout", "must be at most 30s")
        timeout = None
    if None in (name, port, interval, weight, timeout) or (srv and ("port" in m or "weight" in m)):
        return None
    assert name and port is not None and interval and weight is not None and timeout
    return Discovery(name, port, interval, weight, timeout)


def _resolvers(r: _Reader, doc: Any) -> tuple[Address, ...] | None:
    """``resolvers``: name servers as ``ip`` or ``ip:port`` (``[v6]:port``); port 53 default."""
    if doc is None:
        return ()
    if not isinstance(doc, list):
        r.error("resolvers", f"expected a list like [127.0.0.1:53], got {_show(doc)}")
        return None
    out: list[Address] = []
    for i, item in enumerate(doc):
        try:
            out.append(_resolver(item))
        except ValueError as exc:
            r.error(f"resolvers[{i}]", str(exc))
    return tuple(out) if len(out) == len(doc) else None


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


def _servers(r: _Reader, doc: Any, path: str) -> tuple[Server, ...] | None:
    if doc is _MISSING:
        r.error(path, "required (a list of servers, may be empty), or discovery")
        return None
    if doc is None or doc == ():
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
        r.get(m, "protocol", path, _choice("http", "tcp", "websocket"), d.protocol),
        r.get(m, "path", path, _path, d.path),
        r.get(m, "method", path, _choice("HEAD", "GET"), d.method),
        r.get(m, "host", path, _check_host, d.host),
        r.get(m, "port", path, _int_in(0, 65535), d.port),
        r.get(m, "interval", path, parse_duration, d.interval),
        r.get(m, "timeout", path, parse_duration, d.timeout),
        r.get(m, "healthy_threshold", path, _int_in(1, 100), d.healthy_threshold),
        r.get(m, "unhealthy_threshold", path, _int_in(1, 100), d.unhealthy_threshold),
        r.get(m, "expected_codes", path, _codes, d.expected_codes),
    )
    if any(v is None for v in values):
        return None
    if values[1] == "websocket":
        # The check is an upgrade: always a GET, and only 101 passes.
        unused = [key for key in ("method", "expected_codes") if key in m]
        for key in unused:
            r.error(f"{path}.{key}", "not used with protocol: websocket (a GET expecting 101)")
        if unused:
            return None
    return HealthCheck(*values)  # type: ignore[arg-type]


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


def load_config(path: str) -> Config:
    """Read and validate the file at ``path``; every failure is a ConfigError with clear lines."""
    return loads_config(read_config_file(path), path)


def read_config_file(path: str) -> bytes:
    """The config file's bytes; a missing or unreadable file is a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError([f"{path}: config file not found"]) from None
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror or exc}"]) from None


def loads_config(raw: bytes, path: str = "<config>") -> Config:
    """Validate config file bytes (``path`` only names them in messages)."""
    try:
        doc = yaml.load(raw, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        raise ConfigError([f"{where}: YAML syntax error: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML error: {exc}"]) from None
    config = parse_config(doc)
    config = _load_tls_files(config, path)
    return replace(config, digest=hashlib.sha256(raw).hexdigest())


def _load_tls_files(config: Config, path: str) -> Config:
    """Check every https listener's certificate and key now (missing, unreadable, not PEM or
    not a pair: a ConfigError, so a reload with a bad certificate changes nothing), and give
    each its files' digest. Relative paths are relative to the config file's directory."""
    problems: list[str] = []
    listeners = list(config.listeners)
    base = os.path.dirname(os.path.abspath(path)) if path != "<config>" else os.getcwd()

    def full(p: str) -> str:
        return os.path.join(base, os.path.expanduser(p))

    for i, lst in enumerate(listeners):
        if lst.tls is None:
            continue
        pairs = tuple(Certificate(full(c.cert), full(c.key)) for c in lst.tls.certificates)
        ca = full(lst.tls.client_ca) if lst.tls.client_ca is not None else None
        try:
            loaded = tls.load(replace(lst.tls, certificates=pairs, client_ca=ca))
        except tls.TlsError as exc:
            problems.append(f"listeners[{i}].tls: {exc}")
            continue
        listeners[i] = replace(
            lst, tls=replace(lst.tls, certificates=pairs, client_ca=ca, digest=loaded.digest)
        )
    if problems:
        raise ConfigError(problems)
    return replace(config, listeners=tuple(listeners))
