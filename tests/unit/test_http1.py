"""Tests for lbproxy.wire.http1: strict HTTP/1.x head parsing, body framing, chunked tracking."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lbproxy.wire.http1 import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    CHUNKED_EOF,
    ChunkedTracker,
    Limits,
    ParseError,
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
    request_body_kind,
    response_body_kind,
)

LIMITS = Limits()
WRK = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n\r\n"
BROWSER = (
    b"GET /rooms/general?since=10 HTTP/1.1\r\n"
    b"Host: chat.example.com\r\n"
    b"Connection: keep-alive\r\n"
    b'sec-ch-ua: "Chromium";v="124"\r\n'
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\n"
    b"Accept: text/html,*/*;q=0.8\r\n"
    b"Sec-Fetch-Site: same-origin\r\n"
    b"Referer: https://chat.example.com/\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Cookie: session=abc; theme=dark\r\n"
    b"\r\n"
)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"


def req(raw: bytes | bytearray, limits: Limits = LIMITS) -> RequestHead:
    head = parse_request_head(raw, limits)
    assert head is not None, "head should be complete"
    return head


def resp(raw: bytes | bytearray, max_size: int = 65536) -> ResponseHead:
    head = parse_response_head(raw, max_size)
    assert head is not None, "head should be complete"
    return head


def req_error(raw: bytes, limits: Limits = LIMITS) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse_request_head(raw, limits)
    return info.value


def resp_error(raw: bytes, max_size: int = 65536) -> ParseError:
    with pytest.raises(ParseError) as info:
        parse_response_head(raw, max_size)
    return info.value


def with_headers(*lines: bytes, start: bytes = b"GET / HTTP/1.1", host: bool = True) -> bytes:
    fields = ([b"Host: a.example"] if host else []) + list(lines)
    return b"".join(line + b"\r\n" for line in (start, *fields)) + b"\r\n"


def feed_all(data: bytes, sizes: list[int] | None = None, max_line: int = 4096) -> int:
    """Feed ``data`` to a fresh tracker in pieces; the total consumed once done."""
    tracker = ChunkedTracker(max_line)
    pos = 0
    consumed = 0
    for size in sizes or [len(data)]:
        piece = data[pos : pos + size]
        used = tracker.feed(piece)
        assert 0 <= used <= len(piece)
        consumed += used
        pos += size
        if tracker.done:
            return consumed
        assert used == len(piece)
    return consumed if tracker.done else -1


# --- ParseError and Limits ---------------------------------------------------------------


def test_parse_error_carries_status_and_reason() -> None:
    e = ParseError(431, "too big")
    assert (e.status, e.reason) == (431, "too big")
    assert str(e) == "431 too big"
    assert isinstance(e, Exception)


def test_limits_defaults() -> None:
    assert (LIMITS.max_request_line, LIMITS.max_header_size, LIMITS.max_header_count) == (
        8192,
        32768,
        100,
    )


# --- request heads: the accepted shapes --------------------------------------------------


def test_wrk_request() -> None:
    h = req(WRK)
    assert h.method == b"GET"
    assert h.target == b"/"
    assert h.version == 1
    assert h.headers == [(b"Host", b"127.0.0.1:5000")]
    assert h.host == b"127.0.0.1:5000"
    assert h.content_length is None
    assert h.chunked is False
    assert h.keep_alive is True
    assert h.connection == frozenset()
    assert h.upgrade is None
    assert h.expect_continue is False
    assert h.raw_len == len(WRK)
    assert request_body_kind(h) == BODY_NONE


def test_websocket_extension_offers_are_noted_by_line() -> None:
    """An upgrade loses its Sec-WebSocket-Extensions offer under a message size limit: the
    parser notes where the offer lines are (any spelling), so finding them reads no other
    line; in a response the field is plain."""
    h = req(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"
        b"Connection: Upgrade\r\nUpgrade: websocket\r\nsec-websocket-EXTENSIONS: x\r\n\r\n"
    )
    assert h.extensions == [2, 5]
    assert h.hop == [3, 4]
    assert req(WRK).extensions is None
    r = parse_response_head(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
    )
    assert r is not None and r.hop == [1, 2]


def test_browser_request_keeps_order_and_spelling() -> None:
    h = req(BROWSER)
    assert h.target == b"/rooms/general?since=10"
    assert [name for name, _ in h.headers] == [
        b"Host",
        b"Connection",
        b"sec-ch-ua",
        b"User-Agent",
        b"Accept",
        b"Sec-Fetch-Site",
        b"Referer",
        b"Accept-Encoding",
        b"Accept-Language",
        b"Cookie",
    ]
    assert dict(h.headers)[b"Cookie"] == b"session=abc; theme=dark"
    assert h.connection == frozenset({b"keep-alive"})
    assert h.keep_alive is True
    assert h.raw_len == len(BROWSER)


def test_values_are_stripped_of_ows_only() -> None:
    h = req(with_headers(b"X-A: \t  inner  value \t ", b"X-B:", b"X-C:\tv", b"X-D:   "))
    assert h.headers[1:] == [
        (b"X-A", b"inner  value"),
        (b"X-B", b""),
        (b"X-C", b"v"),
        (b"X-D", b""),
    ]


def test_obs_text_and_htab_allowed_in_values() -> None:
    h = req(with_headers(b"X-Name: caf\xc3\xa9\tau lait"))
    assert h.headers[1] == (b"X-Name", b"caf\xc3\xa9\tau lait")


def test_all_token_characters_are_allowed_in_names() -> None:
    name = b"!#$%&'*+-.^_`|~09AZaz"
    h = req(with_headers(name + b": v"))
    assert h.headers[1] == (name, b"v")


def test_bytearray_input_gives_bytes() -> None:
    h = req(bytearray(BROWSER))
    assert type(h.method) is bytes
    assert type(h.target) is bytes
    assert all(type(n) is bytes and type(v) is bytes for n, v in h.headers)
    assert h.raw_len == len(BROWSER)


def test_framing_headers_are_matched_case_insensitively() -> None:
    h = req(with_headers(b"cOnTeNt-LeNgTh: 7", b"CONNECTION: Close"))
    assert h.content_length == 7
    assert h.keep_alive is False
    with pytest.raises(ParseError):
        parse_request_head(
            with_headers(b"Content-Length: 3", b"tRANSFER-eNCODING: chunked"), LIMITS
        )
    assert req_error(with_headers(b"HOST: b.example")).status == 400


def test_unknown_method_token_is_accepted() -> None:
    assert req(with_headers(start=b"PROPFIND /x HTTP/1.1")).method == b"PROPFIND"
    assert req(with_headers(start=b"get /x HTTP/1.1")).method == b"get"


def test_request_without_headers_http10() -> None:
    h = req(b"GET / HTTP/1.0\r\n\r\n")
    assert h.version == 0
    assert h.host is None
    assert h.headers == []
    assert h.keep_alive is False


# --- incomplete heads and the split-anywhere property ------------------------------------


@pytest.mark.parametrize("raw", [WRK, BROWSER, b"\r\n" + WRK])
def test_every_prefix_is_incomplete(raw: bytes) -> None:
    for k in range(len(raw)):
        assert parse_request_head(raw[:k], LIMITS) is None, k
        assert parse_request_head(bytearray(raw[:k]), LIMITS) is None, k
    assert req(raw).raw_len == len(raw)


def test_every_response_prefix_is_incomplete() -> None:
    for k in range(len(RESPONSE)):
        assert parse_response_head(RESPONSE[:k]) is None, k
    assert resp(RESPONSE).raw_len == len(RESPONSE)


def test_pipelined_requests_in_one_buffer() -> None:
    first = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"
    second = b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    buf = first + b"hello" + second + b"GET /c HT"
    h1 = req(buf)
    assert (h1.target, h1.raw_len, h1.content_length) == (b"/a", len(first), 5)
    assert request_body_kind(h1) == BODY_LENGTH
    rest = buf[h1.raw_len + 5 :]
    h2 = req(rest)
    assert (h2.target, h2.raw_len) == (b"/b", len(second))
    assert parse_request_head(rest[h2.raw_len :], LIMITS) is None


def test_pipelined_chunked_request_then_next_head() -> None:
    first = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"4\r\nwiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: t\r\n\r\n"
    second = b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"
    buf = first + body + second
    h1 = req(buf)
    assert request_body_kind(h1) == BODY_CHUNKED
    tracker = ChunkedTracker()
    used = tracker.feed(buf[h1.raw_len :])
    assert tracker.done
    assert used == len(body)
    assert req(buf[h1.raw_len + used :]).target == b"/next"


def test_leading_empty_lines_are_skipped_up_to_a_few() -> None:
    for n in range(1, 5):
        raw = b"\r\n" * n + WRK
        h = req(raw)
        assert h.raw_len == len(raw)
        assert h.method == b"GET"
    assert parse_request_head(b"\r\n", LIMITS) is None
    assert parse_request_head(b"\r\n\r\n", LIMITS) is None
    assert parse_request_head(b"\r", LIMITS) is None
    assert req_error(b"\r\n" * 5 + WRK).status == 400
    assert req_error(b"\r\n" * 5).status == 400


def test_leading_bare_lf_is_not_skipped() -> None:
    assert req_error(b"\n" + WRK).status == 400


# --- request line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"GET  / HTTP/1.1",
        b" GET / HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b"GET /",
        b"GET / HTTP/1.1 extra",
        b"GET\t/ HTTP/1.1",
        b"GET /\tx HTTP/1.1",
        b"GE(T / HTTP/1.1",
        b"GE\x80T / HTTP/1.1",
        b" / HTTP/1.1",
        b"GET  HTTP/1.1",
        b"GET / http/1.1",
        b"GET / HTTP/1.1x",
        b"GET / HTTP/1.10",
        b"GET / HTTP/1",
        b"GET / HTTPS/1.1",
        b"GET /a\x7fb HTTP/1.1",
        b"GET /a\x00b HTTP/1.1",
    ],
)
def test_malformed_request_line_is_400(line: bytes) -> None:
    assert req_error(with_headers(start=line)).status == 400


@pytest.mark.parametrize("version", [b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"HTTP/3.0"])
def test_other_http_versions_are_505(version: bytes) -> None:
    assert req_error(with_headers(start=b"GET / " + version)).status == 505


def test_h2_prior_knowledge_preface_is_505() -> None:
    assert req_error(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").status == 505


def test_obs_text_in_target_is_kept_as_received() -> None:
    assert req(with_headers(start=b"GET /caf\xc3\xa9 HTTP/1.1")).target == b"/caf\xc3\xa9"


# --- request targets ---------------------------------------------------------------------


def test_absolute_form_authority_overrides_host() -> None:
    raw = with_headers(start=b"GET http://backend.example:8080/p?q=1 HTTP/1.1")
    h = req(raw)
    assert h.target == b"http://backend.example:8080/p?q=1"
    assert h.host == b"backend.example:8080"
    assert (b"Host", b"a.example") in h.headers


@pytest.mark.parametrize(
    ("target", "host"),
    [
        (b"HTTPS://Example.COM", b"Example.COM"),
        (b"http://a.example?x=/y", b"a.example"),
        (b"http://a.example#frag", b"a.example"),
        (b"http://[::1]:81/", b"[::1]:81"),
    ],
)
def test_absolute_form_variants(target: bytes, host: bytes) -> None:
    assert req(with_headers(start=b"GET " + target + b" HTTP/1.1")).host == host


@pytest.mark.parametrize(
    "target",
    [
        b"http://user@a.example/",
        b"http://user:pw@a.example/",
        b"http:///path",
        b"http://:80/path",
        b"http://",
        b"ftp://a.example/",
        b"a.example/path",
        b"*",
        b"example.com:443",
    ],
)
def test_bad_non_origin_targets(target: bytes) -> None:
    assert req_error(with_headers(start=b"GET " + target + b" HTTP/1.1")).status == 400


def test_absolute_form_still_needs_host_in_http11() -> None:
    raw = b"GET http://a.example/ HTTP/1.1\r\n\r\n"
    assert req_error(raw).status == 400
    assert req(b"GET http://a.example/ HTTP/1.0\r\n\r\n").host == b"a.example"


def test_asterisk_form_only_for_options() -> None:
    assert req(with_headers(start=b"OPTIONS * HTTP/1.1")).target == b"*"
    assert req_error(with_headers(start=b"GET * HTTP/1.1")).status == 400


def test_connect_needs_authority_form() -> None:
    h = req(with_headers(start=b"CONNECT a.example:443 HTTP/1.1"))
    assert h.target == b"a.example:443"
    assert h.host == b"a.example"
    assert req_error(with_headers(start=b"CONNECT /x HTTP/1.1")).status == 400
    assert req_error(with_headers(start=b"CONNECT a.example HTTP/1.1")).status == 400
    assert req_error(with_headers(start=b"CONNECT http://a.example:1/ HTTP/1.1")).status == 400


# --- Host --------------------------------------------------------------------------------


def test_missing_host_in_http11_is_400() -> None:
    e = req_error(with_headers(host=False))
    assert (e.status, e.reason) == (400, "missing Host")


def test_more_than_one_host_is_400_even_if_identical() -> None:
    assert req_error(with_headers(b"Host: a.example")).status == 400
    assert req_error(with_headers(b"host: b.example")).status == 400
    assert req_error(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n").status == 400


@pytest.mark.parametrize("value", [b"a b", b"a/b", b"u@a.example", b"a\tb", b'a"b', b"\xc3\xa9"])
def test_invalid_host_value_is_400(value: bytes) -> None:
    assert req_error(with_headers(b"Host: " + value, host=False)).status == 400


def test_empty_host_and_ip_literals_are_accepted() -> None:
    assert req(with_headers(b"Host:", host=False)).host == b""
    assert req(with_headers(b"Host: [2001:db8::1]:8443", host=False)).host == b"[2001:db8::1]:8443"


def test_http10_host_is_optional_but_kept() -> None:
    assert req(b"GET / HTTP/1.0\r\nHost: h.example\r\n\r\n").host == b"h.example"


# --- Content-Length and Transfer-Encoding ------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([b"0"], 0),
        ([b"42"], 42),
        ([b"  42 \t"], 42),
        ([b"007"], 7),
        ([b"0" * 30 + b"5"], 5),
        ([b"5", b"5"], 5),
        ([b"5, 5"], 5),
        ([b"5,5, 5"], 5),
        ([b"999999999999999999"], 999999999999999999),
    ],
)
def test_valid_content_length(values: list[bytes], expected: int) -> None:
    h = req(with_headers(*(b"Content-Length: " + v for v in values), start=b"POST / HTTP/1.1"))
    assert h.content_length == expected
    assert request_body_kind(h) == BODY_LENGTH


@pytest.mark.parametrize(
    "values",
    [
        [b""],
        [b"-1"],
        [b"+5"],
        [b"0x5"],
        [b"5 5"],
        [b"1_0"],
        [b"5.0"],
        [b"\xef\xbc\x95"],  # fullwidth digit five
        [b"9999999999999999999"],
        [b"5", b"6"],
        [b"5, 6"],
        [b"5,,5"],
        [b"5,"],
        [b"5", b"5, 6"],
    ],
)
def test_invalid_content_length_is_400(values: list[bytes]) -> None:
    raw = with_headers(*(b"Content-Length: " + v for v in values), start=b"POST / HTTP/1.1")
    assert req_error(raw).status == 400


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED", b"\tchunked "])
def test_chunked_request(value: bytes) -> None:
    h = req(with_headers(b"Transfer-Encoding: " + value, start=b"POST / HTTP/1.1"))
    assert h.chunked is True
    assert h.content_length is None
    assert request_body_kind(h) == BODY_CHUNKED


@pytest.mark.parametrize(
    "fields",
    [
        [b"Transfer-Encoding: gzip, chunked"],
        [b"Transfer-Encoding: chunked, identity"],
        [b"Transfer-Encoding: xchunked"],
        [b"Transfer-Encoding: chunked, chunked"],
        [b"Transfer-Encoding: chunked,"],
        [b"Transfer-Encoding: identity"],
        [b"Transfer-Encoding:"],
        [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
        [b"Transfer-Encoding: gzip", b"Transfer-Encoding: chunked"],
        [b'Transfer-Encoding: "chunked"'],
    ],
)
def test_transfer_encoding_other_than_chunked_is_400(fields: list[bytes]) -> None:
    assert req_error(with_headers(*fields, start=b"POST / HTTP/1.1")).status == 400


@pytest.mark.parametrize(
    "fields",
    [
        [b"Content-Length: 5", b"Transfer-Encoding: chunked"],
        [b"Transfer-Encoding: chunked", b"Content-Length: 5"],
        [b"Transfer-Encoding: chunked", b"Content-Length: 0"],
    ],
)
def test_content_length_with_transfer_encoding_is_400(fields: list[bytes]) -> None:
    e = req_error(with_headers(*fields, start=b"POST / HTTP/1.1"))
    assert e.status == 400
    assert "Content-Length" in e.reason and "Transfer-Encoding" in e.reason


def test_transfer_encoding_in_http10_request_is_400() -> None:
    raw = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert req_error(raw).status == 400


def test_request_body_kind_none_without_framing_headers() -> None:
    assert request_body_kind(req(with_headers(start=b"POST / HTTP/1.1"))) == BODY_NONE
    zero = req(with_headers(b"Content-Length: 0", start=b"POST / HTTP/1.1"))
    assert request_body_kind(zero) == BODY_LENGTH


# --- field syntax ------------------------------------------------------------------------


def test_obs_fold_is_400() -> None:
    e = req_error(with_headers(b"X-A: one", b" two"))
    assert e.status == 400
    assert "obs-fold" in e.reason
    assert "obs-fold" in req_error(with_headers(b"X-A: one", b"\ttwo: three")).reason
    assert req_error(b"GET / HTTP/1.1\r\n Host: a\r\n\r\n").status == 400


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b\nc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b\rc\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\r\n\r\n",
        b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_bare_cr_or_lf_is_400(raw: bytes) -> None:
    assert req_error(raw).status == 400


@pytest.mark.parametrize(
    "partial",
    [
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"GET / HTTP/1.1\n",
        b"GET / HTTP/1.1\r\nHost: a\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n\n",
        b"GET / HTTP/1.1\r\nX: a\rb",
    ],
)
def test_bare_lf_terminators_are_refused_before_the_head_completes(partial: bytes) -> None:
    assert req_error(partial).status == 400


def test_pending_cr_at_end_of_partial_head_is_fine() -> None:
    assert parse_request_head(b"GET / HTTP/1.1\r", LIMITS) is None
    assert parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r", LIMITS) is None


@pytest.mark.parametrize(
    "ctl", [b"\x00", b"\x01", b"\x08", b"\x0b", b"\x0c", b"\x1b", b"\x1f", b"\x7f"]
)
def test_control_characters_in_values_are_400(ctl: bytes) -> None:
    e = req_error(with_headers(b"X-A: a" + ctl + b"b"))
    assert e.status == 400
    assert ("NUL" in e.reason) == (ctl == b"\x00")


def test_whitespace_between_name_and_colon_is_400() -> None:
    for line in (b"Host : a", b"Host\t: a", b"Content-Length : 5", b"X-A : b"):
        assert req_error(with_headers(line)).status == 400


def test_whitespace_before_colon_reason() -> None:
    assert "colon" in req_error(with_headers(b"X-A : b")).reason


@pytest.mark.parametrize(
    "line", [b": v", b"X(y): v", b"X y: v", b"X\x80: v", b'X"y: v', b"X/y: v", b"no colon here"]
)
def test_invalid_field_names_are_400(line: bytes) -> None:
    assert req_error(with_headers(line)).status == 400


# --- Connection, keep-alive, upgrade, Expect ---------------------------------------------


@pytest.mark.parametrize(
    ("version", "fields", "keep_alive"),
    [
        (b"HTTP/1.1", [], True),
        (b"HTTP/1.1", [b"Connection: close"], False),
        (b"HTTP/1.1", [b"Connection: Close"], False),
        (b"HTTP/1.1", [b"Connection: keep-alive"], True),
        (b"HTTP/1.1", [b"Connection: foo, close"], False),
        (b"HTTP/1.1", [b"Connection: keep-alive", b"Connection: close"], False),
        (b"HTTP/1.0", [], False),
        (b"HTTP/1.0", [b"Connection: keep-alive"], True),
        (b"HTTP/1.0", [b"Connection: Keep-Alive"], True),
        (b"HTTP/1.0", [b"Connection: keep-alive, close"], False),
        (b"HTTP/1.0", [b"Connection: close"], False),
        (b"HTTP/1.0", [b"Keep-Alive: timeout=5"], False),
        (b"HTTP/1.0", [b"Connection: foo"], False),
        (b"HTTP/1.0", [b"Connection: upgrade", b"Upgrade: websocket"], False),
        (b"HTTP/1.0", [b"Content-Length: 0"], False),
        (b"HTTP/1.1", [b"Content-Length: 0"], True),
        (b"HTTP/1.1", [b"Connection: upgrade", b"Upgrade: websocket"], True),
    ],
)
def test_keep_alive(version: bytes, fields: list[bytes], keep_alive: bool) -> None:
    assert req(with_headers(*fields, start=b"GET / " + version)).keep_alive is keep_alive


def test_connection_tokens_are_lowercased_and_merged() -> None:
    h = req(with_headers(b"Connection: Keep-Alive, X-Foo ,, ", b"connection: UPGRADE"))
    assert h.connection == frozenset({b"keep-alive", b"x-foo", b"upgrade"})


def test_websocket_upgrade_detected() -> None:
    raw = with_headers(
        b"Connection: Upgrade",
        b"Upgrade: WebSocket",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
    )
    h = req(raw)
    assert h.upgrade == b"websocket"
    assert h.keep_alive is True


def test_firefox_style_upgrade() -> None:
    h = req(with_headers(b"Connection: keep-alive, Upgrade", b"Upgrade: websocket"))
    assert h.upgrade == b"websocket"


@pytest.mark.parametrize(
    ("fields", "start"),
    [
        ([b"Upgrade: websocket"], b"GET / HTTP/1.1"),
        ([b"Connection: upgrade"], b"GET / HTTP/1.1"),
        ([b"Connection: upgrade", b"Upgrade:"], b"GET / HTTP/1.1"),
        ([b"Connection: upgrade", b"Upgrade: websocket"], b"GET / HTTP/1.0"),
    ],
)
def test_not_an_upgrade(fields: list[bytes], start: bytes) -> None:
    assert req(with_headers(*fields, start=start)).upgrade is None


def test_multiple_upgrade_values_are_joined() -> None:
    h = req(with_headers(b"Connection: upgrade", b"Upgrade: h2c", b"Upgrade: WebSocket"))
    assert h.upgrade == b"h2c, websocket"


def test_expect_continue() -> None:
    post = b"POST / HTTP/1.1"
    assert req(with_headers(b"Expect: 100-continue", start=post)).expect_continue is True
    assert req(with_headers(b"Expect: 100-Continue", start=post)).expect_continue is True
    assert req(with_headers(b"Expect: something", start=post)).expect_continue is False
    assert req(with_headers(start=post)).expect_continue is False
    http10 = b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"
    assert req(http10).expect_continue is False


# --- limits ------------------------------------------------------------------------------


def test_request_line_limit() -> None:
    limits = Limits(max_request_line=64)
    ok_line = b"GET /" + b"a" * (64 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert len(ok_line) == 64
    assert req(with_headers(start=ok_line), limits).target.startswith(b"/a")
    long_line = b"GET /" + b"a" * (65 - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"
    assert req_error(with_headers(start=long_line), limits).status == 414


def test_request_line_limit_before_head_completes() -> None:
    limits = Limits(max_request_line=64)
    assert parse_request_head(b"G" * 65, limits) is None  # may be 64 bytes + CR
    assert req_error(b"G" * 66, limits).status == 414
    assert req_error(b"GET /" + b"a" * 70 + b" HTTP/1.1\r\nHost", limits).status == 414


def test_header_size_limit() -> None:
    raw = with_headers(b"X-Pad: " + b"p" * 100)
    assert req(raw, Limits(max_header_size=len(raw))).raw_len == len(raw)
    e = req_error(raw, Limits(max_header_size=len(raw) - 1))
    assert e.status == 431


def test_header_size_limit_before_head_completes() -> None:
    limits = Limits(max_header_size=200)
    partial = b"GET / HTTP/1.1\r\nX-Pad: " + b"p" * 200
    assert req_error(partial[:200], limits).status == 431
    assert parse_request_head(partial[:199], limits) is None
    # Leading empty lines do not count.
    assert parse_request_head(b"\r\n" + partial[:199], limits) is None


def test_header_count_limit() -> None:
    limits = Limits(max_header_count=5)
    ok = with_headers(*(b"X-%d: v" % i for i in range(4)))
    assert len(req(ok, limits).headers) == 5
    too_many = with_headers(*(b"X-%d: v" % i for i in range(5)))
    assert req_error(too_many, limits).status == 431


def test_header_count_limit_before_head_completes() -> None:
    limits = Limits(max_header_count=5)
    partial = with_headers(*(b"X-%d: v" % i for i in range(5)))[:-2]
    assert req_error(partial, limits).status == 431
    assert parse_request_head(partial[:-10], limits) is None


def test_default_limits_accept_a_large_but_legal_head() -> None:
    cookie = b"Cookie: " + b"c" * 8000
    h = req(with_headers(cookie, *(b"X-%d: v" % i for i in range(98))))
    assert len(h.headers) == 100


# --- responses ---------------------------------------------------------------------------


def test_simple_response() -> None:
    h = resp(RESPONSE + b"hello")
    assert (h.version, h.status, h.reason) == (1, 200, b"OK")
    assert h.headers == [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")]
    assert h.content_length == 5
    assert h.chunked is False
    assert h.keep_alive is True
    assert h.connection == frozenset()
    assert h.raw_len == len(RESPONSE)
    assert response_body_kind(b"GET", h) == BODY_LENGTH


@pytest.mark.parametrize(
    ("line", "status", "reason"),
    [
        (b"HTTP/1.1 404 Not Found Here", 404, b"Not Found Here"),
        (b"HTTP/1.1 204 ", 204, b""),
        (b"HTTP/1.1 204", 204, b""),
        (b"HTTP/1.1 100 Continue", 100, b"Continue"),
        (b"HTTP/1.1 599 x\ty", 599, b"x\ty"),
        (b"HTTP/1.0 200 caf\xc3\xa9", 200, b"caf\xc3\xa9"),
    ],
)
def test_status_lines(line: bytes, status: int, reason: bytes) -> None:
    h = resp(line + b"\r\n\r\n")
    assert (h.status, h.reason) == (status, reason)


@pytest.mark.parametrize(
    "line",
    [
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 abc OK",
        b"HTTP/1.1 099 X",
        b"HTTP/1.1 600 X",
        b"HTTP/1.1 +20 X",
        b"HTTP/1.1  200 OK",
        b"HTTP/2 200 OK",
        b"HTTP/2.0 200 OK",
        b"HTTP/1.2 200 OK",
        b"http/1.1 200 OK",
        b"HTTP/1.1",
        b"ICY 200 OK",
        b"",
        b"HTTP/1.1 200 O\x00K",
    ],
)
def test_bad_status_lines_are_502(line: bytes) -> None:
    assert resp_error(line + b"\r\nX: y\r\n\r\n").status == 502


def test_response_keep_alive() -> None:
    assert resp(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").keep_alive is False
    assert resp(b"HTTP/1.0 200 OK\r\n\r\n").keep_alive is False
    assert resp(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive is False
    assert resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive is True
    assert resp(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n").keep_alive is True
    h = resp(b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-A\r\n\r\n")
    assert h.connection == frozenset({b"keep-alive", b"x-a"})


def test_response_chunked_overrides_content_length() -> None:
    h = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert h.chunked is True
    assert h.content_length is None
    assert h.keep_alive is False
    assert response_body_kind(b"GET", h) == BODY_CHUNKED


def test_response_transfer_codings() -> None:
    h = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n")
    assert h.chunked is True
    assert h.keep_alive is True
    closed = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert closed.chunked is False
    assert closed.keep_alive is False
    assert response_body_kind(b"GET", closed) == BODY_CLOSE
    split = resp(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert split.chunked is True
    assert resp_error(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").status == 502
    assert resp_error(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: ,\r\n\r\n").status == 502


def test_http10_response_with_transfer_encoding_is_not_reused() -> None:
    h = resp(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert h.chunked is True
    assert h.keep_alive is False


@pytest.mark.parametrize("value", [b"abc", b"-1", b"", b"5, 6", b"1 0", b"9" * 19])
def test_invalid_response_content_length_is_502(value: bytes) -> None:
    assert resp_error(b"HTTP/1.1 200 OK\r\nContent-Length: " + value + b"\r\n\r\n").status == 502


def test_conflicting_response_content_lengths_are_502() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"
    assert resp_error(raw).status == 502
    same = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"
    assert resp(same).content_length == 5


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"\r\nHTTP/1.1 200 OK\r\n\r\n",
    ],
)
def test_garbage_response_heads_are_502(raw: bytes) -> None:
    assert resp_error(raw).status == 502


def test_response_bare_lf_refused_before_head_completes() -> None:
    assert resp_error(b"HTTP/1.1 200 OK\nContent-Length: 0\n").status == 502


def test_response_head_size_limit() -> None:
    raw = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * 100 + b"\r\n\r\n"
    assert resp(raw, max_size=len(raw)).raw_len == len(raw)
    assert resp_error(raw, max_size=len(raw) - 1).status == 502
    assert resp_error(raw[:64], max_size=64).status == 502
    assert parse_response_head(raw[:63], 64) is None


def test_response_host_header_is_just_a_field() -> None:
    h = resp(b"HTTP/1.1 200 OK\r\nHost: a\r\nHost: b\r\nContent-Length: 0\r\n\r\n")
    assert h.headers[:2] == [(b"Host", b"a"), (b"Host", b"b")]


def test_response_upgrade() -> None:
    h = resp(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
    assert h.status == 101
    assert h.upgrade == b"websocket"
    assert response_body_kind(b"GET", h) == BODY_NONE
    assert resp(b"HTTP/1.1 200 OK\r\nUpgrade: websocket\r\n\r\n").upgrade is None


def test_pipelined_responses_with_interim_100() -> None:
    buf = b"HTTP/1.1 100 Continue\r\n\r\n" + RESPONSE + b"helloHTTP/1.1 204 No Content\r\n\r\n"
    first = resp(buf)
    assert first.status == 100
    assert response_body_kind(b"POST", first) == BODY_NONE
    second = resp(buf[first.raw_len :])
    assert second.content_length == 5
    third = resp(buf[first.raw_len + second.raw_len + 5 :])
    assert third.status == 204


# --- response body framing ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "raw", "kind"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", BODY_NONE),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", BODY_NONE),
        (b"HEAD", b"HTTP/1.1 200 OK\r\n\r\n", BODY_NONE),
        (b"GET", b"HTTP/1.1 100 Continue\r\n\r\n", BODY_NONE),
        (b"GET", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n", BODY_NONE),
        (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", BODY_NONE),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", BODY_NONE),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\n\r\n", BODY_NONE),
        (b"CONNECT", b"HTTP/1.1 200 OK\r\n\r\n", BODY_NONE),
        (b"CONNECT", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", BODY_NONE),
        (b"CONNECT", b"HTTP/1.1 407 Auth\r\nContent-Length: 5\r\n\r\n", BODY_LENGTH),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", BODY_CHUNKED),
        (b"POST", b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", BODY_LENGTH),
        (b"GET", b"HTTP/1.1 200 OK\r\n\r\n", BODY_CLOSE),
        (b"GET", b"HTTP/1.0 200 OK\r\n\r\n", BODY_CLOSE),
        (b"GET", b"HTTP/1.1 205 Reset Content\r\n\r\n", BODY_CLOSE),
        (b"GET", b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\n", BODY_LENGTH),
    ],
)
def test_response_body_kind(method: bytes, raw: bytes, kind: int) -> None:
    assert response_body_kind(method, resp(raw)) == kind


def test_body_kind_constants_are_distinct() -> None:
    assert len({BODY_NONE, BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE}) == 4


# --- chunked bodies ----------------------------------------------------------------------

CHUNKED = b"4\r\nWiki\r\n5;name=value\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\n"
PAYLOAD = b"Wikipedia in\r\n\r\nchunks."


def test_chunked_eof_constant() -> None:
    assert CHUNKED_EOF == b"0\r\n\r\n"
    tracker = ChunkedTracker()
    assert tracker.feed(CHUNKED_EOF) == 5
    assert tracker.done


def test_chunked_body_in_one_piece() -> None:
    tracker = ChunkedTracker()
    assert not tracker.done
    assert tracker.feed(CHUNKED) == len(CHUNKED)
    assert tracker.done
    assert tracker.feed(b"more") == 0


def test_chunked_body_followed_by_next_message() -> None:
    tracker = ChunkedTracker()
    assert tracker.feed(CHUNKED + b"GET / HTTP/1.1\r\n") == len(CHUNKED)
    assert tracker.done


def test_chunked_decode() -> None:
    pieces, used = ChunkedTracker().feed_decode(CHUNKED + b"next")
    assert used == len(CHUNKED)
    assert b"".join(pieces) == PAYLOAD


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_chunked_one_byte_at_a_time(kind: type) -> None:
    tracker = ChunkedTracker()
    payload = []
    for k in range(len(CHUNKED)):
        assert not tracker.done
        pieces, used = tracker.feed_decode(kind(CHUNKED[k : k + 1]))
        assert used == 1
        payload += pieces
    assert tracker.done
    assert b"".join(payload) == PAYLOAD
    assert tracker.feed(kind(b"x")) == 0


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_chunked_random_splits(kind: type) -> None:
    rng = random.Random(1234)
    data = CHUNKED + b"NEXT"
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 8)))
        tracker = ChunkedTracker()
        consumed = 0
        payload = b""
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            pieces, used = tracker.feed_decode(kind(data[a:b]))
            payload += b"".join(pieces)
            consumed += used
            if tracker.done:
                break
            assert used == b - a
        assert tracker.done
        assert consumed == len(CHUNKED)
        assert payload == PAYLOAD


def test_chunked_memoryview_of_large_buffer_with_long_line() -> None:
    ext = b";" + b"e" * 300 + b"=v"
    data = b"3" + ext + b"\r\nabc\r\n0\r\n\r\n"
    tracker = ChunkedTracker()
    assert tracker.feed(memoryview(data + b"x" * 1000)) == len(data)
    assert tracker.done


def test_memoryview_line_end_at_every_offset() -> None:
    # The LF of a size line may sit anywhere relative to the windows used to find it.
    for ext_len in range(0, 400, 3):
        line = b"3" + (b";" + b"e" * ext_len if ext_len else b"")
        data = line + b"\r\nabc\r\n0\r\n\r\n"
        pieces, used = ChunkedTracker().feed_decode(memoryview(data + b"tail"))
        assert (pieces, used) == ([b"abc"], len(data)), ext_len


def test_chunk_data_is_not_inspected() -> None:
    # Framing bytes inside chunk data are data: only the size decides.
    inner = b"0\r\n\r\nGET /evil HTTP/1.1\r\n\r\n"
    data = b"%x\r\n" % len(inner) + inner + b"\r\n" + CHUNKED_EOF
    assert feed_all(data) == len(data)
    assert feed_all(data, [1] * len(data)) == len(data)


def test_large_chunk_skipped_in_pieces() -> None:
    tracker = ChunkedTracker()
    size = 10 * 1024 * 1024
    assert tracker.feed(b"%x\r\n" % size) == len(b"%x\r\n" % size)
    block = memoryview(bytes(64 * 1024))
    for _ in range(size // len(block)):
        assert tracker.feed(block) == len(block)
    assert not tracker.done
    assert tracker.feed(b"\r\n0\r\n\r\n") == 7
    assert tracker.done


def test_max_chunk_size_accepted() -> None:
    tracker = ChunkedTracker()
    assert tracker.feed(b"7fffffffffffffff\r\n" + b"x" * 100) == 118
    assert not tracker.done
    assert tracker.feed(CHUNKED_EOF) == len(CHUNKED_EOF)  # still chunk data
    assert not tracker.done


def test_leading_zeros_in_chunk_size() -> None:
    data = b"00000000000000000003\r\nabc\r\n000\r\n\r\n"
    pieces, used = ChunkedTracker().feed_decode(data)
    assert used == len(data)
    assert pieces == [b"abc"]


@pytest.mark.parametrize(
    "data",
    [
        b"g\r\n",
        b"\r\n",
        b"-1\r\n",
        b"+1\r\n",
        b"0x1\r\nx\r\n",
        b"0X1\r\nx\r\n",
        b" 1\r\nx\r\n",
        b"1 \r\nx\r\n",
        b"1_0\r\n",
        b"8000000000000000\r\n",
        b"ffffffffffffffff\r\n",
        b"10000000000000000000\r\n",
        b"1\nx\r\n",
        b"1\r\rx\r\n",
        b"1\r\nxy\r\n",
        b"1\r\nx\n0\r\n\r\n",
        b"1\r\nx\r0\r\n\r\n",
        b"1\r\nxAB0\r\n\r\n",  # would end cleanly if the CRLF after data were skipped
        b"1\r\nxA\n0\r\n\r\n",
        b"1\r\nx\rB0\r\n\r\n",
        b"3\r\nabc\r\n1\r\nxAB0\r\n\r\n",
        b"1;\r\nx\r\n",
        b"1;=v\r\nx\r\n",
        b"1;a=\r\nx\r\n",
        b'1;a="unterminated\r\nx\r\n',
        b"1;a b\r\nx\r\n",
        b"1;a=\x00\r\nx\r\n",
        b"\xef\xbc\x91\r\n",  # fullwidth digit one
        b"0\r\nbad trailer\r\n\r\n",
        b"0\r\n trailer: folded\r\n\r\n",
        b"0\r\nX: a\x00\r\n\r\n",
        b"0\r\nX : a\r\n\r\n",
        b"0\r\n: a\r\n\r\n",
        b"0\r\n\n",
        b"0\r\nX: a\n\r\n",
        b"0\n\r\n",
    ],
)
def test_invalid_chunked_framing_is_400(data: bytes) -> None:
    for sizes in ([len(data)], [1] * len(data)):
        tracker = ChunkedTracker()
        with pytest.raises(ParseError) as info:
            pos = 0
            for size in sizes:
                tracker.feed(data[pos : pos + size])
                pos += size
        assert info.value.status == 400
        with pytest.raises(ParseError):
            tracker.feed(b"0\r\n\r\n")


@pytest.mark.parametrize(
    "size_line",
    [b"1;name", b"1;name=value", b"1 ; name = value", b'1;a="q \\" s";b=t', b"1\t;x", b"A;x;y=1"],
)
def test_chunk_extensions_are_accepted(size_line: bytes) -> None:
    n = int(size_line[:1], 16)
    data = size_line + b"\r\n" + b"z" * n + b"\r\n" + CHUNKED_EOF
    assert feed_all(data) == len(data)
    assert feed_all(data, [1] * len(data)) == len(data)


def test_trailer_fields_are_accepted() -> None:
    data = b"1\r\na\r\n0\r\nX-A: 1\r\nX-B:\t2 3\r\nChecksum: abc\r\n\r\n"
    assert feed_all(data) == len(data)
    assert feed_all(data, [1] * len(data)) == len(data)


def test_too_many_trailer_fields() -> None:
    data = b"0\r\n" + b"X: y\r\n" * 101 + b"\r\n"
    with pytest.raises(ParseError):
        ChunkedTracker().feed(data)


def test_size_line_limit() -> None:
    ok = b"1;" + b"e" * 14 + b"\r\nx\r\n0\r\n\r\n"  # a 16-byte size line
    assert feed_all(ok, max_line=16) == len(ok)
    assert feed_all(ok, [1] * len(ok), max_line=16) == len(ok)
    bad = b"1;" + b"e" * 15 + b"\r\nx\r\n0\r\n\r\n"
    with pytest.raises(ParseError):
        feed_all(bad, max_line=16)
    with pytest.raises(ParseError):
        feed_all(bad, [1] * len(bad), max_line=16)


def test_endless_size_line_fails_without_waiting_for_lf() -> None:
    tracker = ChunkedTracker(max_line=100)
    assert tracker.feed(b"1" * 50) == 50
    with pytest.raises(ParseError):
        tracker.feed(b"1" * 60)
    tracker = ChunkedTracker(max_line=100)
    with pytest.raises(ParseError):
        tracker.feed(b"0\r\nX: " + b"v" * 200)


def test_trailer_line_limit() -> None:
    line = b"X: " + b"v" * 20
    assert feed_all(b"0\r\n" + line + b"\r\n\r\n", max_line=len(line)) > 0
    with pytest.raises(ParseError):
        feed_all(b"0\r\n" + line + b"v\r\n\r\n", max_line=len(line))


def test_incomplete_chunked_body_is_not_done() -> None:
    for k in range(len(CHUNKED)):
        tracker = ChunkedTracker()
        assert tracker.feed(CHUNKED[:k]) == k
        assert not tracker.done


def test_empty_feed() -> None:
    tracker = ChunkedTracker()
    assert tracker.feed(b"") == 0
    assert tracker.feed_decode(b"") == ([], 0)
    assert not tracker.done


# --- properties --------------------------------------------------------------------------

TOKEN_ALPHABET = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
tokens = st.binary(min_size=1, max_size=12).map(
    lambda b: bytes(TOKEN_ALPHABET[c % len(TOKEN_ALPHABET)] for c in b)
)
values = st.binary(max_size=30).map(
    lambda b: bytes(0x21 + c % 0x5E if c < 0xC0 else c for c in b).strip()
)
paths = st.binary(max_size=20).map(lambda b: b"/" + bytes(0x21 + c % 0x5E for c in b))


@st.composite
def valid_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    fields = [(b"Host", b"h.example")]
    for name, value in draw(st.lists(st.tuples(tokens, values), max_size=8)):
        if name.lower() not in (
            b"host",
            b"content-length",
            b"transfer-encoding",
            b"connection",
            b"upgrade",
            b"expect",
        ):
            fields.append((name, value))
    body = draw(st.sampled_from([None, b"Content-Length: 3", b"Transfer-Encoding: chunked"]))
    if body and not (version == b"HTTP/1.0" and b"Transfer" in body):
        name, _, value = body.partition(b": ")
        fields.append((name, value))
    leading = b"\r\n" * draw(st.integers(0, 2))
    start = method + b" " + draw(paths) + b" " + version
    return (
        leading
        + b"".join(line + b"\r\n" for line in [start, *(n + b": " + v for n, v in fields)])
        + b"\r\n"
    )


MUTATION_BYTES = b"\r\n\x00\t :,;\x7f\x80chunkedContent-Length0123456789"


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        pos = draw(st.integers(0, len(data)))
        if op == "insert":
            data[pos:pos] = (
                draw(st.binary(min_size=1, max_size=3))
                if draw(st.booleans())
                else bytes([draw(st.sampled_from(MUTATION_BYTES))])
            )
        elif op == "delete" and pos < len(data):
            del data[pos : pos + draw(st.integers(1, 3))]
        elif pos < len(data):
            data[pos] = draw(st.sampled_from(MUTATION_BYTES))
    return bytes(data)


def check_request_outcome(buf: bytes, limits: Limits = LIMITS) -> RequestHead | None:
    try:
        head = parse_request_head(buf, limits)
    except ParseError as e:
        assert e.status in (400, 414, 431, 505)
        return None
    if head is not None:
        assert 4 <= head.raw_len <= len(buf)
        assert buf[head.raw_len - 4 : head.raw_len] == b"\r\n\r\n"
        assert not (head.chunked and head.content_length is not None)
        assert head.version in (0, 1)
        for name, value in head.headers:
            assert name and value == value.strip(b" \t")
            assert not any((c < 0x20 and c != 0x09) or c == 0x7F for c in name + value)
    return head


PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(st.binary(max_size=300))
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
@example(b"\r\n\r\n\r\n\r\n\r\n")
def test_random_bytes_only_raise_parse_error(buf: bytes) -> None:
    check_request_outcome(buf)
    check_request_outcome(buf, Limits(16, 64, 2))
    try:
        head = parse_response_head(buf, 128)
    except ParseError as e:
        assert e.status == 502
    else:
        assert head is None or head.raw_len <= len(buf)


@PROPERTY_SETTINGS
@given(mutated(valid_requests()))
def test_mutated_requests_only_raise_parse_error(buf: bytes) -> None:
    head = check_request_outcome(buf)
    if head is not None:
        # Whatever was accepted is also found, unchanged, when the bytes arrive one at a time.
        for k in range(head.raw_len):
            assert parse_request_head(buf[:k], LIMITS) is None
        assert check_request_outcome(buf[: head.raw_len]) is not None


@PROPERTY_SETTINGS
@given(valid_requests(), st.binary(max_size=20))
def test_valid_requests_parse_and_every_prefix_is_incomplete(buf: bytes, tail: bytes) -> None:
    head = req(buf + tail)
    assert head.raw_len == len(buf)
    for k in range(len(buf)):
        assert parse_request_head(buf[:k], LIMITS) is None


@PROPERTY_SETTINGS
@given(mutated(st.just(RESPONSE + b"hello")))
def test_mutated_responses_only_raise_parse_error(buf: bytes) -> None:
    try:
        head = parse_response_head(buf)
    except ParseError as e:
        assert e.status == 502
    else:
        assert head is None or 4 <= head.raw_len <= len(buf)


def chunked_outcome(data: bytes, cuts: list[int], kind: type = bytes) -> tuple[str, int]:
    tracker = ChunkedTracker(max_line=32)
    consumed = 0
    try:
        for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
            used = tracker.feed(kind(data[a:b]))
            assert 0 <= used <= b - a
            consumed += used
            if tracker.done:
                return "done", consumed
            assert used == b - a
    except ParseError as e:
        assert e.status == 400
        return "error", -1
    return "more", consumed


chunked_bodies = st.lists(
    st.tuples(st.binary(max_size=20), st.sampled_from([b"", b";a=1", b' ; q="x"'])), max_size=4
).map(
    lambda chunks: (
        b"".join(b"%x%s\r\n%s\r\n" % (len(d), e, d) for d, e in chunks if d) + b"0\r\n\r\n"
    )
)


@PROPERTY_SETTINGS
@given(
    st.one_of(st.binary(max_size=200), chunked_bodies, mutated(chunked_bodies)),
    st.lists(st.integers(1, 199), max_size=10),
    st.sampled_from([bytes, bytearray, memoryview]),
)
def test_chunked_outcome_does_not_depend_on_split_points(
    data: bytes, cut_points: list[int], kind: type
) -> None:
    cuts = sorted({c for c in cut_points if c < len(data)})
    whole = chunked_outcome(data, [])
    assert chunked_outcome(data, cuts, kind) == whole
    if len(data) <= 60:
        assert chunked_outcome(data, list(range(1, len(data)))) == whole


@PROPERTY_SETTINGS
@given(st.lists(st.binary(min_size=1, max_size=40), max_size=6), st.binary(max_size=10))
def test_chunked_decode_roundtrip(chunks: list[bytes], tail: bytes) -> None:
    data = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + CHUNKED_EOF
    pieces, used = ChunkedTracker().feed_decode(data + tail)
    assert used == len(data)
    assert b"".join(pieces) == b"".join(chunks)
