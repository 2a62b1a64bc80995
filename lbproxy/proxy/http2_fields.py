"""An HTTP/2 request's fields as the HTTP/1.1 request head the exchange sends
(``request_head``; RFC 8441's extended CONNECT too, with the key it is sent with:
``extended_connect``, ``websocket_key``), a backend's response head as HTTP/2 fields
(``response_fields``, ``websocket_fields``), and the proxy's own short answers
(``error_response``): pure conversions, no connection state (``http2_stream`` uses them).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable

from ..wire import headers
from ..wire.http1 import Limits, ParseError, RequestHead, ResponseHead, parse_request_head

_NEVER_DROPPED = frozenset({b"content-length", b"host"})
# What of a backend's 101 stays out of the stream's 200: the connection-specific fields HTTP/2
# forbids (RFC 9113 8.2.2: Upgrade, Connection, the hop-by-hop ones), the handshake's Accept
# (RFC 8441 5: the stream has no key) and a length (none on a 2xx to CONNECT, RFC 9110 9.3.6).
_WS_DROPPED = headers.HOP_BY_HOP | {b"sec-websocket-accept", b"content-length"}


def websocket_key() -> bytes:
    """A fresh Sec-WebSocket-Key for the HTTP/1.1 Upgrade an extended CONNECT becomes."""
    return base64.b64encode(os.urandom(16))


def websocket_fields(resp: ResponseHead) -> list[tuple[bytes, bytes]]:
    """The 200 an extended CONNECT gets for a backend's 101 ``resp``: every field of it (the
    subprotocol and extensions the backend chose, its Set-Cookie and the proxy's sticky one)
    but the connection-specific ones, those its Connection names too, and the Accept."""
    drop = _WS_DROPPED | resp.connection if resp.connection else _WS_DROPPED
    fields = [(b":status", b"200")]
    fields += [(k.lower(), v) for k, v in resp.headers if k.lower() not in drop]
    return fields


def extended_connect(raw: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether a request's fields have ``:protocol`` (RFC 8441; pseudo-fields come first)."""
    for name, _ in raw:
        if name[:1] != b":":
            return False
        if name == b":protocol":
            return True
    return False


def request_head(
    raw: Iterable[tuple[bytes, bytes]], ended: bool, limits: Limits, ws_key: bytes = b""
) -> RequestHead:
    """The HTTP/1.1 request an HTTP/2 request's fields (as h2 validated them) become, parsed
    by the HTTP/1.1 parser with the listener's ``limits``: ``:authority`` is Host (it wins
    over a host field, RFC 9113 8.3.1), cookie crumbs are joined with "; " (8.2.3), and a body
    that may follow (no END_STREAM) without content-length is chunked.

    With ``ws_key`` (``http2_websocket``), an extended CONNECT with ``:protocol: websocket``
    (RFC 8441 5) becomes the HTTP/1.1 Upgrade a browser would have sent: GET, Connection:
    Upgrade, Upgrade: websocket and ``ws_key`` as its Sec-WebSocket-Key (HTTP/2 has none), the
    client's other Sec-WebSocket-* fields kept. Raises ParseError (501 for another CONNECT,
    400, 414, 431)."""
    method = path = authority = protocol = None
    lines: list[bytes] = []
    cookies: list[bytes] = []
    has_length = False
    for name, value in raw:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":protocol":
                protocol = value
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host" and authority is not None:
            continue
        if name == b"content-length":
            has_length = True
        lines.append(name + b": " + value)
    if method == b"CONNECT" and ws_key and protocol is not None:
        if protocol.lower() != b"websocket":
            raise ParseError(501, "only :protocol websocket is supported (RFC 8441)")
        method = b"GET"
        lines = [ln for ln in lines if ln[:18] != b"sec-websocket-key:"]
        lines += [b"connection: upgrade", b"upgrade: websocket", b"sec-websocket-key: " + ws_key]
        ended = True  # what follows is the tunnel's, not a body
    if method is None or path is None or method == b"CONNECT":
        raise ParseError(501, "CONNECT is not supported over HTTP/2")
    if path[:1] != b"/" and path != b"*":
        raise ParseError(400, "the :path is not a path")
    if authority is not None:
        lines.insert(0, b"host: " + authority)
    if cookies:
        lines.append(b"cookie: " + b"; ".join(cookies))
    if not ended and not has_length:
        lines.append(b"transfer-encoding: chunked")
    lines.append(b"\r\n")
    req = parse_request_head(method + b" " + path + b" HTTP/1.1\r\n" + b"\r\n".join(lines), limits)
    assert req is not None  # the head is complete
    return req


def response_fields(resp: ResponseHead, extra: tuple[bytes, ...]) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 response head as HTTP/2 fields: ``:status``, names lower-cased, hop-by-hop
    fields dropped (those Connection names too), content-length dropped beside chunked (the
    body goes out de-chunked), and the proxy's ``extra`` lines (``Name: value``) added."""
    drop = headers.HOP_BY_HOP
    if resp.connection:
        drop = drop | (resp.connection - _NEVER_DROPPED)
    if resp.chunked:
        drop = drop | {b"content-length"}
    fields = [(b":status", b"%d" % resp.status)]
    for name, value in resp.headers:
        lname = name.lower()
        if lname not in drop:
            fields.append((lname, value))
    for line in extra:
        name, _, value = line.partition(b":")
        fields.append((name.strip().lower(), value.strip()))
    return fields


def error_response(
    status: int, reason: str, extra: tuple[tuple[str, str], ...]
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The proxy's own short answer (``status``, a line of text saying ``reason``, the
    ``extra`` fields such as Retry-After) as HTTP/2 fields and a body."""
    title = headers.REASONS.get(status, "Error")
    body = f"{status} {title}{': ' + reason if reason else ''}\n".encode()
    fields = [
        (b":status", b"%d" % status),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", b"%d" % len(body)),
        (b"cache-control", b"no-store"),
    ]
    fields.extend((k.lower().encode(), v.encode()) for k, v in extra)
    return fields, body
