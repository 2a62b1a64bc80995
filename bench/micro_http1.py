"""Micro-benchmark of the head path: nanoseconds per head parse, per chunked feed, and per
head parsed and rewritten as the proxy forwards it (``headers.upstream_request_head``,
``headers.client_response_head``).

Not a test. Run: .venv/bin/python bench/micro_http1.py [--loops N]
"""

from __future__ import annotations

import argparse
import time
import timeit
from collections.abc import Callable

from lbproxy.wire.headers import client_response_head, upstream_request_head
from lbproxy.wire.http1 import ChunkedTracker, Limits, parse_request_head, parse_response_head

# CPU time of this process, not wall time: on a machine shared with other work, wall time
# counts the moments the process waits for a core.
CPU = time.process_time

WRK_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:5000\r\n\r\n"

BROWSER_REQUEST = (
    b"GET /api/rooms/general/messages?since=1700000000&limit=50 HTTP/1.1\r\n"
    b"Host: chat.example.com\r\n"
    b"Connection: keep-alive\r\n"
    b'sec-ch-ua: "Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"\r\n'
    b"sec-ch-ua-mobile: ?0\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/124.0.0.0 Safari/537.36\r\n"
    b'sec-ch-ua-platform: "Linux"\r\n'
    b"Accept: application/json, text/plain, */*\r\n"
    b"Sec-Fetch-Site: same-origin\r\n"
    b"Sec-Fetch-Mode: cors\r\n"
    b"Sec-Fetch-Dest: empty\r\n"
    b"Referer: https://chat.example.com/rooms/general\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Cookie: session=3f2a9c0d8e7b4a1f; theme=dark\r\n"
    b"\r\n"
)

BACKEND_RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: 27\r\n"
    b"Date: Tue, 21 Nov 2023 05:44:00 GMT\r\n"
    b"Server: Python/3.11 aiohttp/3.9.1\r\n"
    b"\r\n"
)

CHUNKED_BODY = b"1b\r\n" + b"x" * 27 + b"\r\n" + b"0\r\n\r\n"


def _noop() -> None:
    pass


def _feed_chunked() -> int:
    return ChunkedTracker().feed(CHUNKED_BODY)


def _forward_request(raw: bytes, limits: Limits) -> bytes:
    req = parse_request_head(raw, limits)
    assert req is not None
    return upstream_request_head(
        req,
        client_ip="203.0.113.7",
        scheme=b"http",
        forwarded=True,
        default_host=b"127.0.0.1:5001",
        upgrade=False,
    )


def _forward_response(raw: bytes) -> bytes:
    resp = parse_response_head(raw)
    assert resp is not None
    return client_response_head(resp, chunked=False, keep_alive=True, client_version=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--loops", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    limits = Limits()
    cases: list[tuple[str, Callable[[], object]]] = [
        (f"wrk request ({len(WRK_REQUEST)} B)", lambda: parse_request_head(WRK_REQUEST, limits)),
        (
            f"browser request ({len(BROWSER_REQUEST)} B, 14 headers)",
            lambda: parse_request_head(BROWSER_REQUEST, limits),
        ),
        (
            f"backend response ({len(BACKEND_RESPONSE)} B)",
            lambda: parse_response_head(BACKEND_RESPONSE),
        ),
        (f"chunked body, 1 chunk ({len(CHUNKED_BODY)} B)", _feed_chunked),
        ("wrk request, parsed + rewritten", lambda: _forward_request(WRK_REQUEST, limits)),
        ("browser request, parsed + rewritten", lambda: _forward_request(BROWSER_REQUEST, limits)),
        ("backend response, parsed + rewritten", lambda: _forward_response(BACKEND_RESPONSE)),
    ]
    # Calibration: how fast this machine runs Python, to compare figures across machines.
    calibration = (
        min(timeit.repeat(_noop, number=args.loops, repeat=args.repeat, timer=CPU)) / args.loops
    )
    print(f"{'calibration: empty Python function call':<44} {calibration * 1e9:8.0f} ns")
    for label, fn in cases:
        assert fn() is not None
        # The minimum over repeats is the figure least disturbed by other processes.
        best = min(timeit.repeat(fn, number=args.loops, repeat=args.repeat, timer=CPU)) / args.loops
        print(f"{label:<44} {best * 1e9:8.0f} ns")


if __name__ == "__main__":
    main()
