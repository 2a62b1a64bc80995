"""Header rules: what a request looks like to the backend and a response to the client.

Owns hop-by-hop removal (RFC 9110 section 7.6.1: Connection and every token it lists,
Keep-Alive, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-Connection), the X-Forwarded-*
family, the X-Client-Cert-* headers clients may not send, the upgrade hand-through (and the
WebSocket extension offer a message size limit rules out), and the short error responses
the proxy writes itself. Pure functions over parsed heads; the proxy calls them once per
message. A head goes out as its sender wrote it, but for the lines the
parser noted as hop-by-hop, X-Forwarded-* or balancer-owned: the common head costs a list
copy and a join, not an object per field.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from .http1 import RequestHead, ResponseHead

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    }
)
_FORWARDED_SET = frozenset({b"x-forwarded-host", b"x-real-ip"})
# The WebSocket extension offer (permessage-deflate, RFC 7692), dropped from an upgrade on a
# listener with a max_message_size: nothing offered, nothing compressed, so a message's size is
# its frames' payload lengths (tunnel_end.TunnelBase.police).
WS_EXTENSIONS: Final = b"sec-websocket-extensions"
# Set only by the proxy, from a verified client certificate (mutual TLS): a client's own are
# removed on every listener, so a backend can trust them whatever the listener.
CLIENT_CERT = frozenset({b"x-client-cert-subject", b"x-client-cert-fingerprint"})
# Headers only the balancer may set (CLB's optional ones): a client's are never passed on,
# whether the listener sends its own or not, so a backend can trust them.
BALANCER_OWNED = frozenset(
    {b"x-forwarded-port", b"x-forwarded-client-srcport", b"slb-ip", b"slb-id"}
)
_DROP = HOP_BY_HOP | BALANCER_OWNED | CLIENT_CERT
# Never removed because Connection lists them ("Connection: Content-Length"): the proxy frames
# the body it relays by Content-Length, so dropping it would let the other side read that body
# as the next message (request smuggling / response desync).
_NEVER_DROPPED = frozenset({b"content-length", b"host"})
# Connection tokens whose fields the parser already notes as hop-by-hop or always dropped (or
# that are never dropped): a Connection header listing only these needs no look at the other
# fields.
_LISTED_OK = _DROP | _NEVER_DROPPED | {b"close"}

REASONS = {
    301: "Moved Permanently",
    400: "Bad Request",
    404: "Not Found",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def upstream_request_head(
    req: RequestHead,
    *,
    client_ip: str,
    scheme: bytes,
    forwarded: bool,
    default_host: bytes,
    upgrade: bool,
    proto: bool | None = None,
    extra: tuple[bytes, ...] = (),
    no_extensions: bool = False,
) -> bytes:
    """The request head sent to a backend: always HTTP/1.1, keep-alive, hop-by-hop and
    client-sent X-Client-Cert-* removed, ``extra`` lines (the proxy's own) added.

    A chunked body is forwarded with its framing untouched, so Transfer-Encoding: chunked is
    put back; an upgrade keeps ``Connection: Upgrade`` and its ``Upgrade`` value, and loses
    its Sec-WebSocket-Extensions offer with ``no_extensions``.
    ``forwarded``: X-Forwarded-For appended to, X-Forwarded-Host and X-Real-IP replaced;
    ``proto`` (None: as ``forwarded``): X-Forwarded-Proto replaced; ``extra``: the
    balancer-owned lines (``forwarding_lines``), added after every client header of those
    names is dropped.

    The field lines go out as the client sent them; only the lines the parser noted (hop-by-hop,
    X-Forwarded-*, X-Real-IP, balancer-owned, X-Client-Cert-*, Host of an absolute-form target)
    are dropped or replaced. A Connection header naming other fields takes the slower path that
    looks at every field.
    """
    if proto is None:
        proto = forwarded
    if req.connection and not req.connection <= _LISTED_OK:
        return _upstream_request_head_by_field(
            req,
            client_ip=client_ip,
            scheme=scheme,
            forwarded=forwarded,
            default_host=default_host,
            upgrade=upgrade,
            proto=proto,
            extra=extra,
            no_extensions=no_extensions,
        )
    lines = req.lines
    hop = req.hop
    out = lines.copy()
    # An HTTP/1.1 request line is sent as it came (the parser split it into these parts)
    # unless its target was rewritten since (an absolute-form target goes out in origin
    # form: shorter, so the lengths tell).
    if req.version != 1 or len(lines[0]) != len(req.method) + len(req.target) + 10:
        out[0] = req.method + b" " + req.target + b" HTTP/1.1"
    host = req.host
    host_line = req.host_line
    if host_line and req.absolute:
        # The authority of an absolute-form target replaces Host (RFC 9112 3.2.2).
        assert host is not None
        out[host_line] = lines[host_line].partition(b":")[0] + b": " + host
    xff: list[bytes] = []
    drop = hop
    noted = req.forwarded
    if noted is not None:
        gone: list[int] = []
        for i in noted:
            name, _, value = lines[i].partition(b":")
            lname = name.lower()
            if lname == b"x-forwarded-for":
                keep = not forwarded
                if forwarded:
                    xff.append(value.strip())
            elif lname == b"x-forwarded-proto":
                keep = not proto
            elif lname in _FORWARDED_SET:
                keep = not forwarded
            else:
                keep = False  # balancer-owned or X-Client-Cert-*: never passed from a client
            if not keep:
                gone.append(i)
        if gone:
            drop = gone if hop is None else hop + gone
    if no_extensions:
        offer = req.extensions
        if offer is not None:
            drop = offer if drop is None else drop + offer
    if drop is not None:
        for i in sorted(drop, reverse=True):
            del out[i]
    if not host_line:
        # An HTTP/1.0 client may omit Host; HTTP/1.1 to the backend requires one.
        host = host or default_host
        out.append(b"Host: " + host)
    upgrade_to = _first_value(lines, hop, b"upgrade") if upgrade else None
    return _end_head(
        out, req.chunked, upgrade_to, forwarded, proto, xff, client_ip, scheme, host, extra
    )


def _end_head(
    out: list[bytes],
    chunked: bool,
    upgrade_to: bytes | None,
    forwarded: bool,
    proto: bool,
    xff: list[bytes],
    client_ip: str,
    scheme: bytes,
    host: bytes | None,
    extra: tuple[bytes, ...],
) -> bytes:
    """The lines the proxy adds after the client's own (framing, upgrade, X-Forwarded-*,
    ``extra``) and the head's end, for both ways of building a request head."""
    if chunked:
        out.append(b"Transfer-Encoding: chunked")
    if upgrade_to is not None:
        out.append(b"Connection: Upgrade")
        out.append(b"Upgrade: " + upgrade_to)
    if forwarded:
        ip = client_ip.encode()
        xff.append(ip)
        out.append(b"X-Forwarded-For: " + b", ".join(xff))
        if proto:
            out.append(b"X-Forwarded-Proto: " + scheme)
        if host:
            out.append(b"X-Forwarded-Host: " + host)
        out.append(b"X-Real-IP: " + ip)
    elif proto:
        out.append(b"X-Forwarded-Proto: " + scheme)
    out.extend(extra)
    out.append(b"\r\n")
    return b"\r\n".join(out)


def _first_value(lines: list[bytes], among: list[int] | None, lname: bytes) -> bytes:
    """The value of the first of the lines ``among`` whose field is named ``lname``."""
    for i in sorted(among or ()):
        name, _, value = lines[i].partition(b":")
        if name.lower() == lname:
            return value.strip()
    return b""


def _upstream_request_head_by_field(
    req: RequestHead,
    *,
    client_ip: str,
    scheme: bytes,
    forwarded: bool,
    default_host: bytes,
    upgrade: bool,
    proto: bool,
    extra: tuple[bytes, ...],
    no_extensions: bool,
) -> bytes:
    """``upstream_request_head`` when Connection names fields to drop: field by field."""
    drop = _DROP | (req.connection - _NEVER_DROPPED)
    if proto:
        drop = drop | {b"x-forwarded-proto"}
    if no_extensions:
        drop = drop | {WS_EXTENSIONS}
    lines = [req.method + b" " + req.target + b" HTTP/1.1"]
    xff: list[bytes] = []
    has_host = False
    for name, value in req.headers:
        lname = name.lower()
        if lname in drop:
            continue
        if forwarded:
            if lname == b"x-forwarded-for":
                xff.append(value)
                continue
            if lname in _FORWARDED_SET:
                continue
        if lname == b"host":
            has_host = True
            if req.host is not None:
                value = req.host  # the authority of an absolute-form target (RFC 9112 3.2.2)
        lines.append(name + b": " + value)
    host = req.host
    if not has_host:
        host = host or default_host
        lines.append(b"Host: " + host)
    upgrade_to = _header_value(req, b"upgrade") if upgrade else None
    return _end_head(
        lines, req.chunked, upgrade_to, forwarded, proto, xff, client_ip, scheme, host, extra
    )


def forwarding_lines(
    *,
    port: int | None,
    client_port: int | None,
    slb_ip: str | None,
    slb_id: str,
) -> tuple[bytes, ...]:
    """CLB's optional forwarding headers, each given only when its option is on (None or
    empty: off): X-Forwarded-Port (the listener's port), X-Forwarded-Client-Srcport (the
    client's source port), SLB-IP (the listener address the client connected to), SLB-ID
    (the configured instance name)."""
    out: list[bytes] = []
    if port is not None:
        out.append(b"X-Forwarded-Port: %d" % port)
    if client_port is not None:
        out.append(b"X-Forwarded-Client-Srcport: %d" % client_port)
    if slb_ip:
        out.append(b"SLB-IP: " + slb_ip.encode())
    if slb_id:
        out.append(b"SLB-ID: " + slb_id.encode())
    return tuple(out)


def origin_form(target: bytes) -> bytes:
    """The path and query of an absolute-form target (``http://a.example/p?q`` -> ``/p?q``),
    the form a request to an origin server carries; ``/`` when it has none."""
    start = target.find(b"://") + 3
    stop = len(target)
    for delimiter in b"/?#":
        i = target.find(delimiter, start, stop)
        if i >= 0:
            stop = i
    rest = target[stop:].partition(b"#")[0]  # a fragment is never sent
    if not rest.startswith(b"/"):
        rest = b"/" + rest
    return rest


def https_location(host: bytes, port: int, target: bytes) -> str:
    """``https://<host>:<port><target>`` for ``redirect_https``: ``host`` is the request's
    Host (its port, if any, replaced); the port is left out when it is 443. The parser has
    already refused a Host or target with control characters or spaces."""
    name = host.decode("latin-1")
    # "[v6]:port" keeps its brackets; "name:port" and "a.b.c.d:port" lose the port.
    name = name[: name.find("]") + 1] if name.startswith("[") else name.partition(":")[0]
    if not target.startswith(b"/"):
        target = b"/"  # asterisk-form (OPTIONS *)
    netloc = name if port == 443 else f"{name}:{port}"
    return f"https://{netloc}{target.decode('latin-1')}"


def accepts_extension(resp: ResponseHead) -> bool:
    """A 101 accepting a WebSocket extension (a Sec-WebSocket-Extensions field not empty)."""
    return any(v for name, v in resp.headers if name.lower() == WS_EXTENSIONS)


def _header_value(req: RequestHead, lname: bytes) -> bytes:
    for name, value in req.headers:
        if name.lower() == lname:
            return value
    return b""


def client_response_head(
    resp: ResponseHead,
    *,
    chunked: bool,
    keep_alive: bool,
    client_version: int,
    extra: tuple[bytes, ...] = (),
) -> bytes:
    """The response head sent to the client, hop-by-hop removed.

    ``chunked``: the body is relayed with its chunked framing, so say so. ``keep_alive``:
    whether the client connection stays open after this response; HTTP/1.0 clients need it
    said explicitly, HTTP/1.1 clients need to be told when it closes.

    As for requests, the field lines go out as received but for the hop-by-hop ones the
    parser noted (and a Content-Length that chunked overrides, RFC 9112 6.3).
    """
    conn = resp.connection
    if conn and not conn <= _LISTED_OK:
        drop = HOP_BY_HOP | (conn - _NEVER_DROPPED)
        if resp.chunked:
            drop = drop | {b"content-length"}
        out = [b""]
        for name, value in resp.headers:
            if name.lower() not in drop:
                out.append(name + b": " + value)
    else:
        out = resp.lines.copy()
        if resp.hop is not None:
            for i in sorted(resp.hop, reverse=True):
                del out[i]
    line = resp.lines[0]
    # An HTTP/1.1 status line with its reason's SP is sent as it came: it is what the format
    # below would make (the parser took only a canonical 3-digit code), without formatting.
    if resp.version != 1 or len(line) < 13:
        out[0] = b"HTTP/1.1 %d %s" % (resp.status, resp.reason)
    else:
        out[0] = line
    out.extend(extra)
    if chunked:
        out.append(b"Transfer-Encoding: chunked")
    if not keep_alive:
        out.append(b"Connection: close")
    elif client_version == 0:
        out.append(b"Connection: keep-alive")
    out.append(b"\r\n")
    return b"\r\n".join(out)


def error_response(
    status: int,
    detail: str = "",
    *,
    extra: Iterable[tuple[str, str]] = (),
    keep_alive: bool = False,
) -> bytes:
    """A short text/plain response the proxy writes itself (400, 502, 503, 504, ...)."""
    reason = REASONS.get(status, "Error")
    body = f"{status} {reason}{': ' + detail if detail else ''}\n".encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
    ]
    head.extend(f"{k}: {v}" for k, v in extra)
    head.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body
