"""Header rules on parsed heads: the request a backend sees and the response a client sees.

Inputs are built with the real parser (``lbproxy.wire.http1``), and outputs are asserted byte for
byte and re-parsed, so a rule that produces a malformed head fails here too.
"""

from __future__ import annotations

import pytest

from lbproxy.wire import headers
from lbproxy.wire.http1 import (
    Limits,
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
)

CLIENT = "203.0.113.7"
DEFAULT_HOST = b"10.0.0.5:8080"


def request(raw: bytes) -> RequestHead:
    head = parse_request_head(raw, Limits())
    assert head is not None
    return head


def response(raw: bytes) -> ResponseHead:
    head = parse_response_head(raw)
    assert head is not None
    return head


def upstream(
    raw: bytes,
    *,
    forwarded: bool = True,
    upgrade: bool = False,
    client_ip: str = CLIENT,
    no_extensions: bool = False,
) -> bytes:
    out = headers.upstream_request_head(
        request(raw),
        client_ip=client_ip,
        scheme=b"http",
        forwarded=forwarded,
        default_host=DEFAULT_HOST,
        upgrade=upgrade,
        no_extensions=no_extensions,
    )
    request(out)  # what the backend gets must itself be a valid request head
    return out


def lines(head: bytes) -> list[bytes]:
    assert head.endswith(b"\r\n\r\n")
    return head[:-4].split(b"\r\n")


def values(head: bytes, name: bytes) -> list[bytes]:
    out = []
    for line in lines(head)[1:]:
        n, _, v = line.partition(b": ")
        if n.lower() == name.lower():
            out.append(v)
    return out


# ------------------------------------------------------------------ request to the backend


def test_plain_request_exact_bytes():
    out = upstream(b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n")
    assert out == (
        b"GET /a?b=1 HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"Accept: */*\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: example.com\r\n"
        b"X-Real-IP: 203.0.113.7\r\n"
        b"\r\n"
    )


def test_hop_by_hop_headers_removed_end_to_end_kept_in_order():
    raw = (
        b"POST /submit HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"Connection: keep-alive, X-Secret, x-other\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Secret: 1\r\n"
        b"X-Other: 2\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 3\r\n"
        b"Cookie: a=b\r\n"
        b"\r\n"
    )
    out = upstream(raw, forwarded=False)
    assert out == (
        b"POST /submit HTTP/1.1\r\n"
        b"Host: example.com\r\n"
        b"Content-Type: text/plain\r\n"
        b"Content-Length: 3\r\n"
        b"Cookie: a=b\r\n"
        b"\r\n"
    )
    assert request(out).keep_alive is True


def test_connection_cannot_remove_content_length_or_host():
    """``Connection: Content-Length`` would otherwise smuggle the body as a second request."""
    raw = (
        b"POST /x HTTP/1.1\r\nHost: a.example\r\nConnection: Content-Length, Host\r\n"
        b"Content-Length: 33\r\n\r\n"
    )
    out = upstream(raw, forwarded=False)
    assert out == b"POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 33\r\n\r\n"
    assert request(out).content_length == 33


def test_http10_keep_alive_request_goes_out_as_http11():
    out = upstream(b"GET / HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n", forwarded=False)
    assert out == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def test_x_forwarded_for_appends_to_every_existing_value():
    raw = (
        b"GET / HTTP/1.1\r\n"
        b"X-Forwarded-For: 198.51.100.1\r\n"
        b"Host: h\r\n"
        b"x-forwarded-for: 198.51.100.2, 198.51.100.3\r\n"
        b"\r\n"
    )
    out = upstream(raw)
    assert values(out, b"X-Forwarded-For") == [
        b"198.51.100.1, 198.51.100.2, 198.51.100.3, 203.0.113.7"
    ]
    assert lines(out)[1] == b"Host: h"


def test_x_forwarded_for_with_ipv6_client():
    out = upstream(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", client_ip="2001:db8::1")
    assert values(out, b"X-Forwarded-For") == [b"2001:db8::1"]
    assert values(out, b"X-Real-IP") == [b"2001:db8::1"]


def test_client_sent_proto_host_real_ip_are_replaced():
    raw = (
        b"GET / HTTP/1.1\r\n"
        b"Host: real.example\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil.example\r\n"
        b"X-Real-IP: 127.0.0.1\r\n"
        b"X-Forwarded-Proto: ftp\r\n"
        b"\r\n"
    )
    out = upstream(raw)
    assert values(out, b"X-Forwarded-Proto") == [b"http"]
    assert values(out, b"X-Forwarded-Host") == [b"real.example"]
    assert values(out, b"X-Real-IP") == [CLIENT.encode()]
    assert values(out, b"X-Forwarded-For") == [CLIENT.encode()]


def test_forwarded_false_leaves_them_alone():
    raw = (
        b"GET / HTTP/1.1\r\n"
        b"Host: h\r\n"
        b"X-Forwarded-For: 198.51.100.1\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: other\r\n"
        b"X-Real-IP: 198.51.100.1\r\n"
        b"\r\n"
    )
    out = upstream(raw, forwarded=False)
    assert out == raw  # unchanged, byte for byte


def test_http10_request_without_host_gets_one():
    out = upstream(b"GET /x HTTP/1.0\r\nAccept: */*\r\n\r\n", forwarded=False)
    assert out == b"GET /x HTTP/1.1\r\nAccept: */*\r\nHost: 10.0.0.5:8080\r\n\r\n"
    out = upstream(b"GET /x HTTP/1.0\r\n\r\n")
    assert values(out, b"Host") == [DEFAULT_HOST]
    assert values(out, b"X-Forwarded-Host") == [DEFAULT_HOST]


def test_http10_absolute_form_target_host_is_used():
    out = upstream(b"GET http://abs.example/x HTTP/1.0\r\n\r\n", forwarded=False)
    assert out == b"GET http://abs.example/x HTTP/1.1\r\nHost: abs.example\r\n\r\n"


def test_host_header_passes_unchanged():
    out = upstream(b"GET / HTTP/1.1\r\nHost: Example.COM:8443\r\n\r\n", forwarded=False)
    assert values(out, b"Host") == [b"Example.COM:8443"]


def test_chunked_request_keeps_its_framing():
    raw = (
        b"POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    out = upstream(raw, forwarded=False)
    assert out == (
        b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Type: application/octet-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    assert request(out).chunked is True
    assert values(out, b"Transfer-Encoding") == [b"chunked"]


def test_content_length_request_has_no_transfer_encoding():
    out = upstream(b"PUT / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n")
    assert values(out, b"Transfer-Encoding") == []
    assert request(out).content_length == 10


WS_REQUEST = (
    b"GET /ws HTTP/1.1\r\n"
    b"Host: chat.example\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Upgrade: WebSocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Protocol: chat, superchat\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
    b"\r\n"
)


def test_upgrade_request_keeps_connection_upgrade_and_original_upgrade_value():
    out = upstream(WS_REQUEST, upgrade=True, forwarded=False)
    assert out == (
        b"GET /ws HTTP/1.1\r\n"
        b"Host: chat.example\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: chat, superchat\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
        b"Connection: Upgrade\r\n"
        b"Upgrade: WebSocket\r\n"
        b"\r\n"
    )
    assert request(out).upgrade == b"websocket"


def test_upgrade_request_with_forwarding():
    out = upstream(WS_REQUEST, upgrade=True)
    assert values(out, b"Connection") == [b"Upgrade"]
    assert values(out, b"Upgrade") == [b"WebSocket"]
    assert values(out, b"X-Forwarded-For") == [CLIENT.encode()]
    assert values(out, b"X-Forwarded-Host") == [b"chat.example"]


def test_no_extensions_drops_every_offer_line_and_nothing_else():
    raw = WS_REQUEST.replace(
        b"\r\n\r\n", b"\r\nsec-websocket-extensions: x-webkit-deflate-frame\r\n\r\n"
    )
    want = (
        upstream(raw, upgrade=True, forwarded=False)
        .replace(b"Sec-WebSocket-Extensions: permessage-deflate\r\n", b"")
        .replace(b"sec-websocket-extensions: x-webkit-deflate-frame\r\n", b"")
    )
    assert upstream(raw, upgrade=True, forwarded=False, no_extensions=True) == want
    assert values(want, b"Sec-WebSocket-Protocol") == [b"chat, superchat"]
    # The field-by-field path (Connection naming another field) drops it too.
    by_field = raw.replace(b"keep-alive, Upgrade", b"keep-alive, Upgrade, X-Drop\r\nX-Drop: 1")
    out = upstream(by_field, upgrade=True, no_extensions=True)
    assert values(out, b"Sec-WebSocket-Extensions") == values(out, b"X-Drop") == []
    assert values(out, b"Sec-WebSocket-Key") == [b"dGhlIHNhbXBsZSBub25jZQ=="]
    assert values(upstream(by_field, upgrade=True), b"Sec-WebSocket-Extensions") == [
        b"permessage-deflate",
        b"x-webkit-deflate-frame",
    ]


def test_a_101_accepting_an_extension():
    base = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    assert not headers.accepts_extension(response(base + b"\r\n"))
    assert not headers.accepts_extension(response(base + b"Sec-WebSocket-Extensions:\r\n\r\n"))
    accepted = base + b"sec-websocket-extensions: permessage-deflate\r\n\r\n"
    assert headers.accepts_extension(response(accepted))


def test_upgrade_not_taken_strips_connection_and_upgrade():
    out = upstream(WS_REQUEST, upgrade=False, forwarded=False)
    assert values(out, b"Connection") == []
    assert values(out, b"Upgrade") == []
    assert request(out).upgrade is None


# -------------------------------------------------------------------- response to the client


def client(
    raw: bytes, *, chunked: bool = False, keep_alive: bool = True, version: int = 1
) -> bytes:
    out = headers.client_response_head(
        response(raw), chunked=chunked, keep_alive=keep_alive, client_version=version
    )
    response(out)  # well-formed
    return out


def test_response_exact_bytes_keep_alive_http11_client():
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
        b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
    )
    assert client(raw) == raw  # nothing to change


def test_response_hop_by_hop_removed():
    raw = (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: keep-alive, X-Backend-Secret\r\n"
        b"Keep-Alive: timeout=5, max=100\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Trailer: X-Checksum\r\n"
        b"X-Backend-Secret: s3cr3t\r\n"
        b"Transfer-Encoding: chunked\r\n"
        b"Server: backend\r\n"
        b"\r\n"
    )
    assert client(raw, chunked=True) == (
        b"HTTP/1.1 200 OK\r\nServer: backend\r\nTransfer-Encoding: chunked\r\n\r\n"
    )


def test_response_chunked_body_decoded_for_http10_client_says_close():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    out = client(raw, chunked=False, keep_alive=False, version=0)
    assert out == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"


def test_response_connection_cannot_remove_content_length():
    raw = b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\n"
    assert client(raw) == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"


@pytest.mark.parametrize(
    ("version", "keep_alive", "connection"),
    [
        (1, True, []),
        (1, False, [b"close"]),
        (0, True, [b"keep-alive"]),
        (0, False, [b"close"]),
    ],
)
def test_response_connection_header_per_client_version(version, keep_alive, connection):
    raw = b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"
    out = client(raw, keep_alive=keep_alive, version=version)
    assert values(out, b"Connection") == connection
    assert response(out).keep_alive is keep_alive


def test_http10_backend_response_goes_out_as_http11():
    out = client(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    assert out == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def test_response_reason_kept_even_unusual_or_empty():
    assert client(b"HTTP/1.1 299 All Good Here\r\nContent-Length: 0\r\n\r\n").startswith(
        b"HTTP/1.1 299 All Good Here\r\n"
    )
    out = client(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n")
    assert lines(out)[0] == b"HTTP/1.1 200 "
    assert response(out).status == 200


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 ", b"HTTP/1.1 200", b"HTTP/1.1 503 Service  Unavailable",
     b"HTTP/1.0 302 Found", b"HTTP/1.1 599 x", b"HTTP/1.1 101 Switching Protocols"],
)  # fmt: skip
def test_the_status_line_goes_out_as_if_formatted(status_line: bytes) -> None:
    """An HTTP/1.1 status line is passed on as it came (not formatted again): the same bytes."""
    resp = response(status_line + b"\r\nContent-Length: 0\r\n\r\n")
    out = lines(client(status_line + b"\r\nContent-Length: 0\r\n\r\n"))[0]
    assert out == b"HTTP/1.1 %d %s" % (resp.status, resp.reason)


# ------------------------------------------------------------------------- error responses


def parse_error(raw: bytes) -> tuple[ResponseHead, bytes]:
    head = response(raw)
    return head, raw[head.raw_len :]


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, b"Bad Request"),
        (404, b"Not Found"),
        (408, b"Request Timeout"),
        (413, b"Content Too Large"),
        (414, b"URI Too Long"),
        (431, b"Request Header Fields Too Large"),
        (500, b"Internal Server Error"),
        (501, b"Not Implemented"),
        (502, b"Bad Gateway"),
        (503, b"Service Unavailable"),
        (504, b"Gateway Timeout"),
        (505, b"HTTP Version Not Supported"),
        (599, b"Error"),
    ],
)
def test_error_response_well_formed(status, reason):
    raw = headers.error_response(status)
    head, body = parse_error(raw)
    assert (head.version, head.status, head.reason) == (1, status, reason)
    assert body == b"%d %s\n" % (status, reason)
    assert head.content_length == len(body)
    assert values(raw[: head.raw_len], b"Content-Type") == [b"text/plain; charset=utf-8"]
    assert values(raw[: head.raw_len], b"Cache-Control") == [b"no-store"]
    assert values(raw[: head.raw_len], b"Connection") == [b"close"]
    assert head.keep_alive is False


def test_error_response_detail_extra_and_keep_alive():
    raw = headers.error_response(
        503, "no server available", extra=(("Retry-After", "1"),), keep_alive=True
    )
    assert raw == (
        b"HTTP/1.1 503 Service Unavailable\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 45\r\n"
        b"Cache-Control: no-store\r\n"
        b"Retry-After: 1\r\n"
        b"Connection: keep-alive\r\n"
        b"\r\n"
        b"503 Service Unavailable: no server available\n"
    )
    head, body = parse_error(raw)
    assert head.content_length == len(body) == 45
    assert head.keep_alive is True


def test_error_response_content_length_counts_bytes_not_characters():
    raw = headers.error_response(502, "backend “é” said no")
    head, body = parse_error(raw)
    assert head.content_length == len(body)
    assert body.decode() == "502 Bad Gateway: backend “é” said no\n"


def test_chunked_response_drops_a_content_length_sent_alongside():
    resp = response(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
    )
    head = headers.client_response_head(resp, chunked=True, keep_alive=True, client_version=1)
    assert values(head, b"content-length") == []
    assert values(head, b"transfer-encoding") == [b"chunked"]
    assert values(head, b"x-a") == [b"1"]


# ------------------------------------------------- the lean path: lines go out as received


def test_field_lines_go_out_as_the_client_wrote_them():
    raw = (
        b"GET / HTTP/1.1\r\n"
        b"host:h.example\r\n"
        b"Accept:*/*\r\n"
        b"X-Custom: \t spaced  value \t\r\n"
        b"Connection: keep-alive\r\n"
        b"\r\n"
    )
    out = upstream(raw)
    assert lines(out)[1:4] == [b"host:h.example", b"Accept:*/*", b"X-Custom: \t spaced  value \t"]
    assert values(out, b"Connection") == []
    assert values(out, b"X-Forwarded-Host") == [b"h.example"]
    resp = b"HTTP/1.1 200 OK\r\nServer:b\r\nX-A:  1 \r\nKeep-Alive: timeout=5\r\n\r\n"
    assert client(resp) == b"HTTP/1.1 200 OK\r\nServer:b\r\nX-A:  1 \r\n\r\n"


def test_absolute_form_authority_replaces_the_host_line():
    raw = b"GET http://abs.example/x HTTP/1.1\r\nHOST: other.example\r\nAccept: */*\r\n\r\n"
    out = upstream(raw, forwarded=False)
    assert out == b"GET http://abs.example/x HTTP/1.1\r\nHOST: abs.example\r\nAccept: */*\r\n\r\n"


def test_a_field_named_close_goes_only_when_connection_lists_the_token():
    listed = b"GET / HTTP/1.1\r\nHost: h\r\nClose: 1\r\nConnection: close\r\n\r\n"
    assert upstream(listed, forwarded=False) == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    unlisted = b"GET / HTTP/1.1\r\nHost: h\r\nClose: 1\r\n\r\n"
    assert upstream(unlisted, forwarded=False) == unlisted
    resp = b"HTTP/1.1 200 OK\r\nClose: 1\r\nConnection: close\r\nX-A: 1\r\n\r\n"
    assert client(resp) == b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n"
    assert client(b"HTTP/1.1 200 OK\r\nClose: 1\r\n\r\n") == b"HTTP/1.1 200 OK\r\nClose: 1\r\n\r\n"


def test_connection_naming_other_fields_drops_them_in_responses_too():
    raw = (
        b"HTTP/1.1 200 OK\r\nConnection: x-hop, Content-Length\r\nX-Hop: 1\r\n"
        b"Content-Length: 0\r\nX-Kept: 2\r\n\r\n"
    )
    assert client(raw) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Kept: 2\r\n\r\n"


def test_the_parsed_pairs_are_still_there_for_the_rules_that_need_them():
    req = request(b"GET / HTTP/1.1\r\nHost: h\r\nCookie:  a=1 \r\nX-Forwarded-For: 1.2.3.4\r\n\r\n")
    assert req.headers == [(b"Host", b"h"), (b"Cookie", b"a=1"), (b"X-Forwarded-For", b"1.2.3.4")]
    assert (req.host_line, req.hop, req.forwarded) == (1, None, [3])


# ------------------------------- the balancer's own names on both paths (lean, field by field)

OWNED = (
    b"X-Forwarded-Port: 1\r\nx-forwarded-client-srcport: 2\r\nSLB-IP: 6.6.6.6\r\n"
    b"slb-id: spoof\r\nX-Client-Cert-Subject: CN=mallory\r\nX-CLIENT-CERT-FINGERPRINT: ab\r\n"
)


@pytest.mark.parametrize("connection", [b"", b"Connection: x-hop\r\nX-Hop: 1\r\n"])
@pytest.mark.parametrize(("forwarded", "proto"), [(True, None), (False, None), (False, True)])
def test_balancer_owned_and_client_cert_names_never_pass_on_either_path(
    connection: bytes, forwarded: bool, proto: bool | None
) -> None:
    # With a Connection header naming another field the head is rebuilt field by field;
    # without, the parser's noted lines are dropped from the head as received: same rules.
    raw = (
        b"GET / HTTP/1.1\r\nHost: h\r\n" + connection + OWNED + b"X-Forwarded-Proto: gopher\r\n"
        b"X-Forwarded-For: 9.9.9.9\r\nX-Kept: 1\r\n\r\n"
    )
    out = headers.upstream_request_head(
        request(raw),
        client_ip=CLIENT,
        scheme=b"https",
        forwarded=forwarded,
        default_host=DEFAULT_HOST,
        upgrade=False,
        proto=proto,
        extra=(b"SLB-ID: lb-1", b"X-Client-Cert-Subject: CN=alice"),
    )
    request(out)
    assert values(out, b"slb-id") == [b"lb-1"]
    assert values(out, b"x-client-cert-subject") == [b"CN=alice"]
    for name in (b"x-forwarded-port", b"x-forwarded-client-srcport", b"slb-ip", b"x-hop"):
        assert values(out, name) == []
    assert values(out, b"x-client-cert-fingerprint") == []
    assert values(out, b"x-kept") == [b"1"]
    proto_on = forwarded if proto is None else proto
    assert values(out, b"x-forwarded-proto") == ([b"https"] if proto_on else [b"gopher"])
    xff = [b"9.9.9.9, " + CLIENT.encode()] if forwarded else [b"9.9.9.9"]
    assert values(out, b"x-forwarded-for") == xff


def test_a_backend_response_keeps_the_names_only_the_balancer_sets_in_requests():
    # Only requests are the balancer's to vouch for: a backend's response passes as it is.
    raw = b"HTTP/1.1 200 OK\r\n" + OWNED + b"Content-Length: 0\r\n\r\n"
    assert client(raw) == raw
