"""The configuration model: the frozen dataclasses the running proxy reads (one immutable
snapshot per reload), the constants of every timeout the proxy uses (no timeout literal lives
anywhere else) and ``ConfigError``.

Cheap to import on purpose: no YAML, no validation library, nothing but the standard library
and ``cidrs``. Hot modules that want ``Address`` or ``Listener`` import only this. Workers pickle
these objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..wire.cidrs import Cidrs, IPNetwork

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
# A server's weight (file, discovery, PUT /-/servers): 0 takes no new traffic.
MAX_WEIGHT = 100
DEFAULT_WEIGHT = 100
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
    policy: str | None = None  # a TLS_POLICIES name; None: TLS 1.2 and up, Python's ciphers
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
    weight: int = DEFAULT_WEIGHT
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
    weight: int = DEFAULT_WEIGHT  # A/AAAA servers' weight
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
    """The admin listener (``admin``). Safe by default: a bind off loopback needs a token (or
    ``insecure: true``); the checks themselves (Host, Origin, content type) are admin.py's."""

    bind: Address = Address("127.0.0.1", 8404)
    # The token in effect: ``token`` as written, or what ``token_file`` / ``token_env`` held
    # when the file was loaded (filled in by control.loading). Non-empty: every write (and
    # GET /-/servers; every page with ``token_for_reads``) needs "Authorization: Bearer".
    token: str = field(default="", repr=False)
    token_file: str | None = None  # a file holding the token (mode 0600 or stricter)
    token_env: str | None = None  # an environment variable holding the token
    token_for_reads: bool = False  # the token guards the read-only pages too (not /healthz)
    insecure: bool = False  # a bind off loopback without a token, on purpose (warned)
    allowed_hosts: tuple[str, ...] = ()  # Host names the admin answers to besides its own
    tls: Tls | None = None  # https on the admin listener; None: plain http


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
