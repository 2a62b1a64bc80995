"""On-the-fly gzip of a listener's responses (``gzip: true``), as nginx's gzip filter does.

Owns two things, both free of I/O:
- ``decide``: from the request head and the response head alone, whether a response is
  compressed (``GZIP``), passed as it is but marked ``Vary: Accept-Encoding`` because it
  would be compressed for another client (``VARY``), or passed untouched (``NONE``). Never
  touched: HEAD, 1xx/101, 204, 206, 304, a body-less response, WebSocket upgrades, ranges
  (Content-Range), a body the backend already encoded (Content-Encoding), ``Cache-Control:
  no-transform``, types outside the list, a Content-Length under ``gzip_min_length``.
  Compressed only when the client accepts gzip and speaks HTTP/1.1 or HTTP/2 (chunked framing
  or DATA frames; as nginx's ``gzip_http_version 1.1``).
- ``GzipStream``: takes the backend's body bytes as they arrive, framed as the backend framed
  them (Content-Length, chunked or until close), and gives the client's bytes: the payload
  compressed and sent as chunks (``framed``: an HTTP/1.1 client) or as it is (an HTTP/2
  stream frames it itself). Each arrival is compressed and flushed at once (a sync
  flush), so nothing waits for more input and memory stays one zlib stream, however large
  the body.
``rewrite_head`` gives the response head the client sees: Content-Encoding added,
Content-Length and Accept-Ranges gone, a strong ETag made weak, Vary extended.
"""

from __future__ import annotations

import zlib
from typing import Final

from ..config.model import Gzip
from ..wire.http1 import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_LENGTH,
    BODY_NONE,
    ChunkedTracker,
    RequestHead,
    ResponseHead,
)

NONE, VARY, GZIP = 0, 1, 2
LEVEL: Final = 1  # nginx's default gzip_comp_level: most of the saving for little CPU
_NEVER = frozenset({101, 204, 206, 304})
_LAST_CHUNK: Final = b"0\r\n\r\n"


def _values(fields: list[tuple[bytes, bytes]], lname: bytes) -> list[bytes]:
    return [v for n, v in fields if n.lower() == lname]


def accepts_gzip(req: RequestHead) -> bool:
    """Whether Accept-Encoding lets the response be gzip (``gzip`` or ``*``, q > 0)."""
    gzip_q: float | None = None
    star_q: float | None = None
    for value in _values(req.headers, b"accept-encoding"):
        for item in value.split(b","):
            coding, _, params = item.partition(b";")
            coding = coding.strip().lower()
            if coding not in (b"gzip", b"x-gzip", b"*"):
                continue
            q = 1.0
            for p in params.split(b";"):
                name, _, val = p.partition(b"=")
                if name.strip().lower() == b"q":
                    try:
                        q = float(val.strip())
                    except ValueError:
                        q = 0.0
            if coding == b"*":
                star_q = q
            else:
                gzip_q = q if gzip_q is None else max(gzip_q, q)
    if gzip_q is not None:
        return gzip_q > 0
    return star_q is not None and star_q > 0


def decide(cfg: Gzip, req: RequestHead, resp: ResponseHead, body: int) -> int:
    """NONE, VARY or GZIP for ``resp`` to ``req``; ``body``: its framing (http1.BODY_*)."""
    if body == BODY_NONE or req.method == b"HEAD" or req.upgrade is not None:
        return NONE
    if resp.status < 200 or resp.status in _NEVER:
        return NONE
    ctype = b""
    for name, value in resp.headers:
        lname = name.lower()
        if lname == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            return NONE  # the backend compressed it (or encoded it some other way)
        if lname == b"content-range":
            return NONE
        if lname == b"cache-control" and b"no-transform" in value.lower():
            return NONE
        if lname == b"content-type":
            ctype = value
    media = ctype.partition(b";")[0].strip().lower().decode("latin-1")
    if media not in cfg.types:
        return NONE
    length = resp.content_length
    if length is not None and (length < cfg.min_length or length == 0):
        return NONE
    if req.version >= 1 and accepts_gzip(req):
        return GZIP
    return VARY


def rewrite_head(resp: ResponseHead, verdict: int) -> ResponseHead:
    """The head the client sees for a VARY or GZIP verdict (``resp`` itself is unchanged).
    Its field lines are the backend's as received, less the hop-by-hop ones (the new head
    notes none), changed where the encoding needs it."""
    lines = [resp.lines[0]]
    hop = frozenset(resp.hop) if resp.hop else frozenset()
    vary_done = False
    for i, line in enumerate(resp.lines):
        if not i or i in hop:
            continue
        name, _, value = line.partition(b":")
        lname = name.lower()
        if lname == b"vary":
            tokens = {t.strip().lower() for t in value.split(b",")}
            vary_done = vary_done or b"*" in tokens or b"accept-encoding" in tokens
        if verdict == GZIP:
            if lname in (b"content-length", b"accept-ranges", b"content-encoding"):
                continue
            if lname == b"etag":
                value = value.strip()
                if not value.startswith(b"W/"):
                    line = name + b": W/" + value  # the bytes differ now: only weakly the same
        lines.append(line)
    if not vary_done:
        lines.append(b"Vary: Accept-Encoding")
    if verdict == GZIP:
        lines.append(b"Content-Encoding: gzip")
    return ResponseHead(
        version=resp.version,
        status=resp.status,
        reason=resp.reason,
        lines=lines,
        content_length=None if verdict == GZIP else resp.content_length,
        chunked=False if verdict == GZIP else resp.chunked,
        keep_alive=resp.keep_alive,
        connection=resp.connection,
        upgrade=resp.upgrade,
        raw_len=resp.raw_len,
    )


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data) if data else b""


class GzipStream:
    """One response body being compressed: backend bytes in, client bytes (chunked) out."""

    __slots__ = ("done", "framed", "kind", "remaining", "tracker", "z")

    def __init__(self, kind: int, length: int | None, framed: bool = True) -> None:
        self.z = zlib.compressobj(LEVEL, zlib.DEFLATED, 31)  # 31: gzip header and trailer
        self.framed = framed  # chunked framing around the output (False: the bytes alone)
        self.kind = kind
        self.remaining = length or 0
        self.tracker = ChunkedTracker() if kind == BODY_CHUNKED else None
        self.done = False

    def feed(self, data: bytes) -> tuple[bytes, bool, bool]:
        """Backend bytes -> (client bytes, the body is complete, no byte followed it).
        A chunked body the backend framed wrongly raises http1.ParseError."""
        clean = True
        if self.kind == BODY_LENGTH:
            n = self.remaining
            if len(data) > n:
                data, clean = data[:n], False
            self.remaining = n - len(data)
            self.done = self.remaining == 0
            compressed = self.z.compress(data)
        elif self.tracker is not None:
            pieces, used = self.tracker.feed_decode(data)
            clean = used == len(data)
            self.done = self.tracker.done
            compressed = b"".join([self.z.compress(p) for p in pieces])
        else:  # BODY_CLOSE: everything until the backend closes
            compressed = self.z.compress(data)
        if self.done:
            return self._last(compressed + self.z.flush(zlib.Z_FINISH)), True, clean
        out = compressed + self.z.flush(zlib.Z_SYNC_FLUSH)
        return (_chunk(out) if self.framed else out), False, clean

    def finish(self) -> bytes:
        """The end of a body framed by the backend's close: the last compressed bytes."""
        if self.done:
            return b""
        self.done = True
        return self._last(self.z.flush(zlib.Z_FINISH))

    def _last(self, data: bytes) -> bytes:
        return _chunk(data) + _LAST_CHUNK if self.framed else data


def start(cfg: Gzip, req: RequestHead, resp: ResponseHead, body: int, framed: bool = True) -> tuple[
    ResponseHead, GzipStream | None
]:  # fmt: skip
    """The head to send and, when compressing, the stream the body goes through (its output
    chunk-framed with ``framed``)."""
    verdict = decide(cfg, req, resp, body)
    if verdict == NONE:
        return resp, None
    head = rewrite_head(resp, verdict)
    if verdict == VARY:
        return head, None
    assert body in (BODY_LENGTH, BODY_CHUNKED, BODY_CLOSE)
    return head, GzipStream(body, resp.content_length, framed)
