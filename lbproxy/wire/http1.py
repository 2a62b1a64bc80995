"""Strict HTTP/1.x wire parsing, with no I/O: message heads and body framing.

This module owns how the proxy reads HTTP/1.0 and HTTP/1.1 bytes: request and response heads
(RFC 9112 sections 2-5), the decision of how the body that follows a head is delimited
(RFC 9112 section 6) and the tracking of a chunked body as it streams through (section 7.1).

It is the anti-request-smuggling layer. Anything two HTTP implementations could frame
differently (Content-Length next to Transfer-Encoding, conflicting lengths, obs-fold, bare CR
or LF, control bytes, odd chunk sizes) is refused here with a :class:`ParseError` carrying the
status the proxy should answer, rather than "repaired". A request Transfer-Encoding other than
exactly ``chunked`` gets 400, not the 501 RFC 9112 section 6.1 also allows, so that every
framing fault has one answer.

Everything here runs once or more per proxied message, so the common case is written for
CPython's speed: one ``find`` for the end of the head, one ``split`` into lines, whole-head
validity checked by one C-level ``translate`` call, header names classified by one dict
lookup, and chunk data skipped arithmetically rather than scanned. In the compiled build a
head valid in the common way is split and its special fields found by one C pass instead
(``_headscan.c``, about half the cost); what it finds unusual takes the Python path, which
decides alone what is wrong with it. That is also why this
module is long (over the ~600 lines of the others): the request and response head parsers
are written out side by side rather than sharing helpers whose calls would cost as much as
the work they do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BODY_CHUNKED",
    "BODY_CLOSE",
    "BODY_LENGTH",
    "BODY_NONE",
    "CHUNKED_EOF",
    "ChunkedTracker",
    "Head",
    "Limits",
    "ParseError",
    "RequestHead",
    "ResponseHead",
    "parse_request_head",
    "parse_response_head",
    "request_body_kind",
    "response_body_kind",
]

BODY_NONE: Final = 0
BODY_LENGTH: Final = 1
BODY_CHUNKED: Final = 2
BODY_CLOSE: Final = 3

CHUNKED_EOF: Final = b"0\r\n\r\n"


class ParseError(Exception):
    """A message the proxy refuses; ``status`` is what to answer (or 502 for a backend)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


@dataclass(slots=True)
class Limits:
    """Size limits for a request head. Sizes are bytes, counted without leading empty lines."""

    max_request_line: int = 8192  # request line, without its CRLF; over it -> 414
    max_header_size: int = 32768  # request line through the final CRLFCRLF; over it -> 431
    max_header_count: int = 100  # header field lines; over it -> 431


# --- byte classes ------------------------------------------------------------------------
# Validity is checked with ``translate(None, delete)``: whatever survives the deletion of
# the allowed bytes (or, for a whole head, what the deletion of the forbidden ones removes)
# tells in one C-level pass what a Python loop or a regex would take far longer to find.

_DIGITS: Final = b"0123456789"
_ALPHA: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TCHAR = _ALPHA + _DIGITS + b"!#$%&'*+-.^_`|~"  # RFC 9110 5.6.2 token
_OBS_TEXT = bytes(range(0x80, 0x100))
_VCHAR_SP = bytes(range(0x20, 0x7F))
_FIELD_VALUE_OK = _VCHAR_SP + _OBS_TEXT + b"\t"  # RFC 9110 5.5 field-value bytes, plus SP
# Everything a head may not contain, plus CR and LF: the head check counts the latter two.
# (Deleting this short set is cheaper than keeping the long allowed one: ``translate``
# builds its table from the deletechars on every call.)
_HEAD_DELETE = bytes(c for c in range(256) if c not in _FIELD_VALUE_OK)
_HEAD_OK = _FIELD_VALUE_OK + b"\r\n"
# RFC 3986 host (reg-name, IP-literal, IPv4) and ":" port; no userinfo, path or whitespace.
_HOST_OK = _ALPHA + _DIGITS + b"-._~!$&'()*+,;=:[]%"

_TOKEN_RE: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED_RE: Final = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# RFC 9112 7.1.1: chunk-size [ chunk-ext ], chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS val ] )
_CHUNK_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]+)(?:[ \t]*;[ \t]*"
    + _TOKEN_RE
    + rb"(?:[ \t]*=[ \t]*(?:"
    + _TOKEN_RE
    + rb"|"
    + _QUOTED_RE
    + rb"))?)*"
)
_HTTP_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")  # well-formed, so 505 rather than 400
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+\-.]*://")

# RFC 9112 2.2 asks servers to skip "at least one" empty line before a request line; a
# client that sends more than a few is not a client we want to keep reading from.
_MAX_LEADING_EMPTY_LINES: Final = 4
_MAX_TRAILER_FIELDS: Final = 100
_MAX_CHUNK_SIZE: Final = (1 << 63) - 1

# --- header name classification ----------------------------------------------------------
# One dict lookup both validates a name (every key is a token) and says whether it matters
# for framing; names not in it take the slow path (_classify_name) once per occurrence.

_K_PLAIN: Final = 0
_K_CONTENT_LENGTH: Final = 1
_K_TRANSFER_ENCODING: Final = 2
_K_CONNECTION: Final = 3
_K_UPGRADE: Final = 4
_K_HOST: Final = 5
_K_EXPECT: Final = 6
# Not framing, but what a proxy changes: their line numbers are noted (``hop``, ``forwarded``)
# so that a head is forwarded as received without every line becoming a Python object.
_K_HOP: Final = 7  # the other hop-by-hop fields (RFC 9110 7.6.1)
# X-Forwarded-*, X-Real-IP, and the names only the balancer sets (headers.BALANCER_OWNED,
# headers.CLIENT_CERT): replaced or dropped in a request; plain in a response.
_K_FORWARDED: Final = 8
_K_CLOSE: Final = 9  # a field named "close": hop-by-hop when Connection lists the token
# Sec-WebSocket-Extensions: an upgrade's offer, dropped under a message size limit (noted in
# a request, ``extensions``, so that finding it reads no other line; plain in a response).
_K_EXTENSIONS: Final = 10

_SPECIAL: dict[bytes, int] = {
    b"content-length": _K_CONTENT_LENGTH,
    b"transfer-encoding": _K_TRANSFER_ENCODING,
    b"connection": _K_CONNECTION,
    b"upgrade": _K_UPGRADE,
    b"host": _K_HOST,
    b"expect": _K_EXPECT,
    b"keep-alive": _K_HOP,
    b"te": _K_HOP,
    b"trailer": _K_HOP,
    b"proxy-connection": _K_HOP,
    b"x-forwarded-for": _K_FORWARDED,
    b"x-forwarded-proto": _K_FORWARDED,
    b"x-forwarded-host": _K_FORWARDED,
    b"x-real-ip": _K_FORWARDED,
    b"x-forwarded-port": _K_FORWARDED,
    b"x-forwarded-client-srcport": _K_FORWARDED,
    b"slb-ip": _K_FORWARDED,
    b"slb-id": _K_FORWARDED,
    b"x-client-cert-subject": _K_FORWARDED,
    b"x-client-cert-fingerprint": _K_FORWARDED,
    b"close": _K_CLOSE,
    b"sec-websocket-extensions": _K_EXTENSIONS,
}

_COMMON_NAMES = (
    b"Host Content-Length Transfer-Encoding Connection Upgrade Expect User-Agent Accept "
    b"Accept-Encoding Accept-Language Accept-Charset Accept-Ranges Keep-Alive TE Trailer "
    b"Content-Type Content-Encoding Content-Language Content-Range Content-Disposition "
    b"Content-Security-Policy Cookie Set-Cookie Referer Origin Cache-Control Pragma "
    b"Authorization Proxy-Authorization WWW-Authenticate If-None-Match If-Modified-Since "
    b"If-Match If-Unmodified-Since If-Range Range Date Server ETag Last-Modified Expires Vary "
    b"Location Age Via Forwarded X-Forwarded-For X-Forwarded-Proto X-Forwarded-Host "
    b"X-Real-IP X-Request-ID Sec-WebSocket-Key Sec-WebSocket-Version Sec-WebSocket-Extensions "
    b"Sec-WebSocket-Protocol Sec-WebSocket-Accept Sec-Fetch-Site Sec-Fetch-Mode Sec-Fetch-Dest "
    b"Sec-Fetch-User Sec-CH-UA Sec-CH-UA-Mobile Sec-CH-UA-Platform Upgrade-Insecure-Requests "
    b"DNT Priority Access-Control-Allow-Origin Strict-Transport-Security "
    b"X-Content-Type-Options X-Frame-Options Link Retry-After Alt-Svc Proxy-Connection"
).split()


def _known_names() -> dict[bytes, int]:
    known: dict[bytes, int] = {}
    for name in _COMMON_NAMES:
        kind = _SPECIAL.get(name.lower(), _K_PLAIN)
        # The spellings real clients send: as registered, lower case (h2-era tools, curl -H),
        # and Go's canonical form ("Sec-Websocket-Key", "X-Request-Id").
        for spelling in (name, name.lower(), b"-".join(p.capitalize() for p in name.split(b"-"))):
            known[spelling] = kind
    return known


_KNOWN_NAMES = _known_names()

Specials = list[tuple[int, int, bytes]]  # (kind, line number, value without its OWS)
Scan = Callable[[bytes | bytearray, int, int], "tuple[list[bytes], Specials] | None"]
_NO_SPECIALS: Specials = []  # never appended to


def _c_scanner() -> Scan | None:
    """The C scanner of the compiled build (``_headscan.c``: one pass, no object per line
    beyond the lines); None in the pure build, where the parsers do the same in Python."""
    try:
        from ._headscan import configure, scan
    except ImportError:
        return None
    configure(_SPECIAL)
    return scan


_scan: Scan | None = _c_scanner()
_KNOWN_METHODS = frozenset(
    (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")
)
_NO_TOKENS: frozenset[bytes] = frozenset()
_STATUS_CODES = {str(code).encode(): code for code in range(100, 600)}
_VALID_HOSTS: set[bytes] = set()
_VALID_HOSTS_MAX: Final = 1024
# Connection values seen on almost every request; saves a split and a set build.
_CONNECTION_CACHE: dict[bytes, frozenset[bytes]] = {
    v: frozenset((v,)) for v in (b"keep-alive", b"close", b"upgrade")
}
_CONNECTION_CACHE[b"keep-alive, upgrade"] = frozenset((b"keep-alive", b"upgrade"))


class Head:
    """What a parsed request head and a parsed response head have in common. Built with
    keyword fields only (``RequestHead(method=..., ...)``): a head has too many fields of the
    same types for positional arguments to be read or checked by eye.

    ``lines`` keeps the head as received (the start line, then every field line, without
    CRLFs); ``headers`` gives the fields as (name, value) pairs, in order, made on first use.
    ``hop`` lists the line numbers of hop-by-hop fields (Connection, Transfer-Encoding,
    Upgrade, Keep-Alive, TE, Trailer, Proxy-Connection, and fields named "close" when
    Connection lists that token).
    """

    __slots__ = (
        "_headers",
        "chunked",
        "connection",
        "content_length",
        "hop",
        "keep_alive",
        "lines",
        "raw_len",
        "upgrade",
        "version",
    )

    version: int  # minor version: 1 for HTTP/1.1, 0 for HTTP/1.0
    lines: list[bytes]
    content_length: int | None
    chunked: bool
    keep_alive: bool
    connection: frozenset[bytes]
    upgrade: bytes | None
    raw_len: int  # bytes consumed from the buffer, leading empty lines and final CRLFCRLF too
    hop: list[int] | None

    def __init__(
        self,
        *,
        version: int,
        lines: list[bytes],
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        connection: frozenset[bytes],
        upgrade: bytes | None,
        raw_len: int,
        hop: list[int] | None = None,
    ) -> None:
        self.version = version
        self.lines = lines
        self._headers: list[tuple[bytes, bytes]] | None = None
        self.content_length = content_length
        self.chunked = chunked
        self.keep_alive = keep_alive
        self.connection = connection
        self.upgrade = upgrade
        self.raw_len = raw_len
        self.hop = hop

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """Every field as (name, value), in order, as received (value without its OWS)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = _fields(self.lines)
        return headers


class RequestHead(Head):
    """A parsed, validated request head. Besides ``Head``'s fields: ``forwarded`` lists the
    line numbers of X-Forwarded-For/-Proto/-Host, X-Real-IP and the names only the balancer
    sets (X-Forwarded-Port, X-Forwarded-Client-Srcport, SLB-IP, SLB-ID, X-Client-Cert-*),
    ``extensions`` those of Sec-WebSocket-Extensions, ``host_line`` that of Host (0: none)."""

    __slots__ = (
        "absolute",
        "expect_continue",
        "extensions",
        "forwarded",
        "host",
        "host_line",
        "method",
        "target",
    )

    method: bytes
    target: bytes
    host: bytes | None
    absolute: bool  # ``host`` is the authority of an absolute-form target
    expect_continue: bool
    forwarded: list[int] | None
    extensions: list[int] | None
    host_line: int

    def __init__(
        self,
        *,
        method: bytes,
        target: bytes,
        version: int,
        lines: list[bytes],
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        connection: frozenset[bytes],
        upgrade: bytes | None,
        host: bytes | None,
        expect_continue: bool,
        raw_len: int,
        hop: list[int] | None = None,
        forwarded: list[int] | None = None,
        extensions: list[int] | None = None,
        host_line: int = 0,
        absolute: bool = False,
    ) -> None:
        super().__init__(
            version=version,
            lines=lines,
            content_length=content_length,
            chunked=chunked,
            keep_alive=keep_alive,
            connection=connection,
            upgrade=upgrade,
            raw_len=raw_len,
            hop=hop,
        )
        self.method = method
        self.target = target
        self.host = host
        self.absolute = absolute
        self.expect_continue = expect_continue
        self.forwarded = forwarded
        self.extensions = extensions
        self.host_line = host_line

    def __repr__(self) -> str:
        return (
            f"RequestHead({self.method!r} {self.target!r} HTTP/1.{self.version}, "
            f"host={self.host!r}, content_length={self.content_length}, "
            f"chunked={self.chunked}, keep_alive={self.keep_alive}, upgrade={self.upgrade!r}, "
            f"{len(self.lines) - 1} headers, raw_len={self.raw_len})"
        )


class ResponseHead(Head):
    """A parsed, validated response head from a backend: ``Head``'s fields (``hop`` also
    lists Content-Length lines when chunked overrides them; ``content_length`` is None then;
    ``upgrade`` is the lowercased Upgrade value when Connection lists "upgrade"), the status
    and the reason."""

    __slots__ = ("reason", "status")

    status: int
    reason: bytes

    def __init__(
        self,
        *,
        version: int,
        status: int,
        reason: bytes,
        lines: list[bytes],
        content_length: int | None,
        chunked: bool,
        keep_alive: bool,
        connection: frozenset[bytes],
        upgrade: bytes | None,
        raw_len: int,
        hop: list[int] | None = None,
    ) -> None:
        super().__init__(
            version=version,
            lines=lines,
            content_length=content_length,
            chunked=chunked,
            keep_alive=keep_alive,
            connection=connection,
            upgrade=upgrade,
            raw_len=raw_len,
            hop=hop,
        )
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return (
            f"ResponseHead(HTTP/1.{self.version} {self.status} {self.reason!r}, "
            f"content_length={self.content_length}, chunked={self.chunked}, "
            f"keep_alive={self.keep_alive}, {len(self.lines) - 1} headers, "
            f"raw_len={self.raw_len})"
        )


def _fields(lines: list[bytes]) -> list[tuple[bytes, bytes]]:
    out = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        out.append((name, value.strip()))
    return out


# --- head parsing ------------------------------------------------------------------------


def parse_request_head(buf: bytes | bytearray, limits: Limits) -> RequestHead | None:
    """Parse the request head at the start of ``buf``; None if it is not complete yet.

    Raises :class:`ParseError` for an invalid head, and for an incomplete one as soon as the
    bytes already received prove it invalid or over a limit, so a slow or broken client is
    refused without waiting for the rest.
    """
    pos = 0
    if buf and buf[0] == 0x0D:
        pos = _skip_empty_lines(buf)
    end = buf.find(b"\r\n\r\n", pos)
    if end < 0:
        _check_partial(
            buf,
            pos,
            limits.max_request_line,
            limits.max_header_size,
            limits.max_header_count,
            414,
            431,
            400,
        )
        return None
    raw_len = end + 4
    if raw_len - pos > limits.max_header_size:
        raise ParseError(431, "request head too large")
    # The C scanner (compiled build) splits a head that is valid in the common way and finds
    # its special fields in one pass, in the buffer itself; anything unusual, or the pure
    # build, takes the Python path below, which checks the same and says what is wrong.
    scanned = _scan(buf, pos, end) if _scan is not None else None
    specials: Specials | None = None
    head = b""
    if scanned is not None:
        lines, specials = scanned
    else:
        part = buf[pos:end]
        head = part if type(part) is bytes else bytes(part)
        lines = head.split(b"\r\n")
    line = lines[0]
    if len(line) > limits.max_request_line:
        raise ParseError(414, "request line too long")
    if len(lines) > limits.max_header_count + 1:
        raise ParseError(431, "too many header fields")
    # The split found len(lines) - 1 CRLF pairs; deleting CR, LF and the forbidden bytes
    # must remove exactly those, else there is a bare CR or LF or a forbidden byte.
    if (
        specials is None
        and len(head) - len(head.translate(None, _HEAD_DELETE)) != 2 * len(lines) - 2
    ):
        raise ParseError(400, _describe_bad_bytes(head))

    parts = line.split(b" ")
    if len(parts) != 3:
        raise ParseError(400, "request line is not 'method SP target SP version'")
    method, target, proto = parts
    if proto == b"HTTP/1.1":
        version = 1
    elif proto == b"HTTP/1.0":
        version = 0
    elif _HTTP_VERSION.fullmatch(proto):
        raise ParseError(505, "unsupported HTTP version")
    else:
        raise ParseError(400, "invalid HTTP version")
    if method not in _KNOWN_METHODS and (not method or method.translate(None, _TCHAR)):
        raise ParseError(400, "invalid method")
    # An int tests for one byte value; ``b"\t" in target`` would first try the argument as an
    # int (an exception made and cleared): 15 against 216 ns, 13% of the parse with C's scan.
    if not target or 0x09 in target:
        raise ParseError(400, "invalid request target")

    host: bytes | None = None
    host_count = 0
    host_line = 0
    framing: list[tuple[int, bytes]] | None = None
    hop: list[int] | None = None
    forwarded: list[int] | None = None
    extensions: list[int] | None = None
    close_lines: list[int] | None = None
    # The loop over the fields is written twice: over the C scanner's special fields, and
    # over every line here (the pure build, and what the scanner found unusual), where it
    # also checks each line. Sharing one loop cost the pure build 2-4% a request (a list of
    # the special fields made first, then walked: bench.micro_proxy).
    if specials is None:
        known = _KNOWN_NAMES
        fields = enumerate(lines)
        next(fields)  # the request line
        for i, line in fields:
            name, colon, value = line.partition(b":")
            if not colon:
                raise ParseError(400, _describe_bad_line(line))
            kind = known.get(name)
            if kind is None:
                kind = _classify_name(name, 400)
            if not kind:
                continue
            if kind >= _K_HOP:
                if kind == _K_HOP:
                    hop = [i] if hop is None else [*hop, i]
                elif kind == _K_FORWARDED:
                    forwarded = [i] if forwarded is None else [*forwarded, i]
                elif kind == _K_CLOSE:
                    close_lines = [i] if close_lines is None else [*close_lines, i]
                else:
                    extensions = [i] if extensions is None else [*extensions, i]
                continue
            # The byte check above leaves SP and HTAB as the only whitespace, so the faster
            # argument-less strip() removes exactly the OWS of RFC 9110 5.5.
            value = value.strip()
            if kind == _K_HOST:
                host = value
                host_count += 1
                host_line = i
                continue
            if framing is None:
                framing = [(kind, value)]
            else:
                framing.append((kind, value))
            if kind != _K_CONTENT_LENGTH and kind != _K_EXPECT:
                hop = [i] if hop is None else [*hop, i]
        specials = _NO_SPECIALS
    for kind, i, value in specials:
        if kind >= _K_HOP:
            if kind == _K_HOP:
                hop = [i] if hop is None else [*hop, i]
            elif kind == _K_FORWARDED:
                forwarded = [i] if forwarded is None else [*forwarded, i]
            elif kind == _K_CLOSE:
                close_lines = [i] if close_lines is None else [*close_lines, i]
            else:
                extensions = [i] if extensions is None else [*extensions, i]
            continue
        if kind == _K_HOST:
            host = value
            host_count += 1
            host_line = i
            continue
        if framing is None:
            framing = [(kind, value)]
        else:
            framing.append((kind, value))
        if kind != _K_CONTENT_LENGTH and kind != _K_EXPECT:
            hop = [i] if hop is None else [*hop, i]

    if host_count != 1:
        if host_count:
            raise ParseError(400, "more than one Host")
        if version:
            raise ParseError(400, "missing Host")
    elif host is not None and host not in _VALID_HOSTS:
        _check_host(host)
    absolute = False
    if target[0] != 0x2F or method == b"CONNECT":  # not origin-form ("/...")
        authority = _check_target_form(method, target)
        if authority is not None:
            host = authority
            absolute = True

    if framing is None:
        return RequestHead(
            method=method,
            target=target,
            version=version,
            lines=lines,
            content_length=None,
            chunked=False,
            keep_alive=version == 1,
            connection=_NO_TOKENS,
            upgrade=None,
            host=host,
            expect_continue=False,
            raw_len=raw_len,
            hop=hop,
            forwarded=forwarded,
            extensions=extensions,
            host_line=host_line,
            absolute=absolute,
        )

    content_length, te, connection, upgrade, expect = _framing_fields(framing, 400)
    chunked = False
    if te is not None:
        if content_length is not None:
            raise ParseError(400, "both Content-Length and Transfer-Encoding")
        if not version:
            raise ParseError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if len(te) != 1 or te[0].lower() != b"chunked":
            raise ParseError(400, "Transfer-Encoding other than chunked")
        chunked = True
    if version:
        keep_alive = b"close" not in connection
        if not upgrade or b"upgrade" not in connection:
            upgrade = None
    else:
        keep_alive = b"keep-alive" in connection and b"close" not in connection
        # RFC 9110 7.8 and 10.1.1: both are to be ignored in an HTTP/1.0 request.
        upgrade = None
        expect = False
    if close_lines is not None and b"close" in connection:
        hop = close_lines if hop is None else hop + close_lines
    return RequestHead(
        method=method,
        target=target,
        version=version,
        lines=lines,
        content_length=content_length,
        chunked=chunked,
        keep_alive=keep_alive,
        connection=connection,
        upgrade=upgrade,
        host=host,
        expect_continue=expect,
        raw_len=raw_len,
        hop=hop,
        forwarded=forwarded,
        extensions=extensions,
        host_line=host_line,
        absolute=absolute,
    )


def parse_response_head(buf: bytes | bytearray, max_size: int = 65536) -> ResponseHead | None:
    """Parse a backend's response head at the start of ``buf``; None if not complete yet.

    Every fault, including a head over ``max_size`` bytes, is ParseError(502). Transfer-Encoding
    overrides Content-Length (RFC 9112 6.3), which is then reported as None; since such a
    message may be an attack on someone's framing, keep_alive is then False, as it is for an
    HTTP/1.0 response with Transfer-Encoding (RFC 9112 6.1) and a close-delimited one.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        _check_partial(buf, 0, max_size, max_size, max_size, 502, 502, 502)
        return None
    raw_len = end + 4
    if raw_len > max_size:
        raise ParseError(502, "response head too large")
    scanned = _scan(buf, 0, end) if _scan is not None else None  # as in parse_request_head
    specials: Specials | None = None
    if scanned is not None:
        lines, specials = scanned
    else:
        head = buf[:end]
        if type(head) is not bytes:
            head = bytes(head)
        lines = head.split(b"\r\n")
        if len(head) - len(head.translate(None, _HEAD_DELETE)) != 2 * len(lines) - 2:
            raise ParseError(502, _describe_bad_bytes(head))

    parts = lines[0].split(b" ", 2)
    if len(parts) == 3:
        proto, code, reason = parts
    elif len(parts) == 2:  # "HTTP/1.1 200" without the SP before an empty reason
        proto, code = parts
        reason = b""
    else:
        raise ParseError(502, "invalid status line")
    if proto == b"HTTP/1.1":
        version = 1
    elif proto == b"HTTP/1.0":
        version = 0
    else:
        raise ParseError(502, "unsupported HTTP version in response")
    status = _STATUS_CODES.get(code)
    if status is None:
        raise ParseError(502, "invalid status code")

    framing: list[tuple[int, bytes]] | None = None
    hop: list[int] | None = None
    length_lines: list[int] | None = None
    close_lines: list[int] | None = None
    if specials is None:  # written twice, as in parse_request_head
        known = _KNOWN_NAMES
        fields = enumerate(lines)
        next(fields)  # the status line
        for i, line in fields:
            name, colon, value = line.partition(b":")
            if not colon:
                raise ParseError(502, _describe_bad_line(line))
            kind = known.get(name)
            if kind is None:
                kind = _classify_name(name, 502)
            if not kind or kind in (_K_HOST, _K_FORWARDED, _K_EXTENSIONS):
                continue
            if kind == _K_HOP:
                hop = [i] if hop is None else [*hop, i]
            elif kind == _K_CLOSE:
                close_lines = [i] if close_lines is None else [*close_lines, i]
            else:
                value = value.strip()
                if framing is None:
                    framing = [(kind, value)]
                else:
                    framing.append((kind, value))
                if kind == _K_CONTENT_LENGTH:
                    length_lines = [i] if length_lines is None else [*length_lines, i]
                elif kind != _K_EXPECT:
                    hop = [i] if hop is None else [*hop, i]
        specials = _NO_SPECIALS
    for kind, i, value in specials:
        if kind in (_K_HOST, _K_FORWARDED, _K_EXTENSIONS):
            continue
        if kind == _K_HOP:
            hop = [i] if hop is None else [*hop, i]
        elif kind == _K_CLOSE:
            close_lines = [i] if close_lines is None else [*close_lines, i]
        else:
            if framing is None:
                framing = [(kind, value)]
            else:
                framing.append((kind, value))
            if kind == _K_CONTENT_LENGTH:
                length_lines = [i] if length_lines is None else [*length_lines, i]
            elif kind != _K_EXPECT:
                hop = [i] if hop is None else [*hop, i]

    if framing is None:
        return ResponseHead(
            version=version,
            status=status,
            reason=reason,
            lines=lines,
            content_length=None,
            chunked=False,
            keep_alive=version == 1,
            connection=_NO_TOKENS,
            upgrade=None,
            raw_len=raw_len,
            hop=hop,
        )

    content_length, te, connection, upgrade, _ = _framing_fields(framing, 502)
    if version:
        keep_alive = b"close" not in connection
    else:
        keep_alive = b"keep-alive" in connection and b"close" not in connection
    if not upgrade or b"upgrade" not in connection:
        upgrade = None
    chunked = False
    if te is not None:
        codings = [c.strip().lower() for v in te for c in v.split(b",")]
        codings = [c for c in codings if c]
        if not codings:
            raise ParseError(502, "empty Transfer-Encoding")
        if b"chunked" in codings[:-1]:
            raise ParseError(502, "chunked is not the final transfer coding")
        chunked = codings[-1] == b"chunked"
        if content_length is not None or not version or not chunked:
            keep_alive = False
        content_length = None
        if chunked and length_lines is not None:
            # Chunked wins over a Content-Length sent alongside it (RFC 9112 6.3): passing
            # both on would let the next hop frame the body differently.
            hop = length_lines if hop is None else hop + length_lines
    if close_lines is not None and b"close" in connection:
        hop = close_lines if hop is None else hop + close_lines
    return ResponseHead(
        version=version,
        status=status,
        reason=reason,
        lines=lines,
        content_length=content_length,
        chunked=chunked,
        keep_alive=keep_alive,
        connection=connection,
        upgrade=upgrade,
        raw_len=raw_len,
        hop=hop,
    )


def _skip_empty_lines(buf: bytes | bytearray) -> int:
    pos = 0
    while buf.startswith(b"\r\n", pos):
        pos += 2
        if pos > 2 * _MAX_LEADING_EMPTY_LINES:
            raise ParseError(400, "too many empty lines before the request line")
    return pos


def _check_partial(
    buf: bytes | bytearray,
    pos: int,
    max_line: int,
    max_size: int,
    max_count: int,
    line_status: int,
    size_status: int,
    bad_status: int,
) -> None:
    """Refuse an incomplete head as soon as what is buffered already proves it bad."""
    have = len(buf) - pos
    line_end = buf.find(b"\r\n", pos)
    if line_end < 0:
        if have > max_line + 1:  # + 1: the last byte may be the CR of the CRLF
            raise ParseError(line_status, "start line too long")
    elif line_end - pos > max_line:
        raise ParseError(line_status, "start line too long")
    if have >= max_size:  # no CRLFCRLF yet, so the head will be at least have + 1 bytes
        raise ParseError(size_status, "head too large")
    # A client ending lines with a bare LF would never produce a CRLFCRLF and would be left
    # waiting for the size limit or a timeout; refuse it now.
    crlf = buf.count(b"\r\n", pos)
    pending_cr = 1 if buf.endswith(b"\r") else 0
    if buf.count(b"\n", pos) != crlf or buf.count(b"\r", pos) - pending_cr != crlf:
        raise ParseError(bad_status, "bare CR or LF in head")
    if crlf - 1 > max_count:
        raise ParseError(size_status, "too many header fields")


def _describe_bad_bytes(head: bytes) -> str:
    if b"\x00" in head:
        return "NUL in head"
    if head.translate(None, _HEAD_OK):
        return "control character in head"
    return "bare CR or LF in head"


def _describe_bad_line(line: bytes) -> str:
    if line[:1] in (b" ", b"\t"):
        return "obs-fold (field line starting with whitespace)"
    return "field line without a colon"


def _classify_name(name: bytes, status: int) -> int:
    if not name:
        raise ParseError(status, "empty field name")
    if name.translate(None, _TCHAR):
        if name[:1] in (b" ", b"\t"):
            raise ParseError(status, "obs-fold (field line starting with whitespace)")
        if name[-1:] in (b" ", b"\t"):
            raise ParseError(status, "whitespace between field name and colon")
        raise ParseError(status, "invalid character in field name")
    return _SPECIAL.get(name.lower(), _K_PLAIN)


def _check_host(host: bytes) -> None:
    if host.translate(None, _HOST_OK):
        raise ParseError(400, "invalid Host")
    # Remember valid values: a proxy sees few distinct hosts, and a set lookup is cheaper
    # than the translate. Bounded so that random valid hosts cannot grow it without limit.
    if len(_VALID_HOSTS) < _VALID_HOSTS_MAX:
        _VALID_HOSTS.add(host)


def _framing_fields(
    fields: list[tuple[int, bytes]], status: int
) -> tuple[int | None, list[bytes] | None, frozenset[bytes], bytes | None, bool]:
    """Content-Length, raw Transfer-Encoding values, Connection tokens, lowercased Upgrade
    value and Expect: 100-continue, from the (kind, value) pairs of the framing fields."""
    content_length: int | None = None
    te: list[bytes] | None = None
    connection = _NO_TOKENS
    upgrade: bytes | None = None
    expect = False
    for kind, value in fields:
        if kind == _K_CONNECTION:
            lowered = value.lower()
            tokens = _CONNECTION_CACHE.get(lowered)
            if tokens is None:
                tokens = frozenset(t.strip() for t in lowered.split(b",")) - {b""}
            connection = connection | tokens if connection else tokens
        elif kind == _K_CONTENT_LENGTH:
            content_length = _parse_content_length(value, content_length, status)
        elif kind == _K_TRANSFER_ENCODING:
            if te is None:
                te = [value]
            else:
                te.append(value)
        elif kind == _K_UPGRADE:
            upgrade = value.lower() if upgrade is None else upgrade + b", " + value.lower()
        else:  # _K_EXPECT
            expect = expect or value.lower() == b"100-continue"
    return content_length, te, connection, upgrade, expect


def _parse_content_length(value: bytes, previous: int | None, status: int) -> int:
    if value.isdigit() and len(value) <= 18:  # bytes.isdigit() is ASCII-only
        length = int(value)
    else:
        # RFC 9110 8.6 allows a list of identical values ("5, 5"); collapse it to one.
        items = [v.strip() for v in value.split(b",")]
        if not all(v.isdigit() for v in items) or len(set(items)) != 1:
            raise ParseError(status, "invalid Content-Length")
        if len(items[0]) > 18 and items[0].lstrip(b"0")[:-18]:
            raise ParseError(status, "Content-Length too large")
        length = int(items[0])
    if previous is not None and previous != length:
        raise ParseError(status, "conflicting Content-Length values")
    return length


def _check_target_form(method: bytes, target: bytes) -> bytes | None:
    """Validate a request-target that is not origin-form; the authority of an absolute-form.

    RFC 9112 3.2: asterisk-form only for OPTIONS, authority-form only (and always) for
    CONNECT, absolute-form for anything else; only http and https URIs are accepted, and the
    authority of one replaces Host (3.2.2).
    """
    if method == b"CONNECT":
        if target.translate(None, _HOST_OK) or 0x3A not in target:
            raise ParseError(400, "CONNECT target is not host:port")
        return None
    if target == b"*":
        if method != b"OPTIONS":
            raise ParseError(400, "asterisk-form target for a method other than OPTIONS")
        return None
    scheme = _SCHEME.match(target)
    if scheme is None or scheme.group().lower() not in (b"http://", b"https://"):
        raise ParseError(400, "invalid request target")
    start = scheme.end()
    stop = len(target)
    for delimiter in b"/?#":
        i = target.find(delimiter, start, stop)
        if i >= 0:
            stop = i
    authority = target[start:stop]
    if not authority or authority[0] == 0x3A or authority.translate(None, _HOST_OK):
        # An empty host is invalid for http(s) (RFC 9110 4.2.1). "@" lands here too:
        # userinfo is deprecated and a classic spoofing vector.
        raise ParseError(400, "invalid authority in request target")
    return authority


# --- body framing ------------------------------------------------------------------------


def request_body_kind(head: RequestHead) -> int:
    """How the request body is delimited; a request without CL or TE has none (RFC 9112 6.3)."""
    if head.chunked:
        return BODY_CHUNKED
    if head.content_length is not None:
        return BODY_LENGTH
    return BODY_NONE


def response_body_kind(request_method: bytes, head: ResponseHead) -> int:
    """How the response body is delimited, given the method of the request it answers."""
    status = head.status
    if (
        request_method == b"HEAD"
        or status < 200
        or status == 204
        or status == 304
        or (request_method == b"CONNECT" and status < 300)
    ):
        return BODY_NONE
    if head.chunked:
        return BODY_CHUNKED
    if head.content_length is not None:
        return BODY_LENGTH
    return BODY_CLOSE


# The two line-reading states come first so that one comparison selects them.
_S_SIZE: Final = 0
_S_TRAILER: Final = 1
_S_DATA: Final = 2
_S_DATA_CR: Final = 3
_S_DATA_LF: Final = 4
_S_DONE: Final = 5
_S_FAILED: Final = 6


class ChunkedTracker:
    """Follows one chunked body (RFC 9112 7.1) fed in pieces split anywhere.

    ``feed`` says how many bytes of each piece belong to the body, so they can be passed
    through unchanged and the caller knows where a pipelined next message starts;
    ``feed_decode`` also returns the chunk payload (trailer fields are validated, then
    dropped). After a ParseError every later feed raises again.
    """

    __slots__ = ("_line", "_max_line", "_remaining", "_state", "_trailers", "done")

    def __init__(self, max_line: int = 4096) -> None:
        self._max_line = max_line  # a chunk-size or trailer line, without its CRLF
        self._state = _S_SIZE
        self._remaining = 0  # bytes of chunk data still to come in the current chunk
        self._line = b""  # the start of a size or trailer line split across feeds
        self._trailers = 0
        self.done = False

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Consume ``data``; return how many of its bytes belong to this body."""
        if self._state == _S_DATA:
            n = len(data)
            if n < self._remaining:  # all chunk data: the streaming hot path
                self._remaining -= n
                return n
        return self._run(data, None)

    def feed_decode(self, data: bytes | bytearray | memoryview) -> tuple[list[bytes], int]:
        """Like :meth:`feed`, also returning the chunk payload found in ``data``."""
        pieces: list[bytes] = []
        return pieces, self._run(data, pieces)

    def _run(self, data: bytes | bytearray | memoryview, pieces: list[bytes] | None) -> int:
        state = self._state
        if state >= _S_DONE:
            if state == _S_DONE:
                return 0
            raise ParseError(400, "chunked body already failed")
        n = len(data)
        i = 0
        remaining = self._remaining
        max_line = self._max_line
        try:
            while i < n:
                if state <= _S_TRAILER:
                    # The LF must come within max_line + CR + LF bytes of the line's start.
                    stop = i + max_line + 2 - len(self._line)
                    if isinstance(data, memoryview):
                        lf = _find_lf(data, i, min(n, stop))
                    else:
                        lf = data.find(b"\n", i, stop)
                    if lf > i and not self._line and data[lf - 1] == 0x0D:
                        line = data[i : lf - 1]
                        if type(line) is not bytes:
                            line = bytes(line)
                        i = lf + 1
                    else:
                        split_line = self._line_across_feeds(data, i, lf, stop)
                        if split_line is None:
                            i = n
                            break
                        line = split_line
                        i = lf + 1
                    if state == _S_SIZE:
                        size = _chunk_size(line)
                        if not size:
                            if data[i : i + 2] == b"\r\n":  # no trailer fields: the usual end
                                i += 2
                                state = _S_DONE
                                self.done = True
                                break
                            state = _S_TRAILER
                            continue
                        j = i + size
                        if j + 2 <= n:  # the whole chunk and its CRLF are here
                            if data[j] != 0x0D or data[j + 1] != 0x0A:
                                raise ParseError(400, "missing CRLF after chunk data")
                            if pieces is not None:
                                pieces.append(bytes(data[i:j]))
                            i = j + 2
                        else:
                            state = _S_DATA
                            remaining = size
                    elif line:
                        _check_trailer_line(line)
                        self._trailers += 1
                        if self._trailers > _MAX_TRAILER_FIELDS:
                            raise ParseError(400, "too many trailer fields")
                    else:
                        state = _S_DONE
                        self.done = True
                        break
                elif state == _S_DATA:
                    j = i + remaining
                    if j > n:
                        if pieces is not None:
                            pieces.append(bytes(data[i:]))
                        remaining = j - n
                        i = n
                        break
                    if pieces is not None:
                        pieces.append(bytes(data[i:j]))
                    i = j
                    remaining = 0
                    state = _S_DATA_CR
                elif state == _S_DATA_CR:
                    if data[i] != 0x0D:
                        raise ParseError(400, "missing CRLF after chunk data")
                    i += 1
                    state = _S_DATA_LF
                else:
                    if data[i] != 0x0A:
                        raise ParseError(400, "missing CRLF after chunk data")
                    i += 1
                    state = _S_SIZE
        except ParseError:
            self._state = _S_FAILED
            raise
        self._state = state
        self._remaining = remaining
        return i

    def _line_across_feeds(
        self, data: bytes | bytearray | memoryview, i: int, lf: int, stop: int
    ) -> bytes | None:
        """The slow path of a line: started in an earlier feed, unfinished, or malformed.

        Returns the line without its CRLF, or None after keeping an unfinished line's start.
        """
        if lf < 0:
            if len(data) >= stop:
                raise ParseError(400, "chunk size or trailer line too long")
            self._line += bytes(data[i:])
            return None
        line = self._line + bytes(data[i:lf])
        self._line = b""
        if not line.endswith(b"\r"):
            raise ParseError(400, "bare LF in chunked framing")
        return line[:-1]


def _find_lf(data: memoryview, start: int, stop: int) -> int:
    # memoryview has no find(); copy growing windows rather than the whole (possibly large)
    # buffer, since the line is nearly always a few bytes long.
    window = 64
    while start < stop:
        end = min(stop, start + window)
        k = data[start:end].tobytes().find(b"\n")
        if k >= 0:
            return start + k
        start = end
        window *= 4
    return -1


def _chunk_size(line: bytes) -> int:
    # Fast path for a bare size; the check keeps out what int(x, 16) would wrongly accept
    # (signs, "_", whitespace, a "0x" prefix). Base 16 has no int() digit-count limit.
    if line.isalnum() and line[1:2] not in (b"x", b"X"):
        try:
            size = int(line, 16)
        except ValueError:
            raise ParseError(400, "invalid chunk size") from None
    else:
        if not line:
            raise ParseError(400, "empty chunk size")
        match = _CHUNK_SIZE_LINE.fullmatch(line)
        if match is None:
            raise ParseError(400, "invalid chunk size line")
        size = int(match.group(1), 16)
    if size > _MAX_CHUNK_SIZE:
        raise ParseError(400, "chunk size too large")
    return size


def _check_trailer_line(line: bytes) -> None:
    name, colon, value = line.partition(b":")
    if (
        not colon
        or not name
        or name.translate(None, _TCHAR)
        or value.translate(None, _FIELD_VALUE_OK)
    ):
        raise ParseError(400, "invalid trailer field")


def target_path(target: bytes | str) -> str:
    """The path part of a request target: no ``?query`` or ``#fragment``; for an absolute-form
    target (``http://host/p``) its path (``/`` when empty); for any other non-path target
    (``*``, an authority) ``/``."""
    text = target.decode("latin-1") if isinstance(target, bytes) else target
    if not text.startswith("/"):
        scheme_end = text.find("://")
        if scheme_end < 0:
            return "/"
        start = scheme_end + 3
        end = len(text)  # the authority ends at the first "/", "?" or "#"
        for delimiter in "/?#":
            i = text.find(delimiter, start, end)
            if i >= 0:
                end = i
        if text[end : end + 1] != "/":
            return "/"
        text = text[end:]
    for delimiter in "?#":
        i = text.find(delimiter)
        if i >= 0:
            text = text[:i]
    return text or "/"
