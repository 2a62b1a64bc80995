"""CLB's optional forwarding headers (issue 16) in the request head a backend gets:
X-Forwarded-Proto on its own switch, X-Forwarded-Port, X-Forwarded-Client-Srcport, SLB-IP
and SLB-ID. A client's own values of the balancer-owned names never pass, on or off.
"""

from __future__ import annotations

from lbproxy.wire import headers
from lbproxy.wire.http1 import Limits, RequestHead, parse_request_head

SPOOF = (
    b"GET / HTTP/1.1\r\n"
    b"Host: h\r\n"
    b"X-Forwarded-Proto: https\r\n"
    b"X-Forwarded-Port: 1\r\n"
    b"x-forwarded-client-srcport: 2\r\n"
    b"SLB-IP: 6.6.6.6\r\n"
    b"slb-id: evil\r\n"
    b"X-Kept: k\r\n"
    b"SLB-ID: evil2\r\n"
    b"\r\n"
)


def request(raw: bytes) -> RequestHead:
    head = parse_request_head(raw, Limits())
    assert head is not None
    return head


def upstream(
    raw: bytes, *, forwarded: bool, proto: bool | None, extra: tuple[bytes, ...] = ()
) -> bytes:
    out = headers.upstream_request_head(
        request(raw),
        client_ip="203.0.113.7",
        scheme=b"https",
        forwarded=forwarded,
        default_host=b"10.0.0.5:80",
        upgrade=False,
        proto=proto,
        extra=extra,
    )
    request(out)  # a valid head
    return out


def test_forwarding_lines_each_only_when_on():
    assert headers.forwarding_lines(port=None, client_port=None, slb_ip=None, slb_id="") == ()
    assert headers.forwarding_lines(
        port=5000, client_port=54321, slb_ip="192.0.2.10", slb_id="lb-1"
    ) == (
        b"X-Forwarded-Port: 5000",
        b"X-Forwarded-Client-Srcport: 54321",
        b"SLB-IP: 192.0.2.10",
        b"SLB-ID: lb-1",
    )
    assert headers.forwarding_lines(port=None, client_port=7, slb_ip=None, slb_id="") == (
        b"X-Forwarded-Client-Srcport: 7",
    )


def test_every_option_on_replaces_every_client_value():
    extra = headers.forwarding_lines(port=443, client_port=40000, slb_ip="::1", slb_id="lb-1")
    out = upstream(SPOOF, forwarded=True, proto=True, extra=extra)
    assert out == (
        b"GET / HTTP/1.1\r\n"
        b"Host: h\r\n"
        b"X-Kept: k\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: h\r\n"
        b"X-Real-IP: 203.0.113.7\r\n"
        b"X-Forwarded-Port: 443\r\n"
        b"X-Forwarded-Client-Srcport: 40000\r\n"
        b"SLB-IP: ::1\r\n"
        b"SLB-ID: lb-1\r\n"
        b"\r\n"
    )


def test_balancer_owned_names_never_pass_even_when_off():
    out = upstream(SPOOF, forwarded=False, proto=None)
    # x_forwarded_for off (and x_forwarded_proto following it): the client's X-Forwarded-Proto
    # passes untouched, as before; the balancer-owned names are gone.
    assert out == (b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nX-Kept: k\r\n\r\n")


def test_x_forwarded_proto_has_its_own_switch():
    on_alone = upstream(SPOOF, forwarded=False, proto=True)
    assert on_alone == (
        b"GET / HTTP/1.1\r\nHost: h\r\nX-Kept: k\r\nX-Forwarded-Proto: https\r\n\r\n"
    )
    assert b"evil" not in on_alone and b"X-Forwarded-For" not in on_alone
    off_alone = upstream(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", forwarded=True, proto=False)
    assert off_alone == (
        b"GET / HTTP/1.1\r\n"
        b"Host: h\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Host: h\r\n"
        b"X-Real-IP: 203.0.113.7\r\n"
        b"\r\n"
    )
    # None follows x_forwarded_for
    assert b"X-Forwarded-Proto: https" in upstream(SPOOF.replace(b"https", b"ftp"), forwarded=True,
                                                   proto=None)  # fmt: skip
