"""HTTP/2 fields to and from HTTP/1.1 heads (h2_front's pure part), in memory."""

from __future__ import annotations

import pytest

from lbproxy.proxy.http2_fields import (
    extended_connect,
    request_head,
    response_fields,
    websocket_fields,
)
from lbproxy.wire.http1 import Limits, ParseError, parse_response_head

BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"a.example:8443"),
        (b":path", b"/p?q=1")]  # fmt: skip


def test_authority_is_host_and_cookie_crumbs_are_joined() -> None:
    raw = [*BASE, (b"host", b"other"), (b"cookie", b"a=1"), (b"x-t", b"v"), (b"cookie", b"b=2")]
    req = request_head(raw, True, Limits())
    assert (req.method, req.target, req.host) == (b"GET", b"/p?q=1", b"a.example:8443")
    assert req.headers == [(b"host", b"a.example:8443"), (b"x-t", b"v"), (b"cookie", b"a=1; b=2")]
    assert not req.chunked and req.content_length is None


def test_a_body_without_length_is_chunked_one_with_length_is_not() -> None:
    assert request_head([*BASE[1:], (b":method", b"POST")], False, Limits()).chunked
    req = request_head([*BASE, (b"content-length", b"5")], False, Limits())
    assert (req.chunked, req.content_length) == (False, 5)
    assert not request_head(BASE, True, Limits()).chunked  # END_STREAM on the head: no body


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ([(b":method", b"CONNECT"), (b":authority", b"x:443")], 501),
        ([*BASE[:3], (b":path", b"http://x/")], 400),
        ([*BASE[:3], (b":path", b"/a b")], 400),  # what HTTP/1.1 would refuse, refused
        ([*BASE, (b"x-big", b"v" * 40000)], 431),
        ([*BASE[:3], (b":path", b"/" + b"a" * 9000)], 414),
    ],
)
def test_refused_requests(raw: list[tuple[bytes, bytes]], status: int) -> None:
    with pytest.raises(ParseError) as e:
        request_head(raw, True, Limits())
    assert e.value.status == status


def test_response_fields_drop_connection_headers_and_lower_case_names() -> None:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 3\r\nSet-Cookie: a=1\r\n\r\n"
    )
    resp = parse_response_head(head)
    assert resp is not None
    fields = response_fields(resp, (b"Set-Cookie: SERVERID=abc; Path=/",))
    assert fields == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"SERVERID=abc; Path=/"),
    ]


WS_CONNECT = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
              (b":authority", b"a.example"), (b":path", b"/ws?room=1"),
              (b"sec-websocket-version", b"13"), (b"sec-websocket-protocol", b"chat"),
              (b"sec-websocket-key", b"client-sent")]  # fmt: skip


def test_extended_connect_becomes_an_http1_upgrade() -> None:
    assert extended_connect(WS_CONNECT) and not extended_connect(BASE)
    req = request_head(WS_CONNECT, False, Limits(), b"S0VZa2V5a2V5a2V5a2V5a2V5")
    assert (req.method, req.target, req.upgrade) == (b"GET", b"/ws?room=1", b"websocket")
    assert b"upgrade" in req.connection and not req.chunked and req.content_length is None
    assert req.headers == [
        (b"host", b"a.example"),
        (b"sec-websocket-version", b"13"),
        (b"sec-websocket-protocol", b"chat"),
        (b"connection", b"upgrade"),
        (b"upgrade", b"websocket"),
        (b"sec-websocket-key", b"S0VZa2V5a2V5a2V5a2V5a2V5"),  # ours, never the client's
    ]


def test_extended_connect_refused_without_the_option_or_for_another_protocol() -> None:
    with pytest.raises(ParseError) as e:
        request_head(WS_CONNECT, False, Limits())  # no key: http2_websocket is off
    assert e.value.status == 501
    other = [(k, b"webtransport" if k == b":protocol" else v) for k, v in WS_CONNECT]
    with pytest.raises(ParseError) as e:
        request_head(other, False, Limits(), b"key")
    assert e.value.status == 501


def test_the_200_keeps_the_101s_fields_but_the_connection_specific_ones() -> None:
    resp = parse_response_head(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\n"
        b"Sec-WebSocket-Accept: abc\r\nSec-WebSocket-Protocol: chat\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\nX-Other: 1\r\n"
        b"Set-Cookie: SERVERID=t1; Path=/\r\nContent-Length: 0\r\n\r\n"
    )
    assert resp is not None
    assert websocket_fields(resp) == [
        (b":status", b"200"),
        (b"sec-websocket-protocol", b"chat"),
        (b"sec-websocket-extensions", b"permessage-deflate"),
        (b"x-other", b"1"),
        (b"set-cookie", b"SERVERID=t1; Path=/"),
    ]
