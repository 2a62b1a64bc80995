"""The declaration of ``server_groups.<name>``: every key of a group and of its sections
(``sticky_session``, ``rebalance``), once each, with its type, default and description, and
the rules between keys (``_rules``). The servers themselves (``servers[]``, ``discovery``)
are declared in ``servers``, the sections about reaching them (``health_check``, ``tls``) in
``backend``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from .addresses import parse_address
from .backend import BackendTls as BackendTls  # re-exported: proxy.dispatch reads it here
from .backend import HealthCheck
from .declare import Items, Problem, declared, given
from .model import (
    DEFAULT_SOCKETIO_PATH,
    DEFAULT_STICKY_COOKIE,
    DEFAULT_STICKY_COOKIE_TIMEOUT,
    SCHEDULERS,
)
from .quantities import (
    AboveOne,
    AboveOne_,
    Duration,
    DurationOrZero,
    DurationOrZero_,
    PositiveNumber_,
    Weight_,
    integer,
)
from .servers import Discovery as Discovery  # re-exported: the group's section
from .servers import Server as Server  # re-exported: the group's section
from .words import (
    Bool,
    CookieName,
    DrainCode,
    Prefix,
    Secret,
    choice,
)


@declared
@dataclass(frozen=True, slots=True)
class StickySession:
    """Session persistence of a group (``sticky_session``); see ``sticky.py``. ``type`` None
    means no cookie persistence (only Socket.IO sid routing, ``socketio``)."""

    type: Annotated[
        Annotated[str | None, choice("insert", "server")],
        Field(
            description=(
                "`insert`: lbproxy sets cookie `cookie` to an opaque token of the chosen "
                "server (not its address) and routes requests carrying it there, WebSocket "
                "upgrades included. `server`: the backend's own cookie `cookie` (say a "
                "session id) pins the client to the server that set it"
            ),
        ),
    ] = None
    cookie: Annotated[
        CookieName,
        Field(
            description=("the cookie's name (required with `type: server`)"),
        ),
    ] = DEFAULT_STICKY_COOKIE
    cookie_timeout: Annotated[
        Duration,
        Field(
            description=(
                "`insert`: the cookie's Max-Age; `server`: how long an unused cookie value is "
                "remembered"
            ),
        ),
    ] = DEFAULT_STICKY_COOKIE_TIMEOUT
    socketio: Annotated[
        Bool,
        Field(
            description=(
                "learn the Engine.IO `sid` from each Socket.IO handshake response and route "
                "every later request and upgrade carrying `sid=` to the server that issued "
                "it: no cookie needed, so clients that drop cookies work too. A sid is "
                "forgotten when its session ends (its WebSocket closes, or the server answers "
                "400) or after the listener's `idle_timeout` unused"
            ),
        ),
    ] = False
    socketio_path: Annotated[
        Prefix,
        Field(
            description=("where Socket.IO requests live (only with `socketio: true`)"),
        ),
    ] = DEFAULT_SOCKETIO_PATH
    secret: Annotated[
        Secret,
        Field(
            description=(
                "`insert` only: the key of the cookie's token (at least 16 printable "
                "characters; never printed). Without it a key built into lbproxy is used, so "
                "anyone who knows a server's id and this source can compute its token. Every "
                "instance of a fleet that shares the secret (and the server list) understands "
                "the cookies the others set. Changing it makes the cookies already handed out "
                "unknown: those clients are placed anew"
            ),
        ),
    ] = field(default="", repr=False)

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        """A key that would have no effect (``cookie`` without ``type``, ``socketio_path``
        without ``socketio: true``) is an error, like an unknown key: the file must not look
        sticky when it is not."""
        out: list[Problem] = []
        kind = raw.get("type")
        if kind == "server" and "cookie" not in raw:
            out.append(
                (("cookie",), "required with type: server (the name of the backend's cookie)")
            )
        if "secret" in raw and kind != "insert":
            out.append((("secret",), "only used with type: insert"))
        socketio = raw.get("socketio", False)
        if "type" not in raw:
            out += [
                ((key,), "only used with type: insert or server")
                for key in ("cookie", "cookie_timeout")
                if key in raw
            ]
            if socketio is False:
                out.append(
                    (
                        (),
                        "enables nothing: set type (insert or server) and/or socketio: true"
                        " (leave sticky_session out for no persistence)",
                    )
                )
        if socketio is False and "socketio_path" in raw:
            out.append((("socketio_path",), "only used with socketio: true"))
        return out


@declared
@dataclass(frozen=True, slots=True)
class Rebalance:
    """Moving WebSockets off servers that hold more than their share (``rebalance``)."""

    tolerance: Annotated[
        AboveOne,
        AboveOne_,
        Field(
            description=(
                "how far from its fair share a server may be before tunnels move: more than "
                "`tolerance` times its share, or less than its share divided by it (above 1)"
            ),
        ),
    ] = 1.25
    rate: Annotated[
        Annotated[int, integer(1, 100000)],
        Field(
            description=("at most this many tunnels closed per second in the group, spread evenly"),
        ),
    ] = 20
    close_code: Annotated[
        DrainCode,
        Field(
            description=(
                "the close code the moved clients get: `1012` (Service Restart: reconnect) or "
                "`1001` (Going Away); the server gets a masked 1001"
            ),
        ),
    ] = 1012


@declared
@dataclass(frozen=True, slots=True, kw_only=True)
class ServerGroup:
    name: SkipJsonSchema[str] = ""  # the group's key in ``server_groups``
    scheduler: Annotated[
        Annotated[str, choice(*SCHEDULERS)],
        Field(
            description=(
                "`rr` round-robin; `wrr` smooth weighted round-robin (as nginx); `wlc` "
                "weighted least connections (open requests and WebSocket tunnels; the right "
                "choice for WebSockets); `sh` consistent hash of the client address"
            ),
        ),
    ] = "rr"
    servers: Annotated[
        Annotated[tuple[Server, ...], Items("servers")],
        Field(
            description=("list of servers (may be empty: every request then gets 503)"),
            json_schema_extra={"x-default": "required (unless `discovery`)"},
        ),
    ] = ()
    health_check: Annotated[
        HealthCheck,
        Field(
            description=("active health checks of every server in the group"),
        ),
    ] = field(default_factory=HealthCheck)
    keepalive_connections: Annotated[
        Annotated[int, integer(0, 10000)],
        Field(
            description=("idle keep-alive connections kept open per server"),
        ),
    ] = 32
    keepalive_timeout: Annotated[
        Duration,
        Field(
            description=(
                "an idle pooled backend connection older than this is closed, not reused. "
                "Keep it below the backends' own keep-alive timeout (Node.js defaults to 5 s) "
                "so the proxy never reuses a connection the backend is closing"
            ),
        ),
    ] = 4.0
    hash_key: Annotated[
        Annotated[str, choice("client_ip", "x_forwarded_for")],
        Field(
            description=(
                "what `sh` hashes: `client_ip`, or `x_forwarded_for` (the first address of "
                "X-Forwarded-For, behind another proxy)"
            ),
        ),
    ] = "client_ip"
    sticky: Annotated[
        StickySession | None,
        Field(
            description=("session persistence, see below"),
            alias="sticky_session",
        ),
    ] = None
    drain_timeout: Annotated[
        DurationOrZero,
        Field(
            description=(
                "what happens to a draining server's open WebSockets: `0` leaves them until "
                "they end (CLB's and HAProxy's default); above 0 lbproxy closes them itself, "
                "spread evenly over this window (see [Draining](#draining))"
            ),
        ),
    ] = 0.0
    drain_close_code: Annotated[
        DrainCode,
        Field(
            description=(
                "the close code those tunnels get: `1001` (Going Away) or `1012` (Service "
                "Restart: clients should reconnect after a random delay)"
            ),
        ),
    ] = 1001
    slow_start: Annotated[
        DurationOrZero,
        Field(
            description=(
                "a server that joins the group (file, DNS, runtime API) or comes back UP "
                "after being down gets a weight that grows linearly from a small start to its "
                "full weight over this window, for every scheduler (see [Slow start and "
                "rebalance](#slow-start-and-rebalance)); `0`: off"
            ),
        ),
    ] = 0.0
    rebalance: Annotated[
        Rebalance | None,
        Field(
            description=(
                "move open WebSockets off servers holding more than their fair share (after "
                "a scale-out), see [Slow start and rebalance](#slow-start-and-rebalance); "
                "off when absent"
            ),
        ),
    ] = None
    discovery: Annotated[
        Discovery | None,
        Field(
            description=("servers from DNS, instead of or beside `servers`: see below"),
        ),
    ] = None
    proxy_protocol: Annotated[
        Annotated[str | None, choice("v1", "v2")],
        Field(
            description=(
                "`v1` or `v2`: each new connection to a server starts with a PROXY protocol "
                "header carrying the client's address and port (HAProxy's `send-proxy`). A "
                "pooled connection is reused only by the client connection it was opened for "
                "(the header belongs to the connection)"
            ),
            json_schema_extra={"x-default": "off"},
        ),
    ] = None
    tls: Annotated[
        BackendTls | None,
        Field(
            description=(
                "TLS to the servers: `{ca, verify, server_name, cert, key, min_version, "
                "ciphers}`, see [Backends over TLS](#backends-over-tls)"
            ),
            json_schema_extra={"x-default": "off (plain HTTP)"},
        ),
    ] = None
    _internal = ("name",)

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        out: list[Problem] = []
        if "servers" not in raw and "discovery" not in raw:
            out.append((("servers",), "required (a list of servers, may be empty), or discovery"))
        servers = raw.get("servers")
        seen = set()
        for i, item in enumerate(servers if isinstance(servers, list) else ()):
            text = item.get("address") if isinstance(item, Mapping) else item
            address = given({"a": text}, "a", parse_address)
            if address in seen:
                out.append((("servers", i, "address"), f"duplicate server {address}"))
            if address is not None:
                seen.add(address)
        return out


@declared
@dataclass(frozen=True, slots=True)
class ServerChange:
    """The body of the runtime API's ``PUT /-/servers/{group}/{host:port}`` (``admin``): a
    server's state, checked like the file's keys (the same ``Weight``)."""

    admin_state: Annotated[
        str | None,
        choice("ready", "drain"),
        Field(description="`ready` takes traffic; `drain` takes no new traffic"),
    ] = None
    weight: Annotated[
        int | None, Weight_, Field(description="the server's weight; 0 takes no new traffic")
    ] = None

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        if not raw:
            return [
                (
                    (),
                    'expected a JSON object with "admin_state" ("ready" or "drain")'
                    ' and/or "weight"',
                )
            ]
        return []


@declared
@dataclass(frozen=True, slots=True)
class ShedRequest:
    """The body of the runtime API's ``POST /-/servers/{group}/{host:port}/shed``: how many of
    the server's WebSockets to close (a fraction or a count) and over how long."""

    fraction: Annotated[
        float | None,
        PositiveNumber_,
        Field(description="the share of the server's open WebSockets to close, 0..1"),
    ] = None
    count: Annotated[
        int | None,
        integer(1, 10_000_000),
        Field(description="how many of the server's open WebSockets to close"),
    ] = None
    over: Annotated[
        float,
        DurationOrZero_,
        Field(description="the window the closes are spread over; 0: all at once"),
    ] = 0.0

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        given_keys = [k for k in ("fraction", "count") if k in raw]
        if len(given_keys) != 1:
            return [((), 'expected a JSON object with "fraction" (0..1) or "count", and "over"')]
        fraction = raw.get("fraction")
        if isinstance(fraction, int | float) and not isinstance(fraction, bool) and fraction > 1:
            return [(("fraction",), f"expected a number above 0 and at most 1, got {fraction}")]
        return []
