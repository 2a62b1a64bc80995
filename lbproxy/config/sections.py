"""The declaration of a listener's sections: ``tls`` (and its ``certificates[]``), ``acl``,
``websocket``, ``limits`` and ``rules[]``; each key once, with its type, default and
description (see ``listeners`` for the listener itself)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from ..wire.cidrs import Cidrs
from .addresses import Cidr, RuleHost_
from .declare import Items, Problem, declared
from .model import (
    DEFAULT_CLIENT_TABLE_SIZE,
    DEFAULT_PROXY_PROTOCOL_TIMEOUT,
    TLS_CLIENT_AUTH,
    TLS_POLICIES,
)
from .quantities import Duration, PositiveNumber, Rate, integer, size
from .words import FilePath, FilePath_, Name, Prefix, choice


@declared
@dataclass(frozen=True, slots=True)
class Certificate:
    """A certificate chain (leaf first) and its private key, PEM files."""

    cert: Annotated[FilePath, Field(description="PEM file of the chain, leaf first")]
    key: Annotated[FilePath, Field(description="PEM file of its private key")]


@declared
@dataclass(frozen=True, slots=True, kw_only=True)
class Tls:
    """An https listener's TLS: its certificates (the first is the default; the others are
    served to clients whose SNI names them), security policy and client-certificate check.
    ``cert`` and ``key`` are always the default certificate's, whichever form the file used."""

    cert: Annotated[
        FilePath,
        Field(
            description=(
                "one certificate: `cert` is a PEM file with the chain (leaf first), `key` its "
                "PEM private key"
            ),
        ),
    ] = ""
    key: Annotated[
        FilePath,
        Field(
            description=(
                "one certificate: `cert` is a PEM file with the chain (leaf first), `key` its "
                "PEM private key"
            ),
        ),
    ] = ""
    certificates: Annotated[
        Annotated[tuple[Certificate, ...], Items("{cert, key}", non_empty=True)],
        Field(
            description=(
                "several: a list of `{cert, key}` (instead of `cert` and `key`). A client is "
                "served the certificate whose names match the server name it sends (SNI): the "
                "certificate's subjectAltName DNS names, or its subject CN when it has none; "
                "`*.example.com` covers one label (`a.example.com`, not `a.b.example.com` nor "
                "`example.com`); an exact name beats a wildcard; at a tie the earlier "
                "certificate wins. A client that sends no SNI (or an IP address) or a name no "
                "certificate has gets the **first** one"
            ),
        ),
    ] = ()
    policy: Annotated[
        Annotated[str | None, choice(*TLS_POLICIES)],
        Field(
            description=("TLS 1.2 and below ciphers"),
        ),
    ] = None
    client_ca: Annotated[
        Annotated[str | None, FilePath_],
        Field(
            description=(
                "mutual TLS: a PEM file of the CA certificate(s) client certificates must chain to"
            ),
        ),
    ] = None
    client_auth: Annotated[
        Annotated[str | None, choice(*TLS_CLIENT_AUTH)],
        Field(
            description=(
                "`required`: a client without a certificate that verifies against `client_ca` "
                "fails the handshake (nothing of it reaches a backend). `optional`: a client "
                "without any certificate is served as usual; one whose certificate does not "
                "verify still fails (as nginx's `ssl_verify_client optional`). Needs "
                "`client_ca`"
            ),
            json_schema_extra={"x-default": "`required` when `client_ca` is set"},
        ),
    ] = None
    digest: SkipJsonSchema[str] = ""  # sha256 of every file's bytes, filled in by the loader
    # (a renewed certificate makes the config differ, so a reload re-reads it)
    # Each certificate's notAfter (Unix seconds), filled in by the loader: for
    # lbproxy_tls_certificate_expiry_timestamp_seconds.
    not_after: SkipJsonSchema[tuple[float, ...]] = ()

    _internal = ("digest", "not_after")

    def __post_init__(self) -> None:
        if self.certificates:
            object.__setattr__(self, "cert", self.certificates[0].cert)
            object.__setattr__(self, "key", self.certificates[0].key)
        elif self.cert:
            object.__setattr__(self, "certificates", (Certificate(cert=self.cert, key=self.key),))
        if self.client_ca is not None and self.client_auth is None:
            object.__setattr__(self, "client_auth", "required")  # a CA means certificates wanted

    @property
    def files(self) -> tuple[str, ...]:
        """Every file this TLS is built from (certificates, keys, client CA), in order."""
        out = [f for c in self.certificates for f in (c.cert, c.key)]
        if self.client_ca is not None:
            out.append(self.client_ca)
        return tuple(out)

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        out: list[Problem] = []
        if "certificates" in raw:
            if "cert" in raw or "key" in raw:
                out.append(((), "either cert and key, or certificates: not both"))
        else:
            out += [((k,), "required") for k in ("cert", "key") if k not in raw]
        if "client_auth" in raw and "client_ca" not in raw:
            out.append((("client_auth",), "needs client_ca (the CAs client certificates chain to)"))
        return out


@declared
@dataclass(frozen=True, slots=True)
class Acl:
    """Which client addresses a listener takes: ``allow`` only those in ``cidrs``, ``deny``
    everyone but them. IPv4-mapped IPv6 clients (``::ffff:a.b.c.d``) count as IPv4."""

    mode: Annotated[
        Annotated[str, choice("allow", "deny")],
        Field(description="`allow`: only the clients in `cidrs`; `deny`: everyone else"),
    ]
    cidrs: Annotated[
        Annotated[tuple[Cidr, ...], Items("CIDRs", non_empty=True)],
        Field(description="IPv4 and IPv6 CIDRs or single addresses"),
    ]
    _set: SkipJsonSchema[Cidrs] = field(init=False, compare=False, repr=False)  # the lookup

    _required = {"cidrs": "a list like [10.0.0.0/8, '2001:db8::/32']"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "_set", Cidrs(self.cidrs))

    def matches(self, ip: str) -> bool:
        """Whether ``ip`` (a peer address as the socket reports it) is in ``cidrs``."""
        return self._set.matches(ip)

    def allows(self, ip: str) -> bool:
        return self.matches(ip) == (self.mode == "allow")


@declared
@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyProtocol:
    """``listeners[].proxy_protocol``: the PROXY protocol header a layer-4 balancer in front
    sends first on each connection, and who may send it."""

    versions: Annotated[
        Annotated[tuple[Annotated[str, choice("v1", "v2")], ...], Items("v1, v2", non_empty=True)],
        Field(description="the header versions accepted: `[v1, v2]`, `[v2]` or `[v1]`"),
    ] = ("v1", "v2")
    sources: Annotated[
        Annotated[tuple[Cidr, ...], Items("CIDRs", non_empty=True)],
        Field(
            description=(
                "the balancers' addresses (CIDRs or single addresses): a connection from "
                "anywhere else is closed at once"
            ),
            alias="from",
        ),
    ]
    timeout: Annotated[
        Duration,
        Field(description="the whole header must arrive this long after the accept"),
    ] = DEFAULT_PROXY_PROTOCOL_TIMEOUT
    _set: SkipJsonSchema[Cidrs] = field(init=False, compare=False, repr=False)  # the lookup

    _required = {"from": "a list of the balancers' CIDRs like [10.0.0.0/8]"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "_set", Cidrs(self.sources))
        object.__setattr__(self, "versions", tuple(dict.fromkeys(self.versions)))

    def allows(self, ip: str) -> bool:
        """Whether ``ip`` (the socket's peer) may send a header."""
        return self._set.matches(ip)


@declared
@dataclass(frozen=True, slots=True)
class WebSocketPolicy:
    """``listeners[].websocket``: what a client may send through a WebSocket tunnel. Only
    client-to-server traffic is limited; server-to-client never is."""

    max_message_size: Annotated[
        Annotated[int, size(1, 1 << 40)],
        Field(description="bytes of one client message (all its fragments); 0: no limit"),
    ] = 0
    messages_per_second: Annotated[
        PositiveNumber,
        Field(description="client data messages per second per tunnel; 0: no limit"),
    ] = 0.0
    burst: Annotated[
        Annotated[int, integer(1, 1_000_000)],
        Field(
            description="messages allowed at once above the rate (the token bucket's size)",
            json_schema_extra={"x-default": "a second's worth of `messages_per_second`"},
        ),
    ] = 0

    def __post_init__(self) -> None:
        if self.burst == 0:  # not given: a second's worth
            object.__setattr__(self, "burst", max(1, math.ceil(self.messages_per_second)))

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        if "max_message_size" not in raw and "messages_per_second" not in raw:
            return [((), "expected max_message_size and/or messages_per_second")]
        if "burst" in raw and "messages_per_second" not in raw:
            return [(("burst",), "only used with messages_per_second")]
        return []


@declared
@dataclass(frozen=True, slots=True)
class ClientLimits:
    """Per-client limits of a listener (``limits``); 0 means no limit of that kind."""

    connections_per_client: Annotated[
        Annotated[int, integer(0, 1_000_000)],
        Field(
            description=(
                "open connections of one client address (WebSocket tunnels included); past it "
                "a new connection is closed at once, before any request byte is read (on "
                "https: after the TLS handshake), and counted in "
                '`lbproxy_connections_refused_total{reason="connections_per_client"}`. `0`: '
                "unlimited"
            ),
        ),
    ] = 0
    requests_per_second: Annotated[
        Rate,
        Field(
            description=(
                "a token bucket per client: `burst` tokens, refilled at this rate (a number; "
                "`0.5` is one every 2 s); each request and WebSocket upgrade takes one. A "
                "request finding none is answered `429 Too Many Requests` with `Retry-After` "
                "(whole seconds until a token is back) and `Connection: close`, never reaches "
                "a backend, and takes no token. `0`: unlimited"
            ),
        ),
    ] = 0.0
    burst: Annotated[
        Annotated[int, integer(1, 1_000_000)],
        Field(
            description=(
                "the bucket's size: requests a client may make at once after a quiet spell"
            ),
            json_schema_extra={"x-default": "`requests_per_second` rounded up (at least 1)"},
        ),
    ] = 0
    table_size: Annotated[
        Annotated[int, integer(16, 10_000_000)],
        Field(
            description=(
                "clients whose buckets are remembered (16..10,000,000); past it the least "
                "recently seen is forgotten, so a flood of made-up addresses cannot grow "
                "memory. A forgotten client starts again with a full bucket"
            ),
        ),
    ] = DEFAULT_CLIENT_TABLE_SIZE
    scope: Annotated[
        Annotated[str, choice("local", "cluster")],
        Field(
            description=(
                "`local`: each instance counts alone. `cluster` (needs the top-level "
                "`cluster`): `requests_per_second`/`burst` and `connections_per_client` count "
                "across the fleet: each instance decides from its local bucket (no request "
                "waits on Redis) and reconciles it with the fleet's in Redis about ten times a "
                "second (rates) and twice a second (connections), with one atomic script per "
                "batch; the same keys and arithmetic as `local`. See [Several "
                "instances](#several-instances)"
            ),
        ),
    ] = "local"
    on_cluster_failure: Annotated[
        Annotated[str, choice("open", "closed")],
        Field(
            description=(
                "with `scope: cluster`, while Redis is unreachable: `open` falls back to "
                "local limits (each instance alone), `closed` refuses every request of the "
                "listener with 429 (and new connections past `connections_per_client` "
                "locally). Logged once per outage and counted in "
                "`lbproxy_cluster_limit_fallbacks_total`"
            ),
        ),
    ] = "open"

    def __post_init__(self) -> None:
        if self.burst == 0:  # not given: one second's worth
            object.__setattr__(self, "burst", max(1, math.ceil(self.requests_per_second)))

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        out: list[Problem] = []
        if "burst" in raw and not raw.get("requests_per_second"):
            out.append((("burst",), "only used with requests_per_second"))
        if "on_cluster_failure" in raw and raw.get("scope") != "cluster":
            out.append((("on_cluster_failure",), "only used with scope: cluster"))
        conns = raw.get("connections_per_client", 0)
        if "requests_per_second" not in raw and conns == 0 and conns is not False:
            out.append(
                ((), "limits nothing: set connections_per_client and/or requests_per_second")
            )
        return out


@declared
@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """A forwarding rule: requests for ``host`` (exact, ``*.suffix`` or None for any host)
    whose path starts with ``path`` go to ``server_group``. Precedence: ``rules.Router``."""

    host: Annotated[
        Annotated[str | None, RuleHost_],
        Field(
            description=(
                "exact host (`chat.example.com`, case-insensitive, any port) or wildcard "
                "(`*.example.com`: any subdomain, not the bare domain)"
            ),
            json_schema_extra={"x-default": "any host"},
        ),
    ] = None
    path: Annotated[
        Prefix,
        Field(
            description=("path prefix (the query is ignored)"),
        ),
    ] = "/"
    server_group: Annotated[
        Name,
        Field(
            description=("where matching requests (and WebSocket upgrades) go"),
        ),
    ]

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        if "host" not in raw and "path" not in raw:
            return [((), "a rule needs a host, a path or both")]
        return []
