"""The configuration's constants (every timeout the proxy uses: no timeout literal lives
anywhere else; the defaults the declarations name), ``ConfigError``, ``Address`` and the
groupings a listener works out from its keys for the data path (``Timeouts``, ``Forwarding``,
``Gzip``), and how a wrong value is quoted in a message (``_show``).

The keys themselves are declared in ``listeners``, ``sections``, ``groups`` and ``top``. This
module imports nothing but the standard library and ``wire.cidrs``: ``tls`` and ``balancer`` import
its names without pulling in validation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Names the schema accepts for values that other modules implement: they check these match
# (balancer.make_scheduler, tls.POLICIES) so the config never imports them.
SCHEDULERS: tuple[str, ...] = ("rr", "wrr", "wlc", "sh")
TLS_POLICIES: tuple[str, ...] = (
    "tls_cipher_policy_1_0",
    "tls_cipher_policy_1_1",
    "tls_cipher_policy_1_2",
    "tls_cipher_policy_1_2_strict",
    "tls_cipher_policy_1_2_strict_with_1_3",
)
TLS_CLIENT_AUTH: tuple[str, ...] = ("required", "optional")

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
# bytes of one supervisor-worker control message (a config file, a stats dump)
CONTROL_LINE_LIMIT = 2**26
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
DEFAULT_PROXY_PROTOCOL_TIMEOUT = 5.0  # seconds: the whole PROXY header, from the accept
# A server's weight (file, discovery, PUT /-/servers): 0 takes no new traffic.
MAX_WEIGHT = 100
DEFAULT_WEIGHT = 100
DEFAULT_GZIP_MIN_LENGTH = 1024


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

    idle: float  # no byte either way for this long -> close
    request: float  # upstream response head not received -> 504
    connect: float  # upstream TCP connect
    # A request head (and a new connection's TLS handshake and first head) must be complete
    # this long after its first byte (for a new connection: after the accept), else 408.
    client_header: float


@dataclass(frozen=True, slots=True)
class Forwarding:
    """CLB's optional forwarding headers (``x_forwarded_for`` stays its own key): each on
    replaces whatever the client sent under that name. ``proto`` None follows
    ``x_forwarded_for``, as before these keys existed."""

    proto: bool | None  # X-Forwarded-Proto: http or https
    port: bool  # X-Forwarded-Port: the listener's port
    client_srcport: bool  # X-Forwarded-Client-Srcport: the client's source port
    slb_ip: bool  # SLB-IP: the listener address the client connected to
    slb_id: str  # SLB-ID: this instance's name; empty: not sent
    # Any of the balancer-owned headers on: read once per request, so worked out once here.
    extra: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        extra = self.port or self.client_srcport or self.slb_ip or bool(self.slb_id)
        object.__setattr__(self, "extra", extra)


@dataclass(frozen=True, slots=True)
class Gzip:
    """On-the-fly compression of a listener's text responses (``gzip: true``)."""

    types: frozenset[str]  # media types compressed: CLB's list plus ``gzip_types``
    min_length: int  # a smaller Content-Length is sent as it is


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
