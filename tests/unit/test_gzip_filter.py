"""The gzip decision and the streaming compressor (issue 16), in memory: every skip rule on
real parsed heads, Accept-Encoding with q-values, the rewritten response head, and a body
compressed chunk by chunk whatever the backend's framing, each piece decodable at once.
"""

from __future__ import annotations

import zlib

import pytest

from lbproxy.config import GZIP_TYPES, Gzip
from lbproxy.proxy import gzip_filter as gz
from lbproxy.wire.headers import client_response_head
from lbproxy.wire.http1 import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    ChunkedTracker,
    Limits,
    ParseError,
    parse_request_head,
    parse_response_head,
    request_body_kind,
    response_body_kind,
)

CFG = Gzip(GZIP_TYPES | {"text/csv"}, 1024)


def req(extra: bytes = b"Accept-Encoding: gzip, deflate, br\r\n", method: bytes = b"GET",
        version: bytes = b"1.1"):  # fmt: skip
    raw = method + b" / HTTP/" + version + b"\r\nHost: h\r\n" + extra + b"\r\n"
    head = parse_request_head(raw, Limits())
    assert head is not None
    assert request_body_kind(head) == BODY_NONE
    return head


def resp(fields: bytes = b"Content-Type: text/html; charset=utf-8\r\nContent-Length: 5000\r\n",
         status: bytes = b"200 OK"):  # fmt: skip
    head = parse_response_head(b"HTTP/1.1 " + status + b"\r\n" + fields + b"\r\n")
    assert head is not None
    return head


def verdict(request=None, response=None) -> int:
    request = request or req()
    response = response or resp()
    return gz.decide(CFG, request, response, response_body_kind(request.method, response))


# ------------------------------------------------------------------------------ the decision


def test_text_with_gzip_accepted_is_compressed():
    assert verdict() == gz.GZIP
    for ctype in [*sorted(GZIP_TYPES), "text/csv", "TEXT/HTML", "application/json;x=1"]:
        r = resp(b"Content-Type: " + ctype.encode() + b"\r\nContent-Length: 2000\r\n")
        assert verdict(response=r) == gz.GZIP, ctype
    chunked = resp(b"Content-Type: text/plain\r\nTransfer-Encoding: chunked\r\n")
    assert verdict(response=chunked) == gz.GZIP  # any size: the length is unknown
    close = resp(b"Content-Type: text/plain\r\n")
    assert verdict(response=close) == gz.GZIP
    assert verdict(response=resp(status=b"404 Not Found")) == gz.GZIP


@pytest.mark.parametrize(
    ("request_", "response", "expected"),
    [
        # never touched
        (req(method=b"HEAD"), None, gz.NONE),
        (None, resp(status=b"204 No Content"), gz.NONE),
        (None, resp(b"Content-Type: text/html\r\n", b"304 Not Modified"), gz.NONE),
        (None, resp(status=b"206 Partial Content"), gz.NONE),
        (
            None,
            resp(
                b"Content-Type: text/html\r\nContent-Length: 5000\r\n"
                b"Content-Range: bytes 0-4999/9000\r\n"
            ),
            gz.NONE,
        ),
        (
            None,
            resp(b"Content-Type: text/html\r\nContent-Length: 5000\r\nContent-Encoding: gzip\r\n"),
            gz.NONE,
        ),
        (
            None,
            resp(b"Content-Type: text/html\r\nContent-Length: 5000\r\nContent-Encoding: br\r\n"),
            gz.NONE,
        ),
        (
            None,
            resp(
                b"Content-Type: text/html\r\nContent-Length: 5000\r\n"
                b"Cache-Control: public, No-Transform\r\n"
            ),
            gz.NONE,
        ),
        (None, resp(b"Content-Type: image/png\r\nContent-Length: 5000\r\n"), gz.NONE),
        (None, resp(b"Content-Length: 5000\r\n"), gz.NONE),  # no type
        (None, resp(b"Content-Type: text/html\r\nContent-Length: 1023\r\n"), gz.NONE),
        (None, resp(b"Content-Type: text/html\r\nContent-Length: 0\r\n"), gz.NONE),
        (
            req(b"Connection: Upgrade\r\nUpgrade: websocket\r\nAccept-Encoding: gzip\r\n"),
            resp(status=b"400 Bad Request"),
            gz.NONE,
        ),
        # would be compressed for another client: Vary only
        (req(b""), None, gz.VARY),
        (req(b"Accept-Encoding: deflate, br\r\n"), None, gz.VARY),
        (req(b"Accept-Encoding: gzip;q=0, *\r\n"), None, gz.VARY),
        (req(version=b"1.0"), None, gz.VARY),
        # exactly the minimum length is compressed; identity is no encoding
        (None, resp(b"Content-Type: text/html\r\nContent-Length: 1024\r\n"), gz.GZIP),
        (
            None,
            resp(
                b"Content-Type: text/html\r\nContent-Length: 5000\r\nContent-Encoding: identity\r\n"
            ),
            gz.GZIP,
        ),
    ],
)
def test_skip_rules(request_, response, expected):
    assert verdict(request_, response) == expected


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"gzip", True),
        (b"GZIP", True),
        (b"x-gzip", True),
        (b"deflate, gzip;q=0.5", True),
        (b"gzip; q=0", False),
        (b"gzip;q=0.000", False),
        (b"*", True),
        (b"*;q=0", False),
        (b"gzip;q=0, *;q=1", False),
        (b"identity", False),
        (b"br, deflate", False),
        (b"gzip;q=junk", False),
    ],
)
def test_accept_encoding(value, ok):
    assert gz.accepts_gzip(req(b"Accept-Encoding: " + value + b"\r\n")) is ok


def test_two_accept_encoding_fields_count_together():
    assert gz.accepts_gzip(req(b"Accept-Encoding: br\r\nAccept-Encoding: gzip\r\n"))


# ------------------------------------------------------------------------------ the head


def test_compressed_head():
    r = resp(
        b'Content-Type: text/html\r\nContent-Length: 5000\r\nETag: "v1"\r\n'
        b"Accept-Ranges: bytes\r\nVary: Cookie\r\nX-App: 1\r\n"
    )
    out = gz.rewrite_head(r, gz.GZIP)
    assert out.headers == [
        (b"Content-Type", b"text/html"),
        (b"ETag", b'W/"v1"'),
        (b"Vary", b"Cookie"),
        (b"X-App", b"1"),
        (b"Vary", b"Accept-Encoding"),
        (b"Content-Encoding", b"gzip"),
    ]
    assert out.content_length is None and not out.chunked
    assert r.content_length == 5000 and len(r.headers) == 6  # the original is unchanged


def test_vary_head_and_an_existing_vary_is_not_repeated():
    r = resp(b'Content-Type: text/html\r\nContent-Length: 5000\r\nETag: W/"v"\r\n')
    out = gz.rewrite_head(r, gz.VARY)
    assert out.headers == [*r.headers, (b"Vary", b"Accept-Encoding")]
    assert out.content_length == 5000
    already = resp(b"Content-Type: text/html\r\nVary: Cookie, accept-encoding\r\n")
    assert gz.rewrite_head(already, gz.GZIP).headers == [
        (b"Content-Type", b"text/html"),
        (b"Vary", b"Cookie, accept-encoding"),
        (b"Content-Encoding", b"gzip"),
    ]
    star = resp(b'Content-Type: text/html\r\nVary: *\r\nETag: W/"x"\r\n')
    assert gz.rewrite_head(star, gz.GZIP).headers[:3] == star.headers


def test_rewritten_head_goes_out_without_the_hop_by_hop_lines_as_received():
    # The client head is built from the field lines as the backend wrote them: the rewritten
    # head keeps their spelling and leaves out every hop-by-hop line (and a Content-Length
    # that chunked overrides), as the unrewritten one would.
    r = resp(
        b"Content-Type:text/html\r\nKeep-Alive: timeout=5\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\nContent-Length: 10\r\nX-App:  1 \r\n"
    )
    for verdict_, encoding in ((gz.GZIP, [b"Content-Encoding: gzip"]), (gz.VARY, [])):
        out = client_response_head(
            gz.rewrite_head(r, verdict_), chunked=True, keep_alive=True, client_version=1
        )
        assert out.split(b"\r\n")[1:-2] == [
            b"Content-Type:text/html",
            b"X-App:  1 ",
            b"Vary: Accept-Encoding",
            *encoding,
            b"Transfer-Encoding: chunked",
        ]


# ------------------------------------------------------------------------------ the stream

TEXT = b"".join(b"line %d of a chat page, some <b>html</b> and words\n" % i for i in range(1000))


def dechunk(data: bytes) -> tuple[bytes, bool]:
    """The payload of client-side chunked bytes, and whether the last chunk came."""
    t = ChunkedTracker()
    pieces, used = t.feed_decode(data)
    assert used == len(data)
    return b"".join(pieces), t.done


def chunked(payload: bytes, size: int) -> bytes:
    out = b"".join(
        b"%x\r\n%s\r\n" % (len(payload[i : i + size]), payload[i : i + size])
        for i in range(0, len(payload), size)
    )
    return out + b"0\r\nX-Trailer: t\r\n\r\n"


def pieces_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("split", [13, 997, 4096, 1 << 20])
@pytest.mark.parametrize("kind", [BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE])
def test_every_framing_compressed_piece_by_piece(kind, split):
    source = chunked(TEXT, 3000) if kind == BODY_CHUNKED else TEXT
    stream = gz.GzipStream(kind, len(TEXT) if kind == BODY_LENGTH else None)
    d = zlib.decompressobj(31)
    out = bytearray()
    fed = 0
    done = False
    for piece in pieces_of(source, split):
        client, done, clean = stream.feed(piece)
        assert clean
        payload, last = dechunk(client) if client else (b"", False)
        out += d.decompress(payload)
        fed += len(piece)
        if kind == BODY_LENGTH:
            # sync flush: everything fed so far is decodable already, nothing held back
            assert bytes(out) == TEXT[:fed]
        assert last == done
    if kind == BODY_CLOSE:
        assert not done
        payload, last = dechunk(stream.finish())
        out += d.decompress(payload)
        assert last
    assert done or kind == BODY_CLOSE
    assert bytes(out) == TEXT and d.eof
    assert stream.finish() == b""


def test_bytes_after_the_body_are_not_clean():
    stream = gz.GzipStream(BODY_LENGTH, 10)
    client, done, clean = stream.feed(b"0123456789EXTRA")
    assert done and not clean
    payload, last = dechunk(client)
    assert last and zlib.decompress(payload, 31) == b"0123456789"
    stream = gz.GzipStream(BODY_CHUNKED, None)
    client, done, clean = stream.feed(b"3\r\nabc\r\n0\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert done and not clean
    assert zlib.decompress(dechunk(client)[0], 31) == b"abc"


def test_bad_chunked_framing_raises():
    stream = gz.GzipStream(BODY_CHUNKED, None)
    with pytest.raises(ParseError):
        stream.feed(b"zz\r\nabc\r\n")


def test_start_gives_the_head_and_stream():
    head, stream = gz.start(CFG, req(), resp(), BODY_LENGTH)
    assert stream is not None and (b"Content-Encoding", b"gzip") in head.headers
    head, stream = gz.start(CFG, req(b""), resp(), BODY_LENGTH)
    assert stream is None and head.headers[-1] == (b"Vary", b"Accept-Encoding")
    original = resp(b"Content-Type: image/png\r\nContent-Length: 5000\r\n")
    head, stream = gz.start(CFG, req(), original, BODY_LENGTH)
    assert stream is None and head is original


@pytest.mark.parametrize("kind", [BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE])
def test_unframed_output_is_the_gzip_bytes_alone(kind):
    """For an HTTP/2 stream (``framed=False``): no chunk framing, DATA frames carry it."""
    source = chunked(TEXT, 3000) if kind == BODY_CHUNKED else TEXT
    head, stream = gz.start(CFG, req(), resp(), kind, framed=False)
    assert stream is not None and (b"Content-Encoding", b"gzip") in head.headers
    stream = gz.GzipStream(kind, len(TEXT) if kind == BODY_LENGTH else None, framed=False)
    out = bytearray()
    for piece in pieces_of(source, 4096):
        client, _, clean = stream.feed(piece)
        assert clean
        out += client
    out += stream.finish()
    assert zlib.decompress(bytes(out), 31) == TEXT  # would fail on any chunk-size line
