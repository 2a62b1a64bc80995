"""lbproxy's configuration: every key declared once (``top``, ``listeners``, ``sections``,
``groups``, ``backend``: type, default, bounds, unit and description, validated by pydantic
through ``declare``), the leaf values (``leaf``: how one is declared; by kind ``quantities``,
``addresses``, ``words``), constants (``model``), validation of a
document (``top.parse_config``), reading the file (``load``), the JSON schema and README
reference (``doc``).

Importing this package loads the declarations and pydantic, not YAML: reading a file
(``load``, which imports yaml) is imported by what reads one (``control.loading``, which also
checks the certificate files a config names). The hot modules import ``model`` and the
declaration modules directly.
"""

from __future__ import annotations

from ..wire.cidrs import IPNetwork
from .addresses import parse_address
from .backend import HealthCheck
from .groups import Discovery, Server, ServerGroup, StickySession
from .listeners import Listener
from .model import (
    ACCEPT_RETRY_DELAY,
    ACCESS_LOG_DRAIN_TIMEOUT,
    CONTROL_LINE_LIMIT,
    DEFAULT_ADMIN_BIND,
    DEFAULT_CLIENT_HEADER_TIMEOUT,
    DEFAULT_CLIENT_TABLE_SIZE,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DISCOVERY_INTERVAL,
    DEFAULT_DNS_TIMEOUT,
    DEFAULT_GZIP_MIN_LENGTH,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_HEADER_COUNT,
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_REQUEST_LINE,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_SOCKETIO_PATH,
    DEFAULT_STICKY_COOKIE,
    DEFAULT_STICKY_COOKIE_TIMEOUT,
    DISCOVERY_EMPTY_INTERVALS,
    DNS_PORT,
    GZIP_TYPES,
    LINGER_TIMEOUT,
    MIN_DISCOVERY_INTERVAL,
    MIN_STICKY_SECRET,
    SCHEDULERS,
    TLS_CLIENT_AUTH,
    TLS_POLICIES,
    WORKER_START_TIMEOUT,
    WORKER_STATS_TIMEOUT,
    WS_CLOSE_FRAME_WAIT,
    WS_CLOSE_HANDSHAKE_TIMEOUT,
    Address,
    ConfigError,
    Forwarding,
    Gzip,
    Timeouts,
)
from .quantities import parse_bandwidth, parse_duration, parse_size
from .sections import Acl, Certificate, ClientLimits, Rule, Tls, WebSocketPolicy
from .top import AccessLog, Admin, Config, parse_config

__all__ = [
    "ACCEPT_RETRY_DELAY",
    "ACCESS_LOG_DRAIN_TIMEOUT",
    "CONTROL_LINE_LIMIT",
    "DEFAULT_ADMIN_BIND",
    "DEFAULT_CLIENT_HEADER_TIMEOUT",
    "DEFAULT_CLIENT_TABLE_SIZE",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_DISCOVERY_INTERVAL",
    "DEFAULT_DNS_TIMEOUT",
    "DEFAULT_GZIP_MIN_LENGTH",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_HEADER_COUNT",
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_MAX_REQUEST_LINE",
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "DEFAULT_SOCKETIO_PATH",
    "DEFAULT_STICKY_COOKIE",
    "DEFAULT_STICKY_COOKIE_TIMEOUT",
    "DISCOVERY_EMPTY_INTERVALS",
    "DNS_PORT",
    "GZIP_TYPES",
    "LINGER_TIMEOUT",
    "MIN_DISCOVERY_INTERVAL",
    "MIN_STICKY_SECRET",
    "SCHEDULERS",
    "TLS_CLIENT_AUTH",
    "TLS_POLICIES",
    "WORKER_START_TIMEOUT",
    "WORKER_STATS_TIMEOUT",
    "WS_CLOSE_FRAME_WAIT",
    "WS_CLOSE_HANDSHAKE_TIMEOUT",
    "AccessLog",
    "Acl",
    "Address",
    "Admin",
    "Certificate",
    "ClientLimits",
    "Config",
    "ConfigError",
    "Discovery",
    "Forwarding",
    "Gzip",
    "HealthCheck",
    "IPNetwork",
    "Listener",
    "Rule",
    "Server",
    "ServerGroup",
    "StickySession",
    "Timeouts",
    "Tls",
    "WebSocketPolicy",
    "parse_address",
    "parse_bandwidth",
    "parse_config",
    "parse_duration",
    "parse_size",
]
