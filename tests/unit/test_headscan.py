"""wire/_headscan.c, the compiled build's one-pass head scanner: whatever head it is given,
the parsers decide exactly as the Python path decides alone (same head, or same status and
reason), on valid, special and random or mutated heads; and a head the scanner finds unusual
(it answers None) is left to the Python path, never refused by it. The pure build has no
scanner: there the same C source is compiled by the test, and checked alike."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lbproxy import buildinfo
from lbproxy.wire import http1
from lbproxy.wire.http1 import Limits, ParseError, Scan, parse_request_head, parse_response_head
from tests.support import compile_c_extension, expected_build
from tests.unit.test_http1 import (
    BROWSER,
    PROPERTY_SETTINGS,
    RESPONSE,
    WRK,
    mutated,
    valid_requests,
)

FIELDS = ("method", "target", "host", "absolute", "expect_continue", "forwarded", "extensions")
FIELDS += ("host_line",)
COMMON = ("version", "lines", "content_length", "chunked", "keep_alive", "connection")
COMMON += ("upgrade", "raw_len", "hop")

SPECIAL_REQUESTS = [
    WRK,
    BROWSER,
    b"GET / HTTP/1.1\r\nhOsT:  a.example \t\r\nCONNECTION: keep-alive, Upgrade\r\n"
    b"Upgrade: websocket\r\nX-Forwarded-For: 1.2.3.4\r\nx-real-ip: 5.6.7.8\r\n"
    b"Keep-Alive: 5\r\nTE: trailers\r\nclose: x\r\nConnection: close\r\nSLB-IP: 1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"
    b"Connection: Upgrade\r\nUpgrade: websocket\r\nsec-websocket-EXTENSIONS: x\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc",
    b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET http://x.example/a HTTP/1.1\r\nHost: y\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nNo-Colon\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n: empty\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\x00\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: \x7f\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX: \x80\xff obs-text\r\n\r\n",
    b"GET / HTTP/1.1\r\nH\xe9: a\r\n\r\n",
    b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
    b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n",  # over the small line limit
    b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: 1\r\n" * 20 + b"\r\n",  # over the small count
]
SPECIAL_RESPONSES = [
    RESPONSE,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive, close\r\nclose: 1\r\nKeep-Alive: 5\r\n\r\n",
    b"HTTP/1.1 204\r\nHost: x\r\nX-Forwarded-For: y\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX : y\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: y\rz\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
]
SMALL = Limits(64, 512, 8)


def outcome(parse, *args):
    try:
        head = parse(*args)
    except ParseError as exc:
        return ("error", exc.status, exc.reason)
    if head is None:
        return None
    names = COMMON + (FIELDS if isinstance(head, http1.RequestHead) else ("status", "reason"))
    return {name: getattr(head, name) for name in names}


@functools.cache
def scanner() -> Scan:
    """The compiled build's scanner; in the pure build (which has none, by design) the same
    C source compiled here, so that both runs check it against the Python path."""
    if expected_build() != buildinfo.PURE:
        assert http1._scan is not None  # the compiled build loads it
        return http1._scan
    assert http1._scan is None  # the pure build takes the Python path
    module = compile_c_extension("_headscan", http1.__file__)
    module.configure(http1._SPECIAL)
    scan: Scan = module.scan
    return scan


def both_paths(monkeypatch: pytest.MonkeyPatch, parse, *args):
    with monkeypatch.context() as m:
        m.setattr(http1, "_scan", scanner())
        with_c = outcome(parse, *args)
        m.setattr(http1, "_scan", None)
        python = outcome(parse, *args)
    assert with_c == python, args[0]
    return with_c


@pytest.mark.parametrize("buf", SPECIAL_REQUESTS)
def test_requests_decide_alike(monkeypatch: pytest.MonkeyPatch, buf: bytes) -> None:
    both_paths(monkeypatch, parse_request_head, buf, http1.Limits())
    both_paths(monkeypatch, parse_request_head, buf, SMALL)


@pytest.mark.parametrize("buf", SPECIAL_RESPONSES)
def test_responses_decide_alike(monkeypatch: pytest.MonkeyPatch, buf: bytes) -> None:
    both_paths(monkeypatch, parse_response_head, buf)


def test_the_scanner_splits_and_finds_the_special_fields() -> None:
    scan = scanner()
    head = b"GET / HTTP/1.1\r\nhost:  a \r\nAccept: */*\r\nCONNECTION:close\t"
    assert scan(bytearray(b"xx" + head + b"\r\n\r\n"), 2, 2 + len(head)) == scan(head, 0, len(head))
    assert scan(head, 0, len(head)) == (
        [b"GET / HTTP/1.1", b"host:  a ", b"Accept: */*", b"CONNECTION:close\t"],
        [(http1._K_HOST, 1, b"a"), (http1._K_CONNECTION, 3, b"close")],
    )
    for unusual in (b"GET / HTTP/1.1\r\n folded: x", b"GET / HTTP/1.1\r\nX : y", b"A\rB",
                    b"A\nB", b"A\r\nB", b"A\r\n: v", b"A\x00", b"A\r\n"):  # fmt: skip
        assert scan(unusual, 0, len(unusual)) is None, unusual
    with pytest.raises(ValueError):
        scan(head, 5, len(head) + 1)


@PROPERTY_SETTINGS
@given(
    st.one_of(
        valid_requests(), mutated(valid_requests()), mutated(st.sampled_from(SPECIAL_REQUESTS))
    )
)
def test_random_requests_decide_alike(buf: bytes) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        both_paths(monkeypatch, parse_request_head, buf, http1.Limits())
        both_paths(monkeypatch, parse_request_head, buf, SMALL)


@PROPERTY_SETTINGS
@given(st.one_of(st.binary(max_size=200), mutated(st.sampled_from(SPECIAL_RESPONSES))))
def test_random_responses_decide_alike(buf: bytes) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch:
        both_paths(monkeypatch, parse_response_head, buf)
        both_paths(monkeypatch, parse_response_head, buf, 128)
