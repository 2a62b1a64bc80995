"""The declaration of ``listeners[]``: every key of a listener and of its sections (``tls``,
``acl``, ``websocket``, ``limits``, ``rules[]``), once each, with its type, default and
description; validation, the JSON schema and the README's reference all come from here.

A ``Listener`` has the file's shape (a key is one field); the groupings the data path reads
(``timeouts``, ``forwarding``, ``trusted_proxies``, ``gzip``) are worked out from those fields
when it is built (``init=False``). ``_rules`` hold the rules between keys. Its keys are
declared in two classes to keep each short: ``ListenerBase`` (where and how it listens) and
``Listener`` itself (forwarding, limits, compression), in the file's order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field
from pydantic.json_schema import SkipJsonSchema

from ..wire.cidrs import Cidrs
from .addresses import BindAddress, Cidr, _rule_host
from .declare import Items, Problem, declared, given
from .model import (
    DEFAULT_CLIENT_HEADER_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_GZIP_MIN_LENGTH,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_HEADER_COUNT,
    DEFAULT_MAX_HEADER_SIZE,
    DEFAULT_MAX_REQUEST_LINE,
    DEFAULT_REQUEST_TIMEOUT,
    GZIP_TYPES,
    Forwarding,
    Gzip,
    Timeouts,
)
from .quantities import Bandwidth, Duration, Port, _size, integer, size
from .sections import Acl, ClientLimits, ProxyProtocol, Rule, Tls, WebSocketPolicy
from .words import Bool, Bool_, MediaTypes, Name, SlbId, _prefix, choice


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerBase:
    """The keys of a listener that say where and how it listens (its address, protocol,
    group, timeouts, head limits, TLS, ACL, PROXY protocol, WebSocket policy): the first part
    of ``Listener``, a class of its own only to keep each class short. A dataclass's base
    fields come first, so the key order (the reference, the schema, "allowed:") is the file's."""

    name: Annotated[
        Name,
        Field(
            description=("unique name; used in metrics and logs"),
        ),
    ]
    bind: Annotated[
        BindAddress,
        Field(
            description=("`host:port` to listen on"),
        ),
    ]
    protocol: Annotated[
        Annotated[str, choice("http", "https")],
        Field(
            description=(
                "`http` (HTTP/1.0 and 1.1, WebSocket upgrades), or `https` (the same over "
                "TLS, 1.2 and up unless `tls.policy` says otherwise: HTTPS and WSS, and "
                "HTTP/2 unless `http2: false`; needs `tls`)"
            ),
        ),
    ] = "http"
    server_group: Annotated[
        Name,
        Field(
            description=("the group this listener forwards to"),
        ),
    ]
    idle_timeout: Annotated[
        Duration,
        Field(
            description=(
                "no byte in either direction for this long closes the connection: HTTP "
                "keep-alive connections and WebSocket tunnels alike (a tunnel within a "
                "quarter of it, at most a second, after: one sweep serves every tunnel, so "
                "none carries a timer of its own). Keep WebSocket pings well inside it"
            ),
        ),
    ] = DEFAULT_IDLE_TIMEOUT
    request_timeout: Annotated[
        Duration,
        Field(
            description=(
                "the backend's response head must arrive this long after the request was "
                "sent, or the client gets 504"
            ),
        ),
    ] = DEFAULT_REQUEST_TIMEOUT
    connect_timeout: Annotated[
        Duration,
        Field(
            description=("TCP connect to a backend; past it the next server is tried (or 504)"),
        ),
    ] = DEFAULT_CONNECT_TIMEOUT
    x_forwarded_for: Annotated[
        Bool,
        Field(
            description=(
                "append the client address to `X-Forwarded-For`; set `X-Forwarded-Proto` (see "
                "`x_forwarded_proto`), `X-Forwarded-Host` and `X-Real-IP` (client-sent values "
                "of those three are replaced). `false` passes headers through untouched"
            ),
        ),
    ] = True
    rules: Annotated[
        Annotated[tuple[Rule, ...], Items("rules (host, path, server_group)")],
        Field(
            description=(
                "forwarding rules (CLB domain and URL rules), see below; a request no rule "
                "matches goes to `server_group`"
            ),
        ),
    ] = ()
    client_header_timeout: Annotated[
        Duration,
        Field(
            description=(
                "a request head must be complete this long after its first byte, else 408 and "
                "close (slowloris). A new connection counts from the accept (its TLS "
                "handshake included); one that never sent a byte is closed without a 408. "
                "Between keep-alive requests `idle_timeout` applies"
            ),
        ),
    ] = DEFAULT_CLIENT_HEADER_TIMEOUT
    max_request_line: Annotated[
        Annotated[int, size(64, 1 << 20)],
        Field(
            description=(
                "longest request line; longer: 414 and close. Sizes: `8192`, `8KiB` (or `8k`, "
                "`8KB`), `1MiB`; 64 bytes..1 MiB"
            ),
        ),
    ] = DEFAULT_MAX_REQUEST_LINE
    max_header_size: Annotated[
        Annotated[int, size(1024, 1 << 20)],
        Field(
            description=(
                "largest request head (request line and every field); larger: 431 and close. "
                "1 KiB..1 MiB, at least `max_request_line`"
            ),
        ),
    ] = DEFAULT_MAX_HEADER_SIZE
    max_header_count: Annotated[
        Annotated[int, integer(1, 10000)],
        Field(
            description=("most header fields in a request; more: 431 and close. 1..10000"),
        ),
    ] = DEFAULT_MAX_HEADER_COUNT
    max_connections: Annotated[
        Annotated[int, integer(0, 10_000_000)],
        Field(
            description=(
                "open client connections of this listener (WebSocket tunnels included; per "
                "worker process with `--workers`); past it a new connection is closed at "
                "once, before anything is read, and counted in "
                '`lbproxy_connections_refused_total{reason="max_connections"}`. `0`: '
                "unlimited"
            ),
        ),
    ] = 0
    tls: Annotated[
        Tls | None,
        Field(
            description=(
                "with `protocol: https`, required: the certificate(s), security policy and "
                "client-certificate check, see [`listeners[].tls`](#listenerstls) below"
            ),
        ),
    ] = None
    redirect_https: Annotated[
        Port,
        Field(
            description=(
                "on an `http` listener, a port: every request is answered `301` to "
                "`https://<the host the client asked for>:<port><same path and query>` "
                "(`:443` left out) and never forwarded"
            ),
            json_schema_extra={"x-default": "none"},
        ),
    ] = 0
    acl: Annotated[
        Acl | None,
        Field(
            description=(
                "`{mode: allow or deny, cidrs: [...]}`: IPv4 and IPv6 CIDRs or single "
                'addresses (`10.0.0.0/8`, `"2001:db8::/32"`, `192.0.2.7`). `allow` takes only '
                "clients in the list, `deny` everyone else. A refused client is closed right "
                "after the accept, before any byte of it is read (and before a TLS "
                "handshake), and counted in "
                '`lbproxy_connections_refused_total{reason="acl"}`. IPv4-mapped IPv6 clients '
                "count as IPv4. An ACL change applies to new connections. With "
                "`proxy_protocol` it is the client's address from the header that is checked, "
                "once the header is read"
            ),
        ),
    ] = None
    proxy_protocol: Annotated[
        ProxyProtocol | None,
        Field(
            description=(
                "`{versions: [v1, v2], from: [CIDRs], timeout: 5s}`: behind a layer-4 balancer "
                "(AWS NLB, Alibaba CLB TCP, HAProxy `send-proxy`), each connection from `from` "
                "must start with a PROXY protocol header (before TLS on https), whose client "
                "address then stands for the client everywhere (forwarding headers, limits, "
                "`sh`, ACL, access log). A connection from elsewhere, without a valid header "
                "or not sending it whole within `timeout`, is closed and counted in "
                '`lbproxy_connections_refused_total{reason="proxy_protocol"}`. v2 `LOCAL` '
                "(the balancer's health checks) keeps the balancer's address; TLVs are "
                "skipped. See [Behind a layer-4 balancer](#behind-a-layer-4-balancer)"
            ),
            json_schema_extra={"x-default": "off"},
        ),
    ] = None
    http2: Annotated[
        Bool,
        Field(
            description=(
                "`https` only: ALPN offers `h2` then `http/1.1`, so browsers and `curl "
                '--http2` speak HTTP/2 (see "HTTP/2" below), whichever certificate SNI picks; '
                "`false` offers `http/1.1` only. No cleartext HTTP/2 (h2c): on an `http` "
                "listener the key is an error. A change applies to new connections"
            ),
        ),
    ] = True
    http2_websocket: Annotated[
        Bool,
        Field(
            description=(
                "`https` with `http2` only: advertise SETTINGS_ENABLE_CONNECT_PROTOCOL and "
                "accept WebSockets over HTTP/2 (RFC 8441 extended CONNECT, `:protocol: "
                "websocket`), so browsers open them as streams of their HTTP/2 connection "
                "instead of a TCP and TLS connection each. Backends get an ordinary HTTP/1.1 "
                "Upgrade. Off by default: advertising the setting has broken clients and "
                'middleboxes before (see "WebSocket over HTTP/2" below). A change applies to '
                "new connections"
            ),
        ),
    ] = False
    websocket: Annotated[
        WebSocketPolicy | None,
        Field(
            description=(
                "message policies for what WebSocket clients send, per tunnel: "
                "`{max_message_size: 1MiB, messages_per_second: 20, burst: 40}` (either limit "
                "alone is fine; `burst`, default a second's worth, only with "
                "`messages_per_second`). A client frame, or a fragmented message whose frames "
                "add up to more than `max_message_size` is refused when its header arrives, "
                "before a byte of it reaches the server: the client gets a close frame with "
                "1009 (Message Too Big) and the server a masked 1001 in its place. A client "
                "past the rate (token bucket of `burst` messages refilled at "
                "`messages_per_second`) gets 1008 (Policy Violation), the server 1001. "
                "Server-to-client traffic is never limited. Under `max_message_size` no "
                "WebSocket extension (permessage-deflate) is negotiated, so a compressed "
                "message cannot slip under it (see [Compression under a message size "
                "limit](#compression-under-a-message-size-limit)); a client frame using one "
                "anyway gets 1002 (Protocol Error). Counted in "
                '`lbproxy_websocket_policy_closes_total{reason}` and as `reason="policy"`. A '
                "reload changes the policy of new tunnels; open ones keep theirs"
            ),
        ),
    ] = None


@declared
@dataclass(frozen=True, slots=True, kw_only=True)
class Listener(ListenerBase):
    # A listener (``listeners[]``): ListenerBase's keys, then how requests are forwarded
    # (headers), limited (per client, bandwidth) and compressed. (No docstring: it would
    # become the schema's description of a listener.)

    x_forwarded_proto: Annotated[
        Annotated[bool | None, Bool_],
        Field(
            description=(
                "set `X-Forwarded-Proto: http` or `https`, replacing the client's; `false` "
                "passes the client's on (behind a TLS terminator that sets it)"
            ),
            json_schema_extra={"x-default": "as `x_forwarded_for`"},
        ),
    ] = None
    x_forwarded_port: Annotated[
        Bool,
        Field(
            description=("set `X-Forwarded-Port` to the listener's port"),
        ),
    ] = False
    x_forwarded_client_srcport: Annotated[
        Bool,
        Field(
            description=("set `X-Forwarded-Client-Srcport` to the client's TCP source port"),
        ),
    ] = False
    slb_ip: Annotated[
        Bool,
        Field(
            description=("set `SLB-IP` to the listener address the client connected to"),
        ),
    ] = False
    slb_id: Annotated[
        SlbId,
        Field(
            description=(
                "set `SLB-ID` to this name (visible ASCII, no spaces), say the instance's id. "
                "A client's own `X-Forwarded-Port`, `X-Forwarded-Client-Srcport`, `SLB-IP` "
                "and `SLB-ID` never reach a backend, whether these options are on or off"
            ),
        ),
    ] = ""
    trusted_cidrs: Annotated[
        Annotated[tuple[Cidr, ...], Items("CIDRs like [10.0.0.0/8]")] | None,
        Field(
            description=(
                'with `limits`: a list of CIDRs (`[10.0.0.0/8, "2001:db8::/32"]`) of proxies '
                "in front of lbproxy. For a request from one of them, the client is the "
                "nearest `X-Forwarded-For` address (read from the right) that is not itself a "
                "trusted proxy: the address your proxy appended, so a client cannot pick its "
                "key by sending an `X-Forwarded-For` of its own. Their own connections are "
                "not counted against `connections_per_client` (they carry many clients)"
            ),
            alias="trusted_proxies",
        ),
    ] = None
    limits: Annotated[
        ClientLimits | None,
        Field(
            description=("per-client limits, see below"),
        ),
    ] = None
    bandwidth: Annotated[
        Bandwidth,
        Field(
            description=(
                "cap each direction of the listener's traffic (bytes read from its clients; "
                "bytes read from backends for its clients), as CLB's peak bandwidth: "
                "`10MiB/s`, `512KiB/s`, `1048576` (bytes per second; K, M, G are binary; at "
                "least 1 KiB/s); per worker process with `--workers`. Reading pauses to keep "
                "the listener under it, shared fairly: connections over the cap wait their "
                "turn and each reads once per turn. It holds over a second or more (a read "
                "may run up to 256 KiB ahead of it, per connection). WebSocket tunnels share "
                "it: each side's reads count against its direction"
            ),
            json_schema_extra={"x-default": "none"},
        ),
    ] = 0
    compress: Annotated[
        Bool,
        Field(
            description=(
                "compress text responses on the fly (the demo config turns it on, as CLB does "
                "by default), see below"
            ),
            alias="gzip",
        ),
    ] = False
    gzip_types: Annotated[
        MediaTypes,
        Field(
            description=(
                "with `gzip: true`: media types compressed besides CLB's list (`text/html`, "
                "`text/plain`, `text/css`, `text/xml`, `application/javascript`, "
                "`application/x-javascript`, `application/json`, `application/xml`, "
                "`application/rss+xml`, `application/atom+xml`, `image/svg+xml`, and "
                "`text/javascript`, JavaScript's registered type since RFC 9239, which "
                "Python, aiohttp and most servers now send), e.g. `[text/csv]`"
            ),
        ),
    ] = frozenset()
    gzip_min_length: Annotated[
        Annotated[int, size(0, 1 << 30)],
        Field(
            description=(
                "with `gzip: true`: a response whose Content-Length is smaller is sent as it "
                "is (a response without one, chunked, is compressed whatever its size)"
            ),
        ),
    ] = DEFAULT_GZIP_MIN_LENGTH
    # Worked out from the keys above, for the data path (read per connection or request).
    timeouts: SkipJsonSchema[Timeouts] = field(init=False, compare=False, repr=False)
    forwarding: SkipJsonSchema[Forwarding] = field(init=False, compare=False, repr=False)
    trusted_proxies: SkipJsonSchema[Cidrs | None] = field(init=False, compare=False, repr=False)
    gzip: SkipJsonSchema[Gzip | None] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        timeouts = Timeouts(
            self.idle_timeout,
            self.request_timeout,
            self.connect_timeout,
            self.client_header_timeout,
        )
        object.__setattr__(self, "timeouts", timeouts)
        forwarding = Forwarding(
            self.x_forwarded_proto,
            self.x_forwarded_port,
            self.x_forwarded_client_srcport,
            self.slb_ip,
            self.slb_id,
        )
        object.__setattr__(self, "forwarding", forwarding)
        trusted = Cidrs(self.trusted_cidrs) if self.trusted_cidrs else None
        object.__setattr__(self, "trusted_proxies", trusted)
        gzip = Gzip(GZIP_TYPES | self.gzip_types, self.gzip_min_length) if self.compress else None
        object.__setattr__(self, "gzip", gzip)

    @staticmethod
    def _rules(raw: Mapping[str, Any], value: object) -> list[Problem]:
        out: list[Problem] = []
        protocol = raw.get("protocol", "http")
        line = given(raw, "max_request_line", _size(64, 1 << 20))
        head = given(raw, "max_header_size", _size(1024, 1 << 20))
        line = DEFAULT_MAX_REQUEST_LINE if line is None and "max_request_line" not in raw else line
        head = DEFAULT_MAX_HEADER_SIZE if head is None and "max_header_size" not in raw else head
        if line is not None and head is not None and line > head:
            out.append(
                (
                    ("max_header_size",),
                    f"must be at least max_request_line ({line}): the request line is part of"
                    " the head",
                )
            )
        if "tls" in raw and protocol == "http":
            out.append((("tls",), "only used with protocol: https"))
        if "tls" not in raw and protocol == "https":
            out.append((("tls",), "required with protocol: https (cert and key, or certificates)"))
        if "redirect_https" in raw and protocol == "https":
            out.append((("redirect_https",), "only used with protocol: http"))
        if "http2" in raw and protocol == "http":
            # No h2c (cleartext HTTP/2): browsers speak HTTP/2 over TLS only.
            out.append((("http2",), "only used with protocol: https (HTTP/2 is offered by ALPN)"))
        if raw.get("http2_websocket") and (protocol == "http" or raw.get("http2") is False):
            out.append(
                (("http2_websocket",), "only used with protocol: https and http2 (RFC 8441)")
            )
        if "trusted_proxies" in raw and "limits" not in raw:
            out.append(
                (("trusted_proxies",), "only used with limits (it picks the client address)")
            )
        if raw.get("gzip") is not True:
            out += [
                ((k,), "only used with gzip: true")
                for k in ("gzip_types", "gzip_min_length")
                if k in raw
            ]
        out += _duplicate_rules(raw.get("rules"))
        return out


def _duplicate_rules(rules: Any) -> list[Problem]:
    if not isinstance(rules, list):
        return []
    out: list[Problem] = []
    seen: dict[tuple[str | None, str], int] = {}
    for j, rule in enumerate(rules):
        if not isinstance(rule, Mapping):
            continue
        host = given(rule, "host", _rule_host)
        path = given(rule, "path", _prefix) if "path" in rule else "/"
        if path is None or (host is None and "host" in rule):
            continue
        if (host, path) in seen:
            shown = f"host {host!r} and path {path!r}" if host else f"path {path!r}"
            out.append(
                (("rules", j), f"duplicate rule: {shown} already in rules[{seen[host, path]}]")
            )
        else:
            seen[host, path] = j
    return out
