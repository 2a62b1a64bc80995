"""The PROXY protocol header (wire.proxy_protocol): reading v1 and v2 (LOCAL, IPv6, AF_UNIX,
TLVs), refusing what is not one, never asking to take a byte past the header, and writing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lbproxy.wire import proxy_protocol as pp
from lbproxy.wire.proxy_protocol import MORE, ProxyProtocolError


def read(data: bytes, v1: bool = True, v2: bool = True) -> tuple[pp.ProxyHeader, bytes]:
    """What the listener does: the header's length, the header, and the bytes after it."""
    n = pp.header_length(data, v1, v2)
    assert n != MORE
    return pp.parse(data[:n]), data[n:]


def v2(cmd: int, fam: int, body: bytes) -> bytes:
    return pp.V2_SIGNATURE + bytes([0x20 | cmd, fam]) + len(body).to_bytes(2, "big") + body


def test_v1_tcp4() -> None:
    h, rest = read(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nGET / HTTP/1.1\r\n")
    assert (h.version, h.source, h.dest) == (1, ("192.0.2.7", 56324), ("198.51.100.1", 443))
    assert rest == b"GET / HTTP/1.1\r\n"


def test_v1_tcp6_and_unknown() -> None:
    h, _ = read(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n")
    assert h.source == ("2001:db8::1", 1) and h.dest == ("2001:db8::2", 65535)
    h, rest = read(b"PROXY UNKNOWN ffff:f...f:ffff 1 2\r\n\x16\x03")
    assert h.source is None and rest == b"\x16\x03"


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",  # a field missing
        b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n",  # family and address disagree
        b"PROXY TCP4 192.0.2.300 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n",  # a leading zero
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 2\r\n",
        b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\n",  # LF without CR
        b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n",  # two spaces
    ],
)
def test_v1_malformed(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        read(line)


def test_v1_over_107_bytes_refused_without_newline() -> None:
    longest = b"PROXY TCP6 " + b"f" * 90
    assert pp.header_length(longest) == MORE  # 101 bytes: may still end
    with pytest.raises(ProxyProtocolError, match="107"):
        pp.header_length(b"PROXY UNKNOWN " + b"x" * 100)
    # The newline is looked for within the first 107 bytes only.
    with pytest.raises(ProxyProtocolError):
        pp.header_length(b"PROXY UNKNOWN " + b"x" * 100 + b"\r\n")
    ok = b"PROXY UNKNOWN " + b"x" * 91 + b"\r\n"
    assert len(ok) == 107 and pp.header_length(ok) == 107


def test_v2_tcp4_with_tlvs_skipped() -> None:
    addr = bytes([192, 0, 2, 7, 198, 51, 100, 1]) + (56324).to_bytes(2, "big") + b"\x01\xbb"
    tlvs = b"\x04\x00\x03abc" + b"\x20\x00\x05\x01\x00\x00\x00\x00" + b"\xea\x00\x00"
    h, rest = read(v2(1, 0x11, addr + tlvs) + b"\x16\x03\x01")
    assert h.version == 2 and h.source == ("192.0.2.7", 56324) and h.dest == ("198.51.100.1", 443)
    assert h.tls and rest == b"\x16\x03\x01"


def test_v2_tcp6() -> None:
    src = bytes.fromhex("20010db8000000000000000000000001")
    dst = bytes.fromhex("20010db8000000000000000000000002")
    h, _ = read(v2(1, 0x21, src + dst + b"\x00\x50\x01\xbb"))
    assert h.source == ("2001:db8::1", 80) and h.dest == ("2001:db8::2", 443) and not h.tls


def test_v2_local_and_unix_carry_no_client() -> None:
    h, rest = read(v2(0, 0x00, b"") + b"GET")
    assert h.source is None and rest == b"GET"
    # LOCAL with an address block: the block is ignored.
    h, _ = read(v2(0, 0x11, bytes(12)))
    assert h.source is None
    h, _ = read(v2(1, 0x31, bytes(216)))  # AF_UNIX: treated like LOCAL
    assert h.source is None


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (v2(2, 0x11, bytes(12)), "command"),
        (pp.V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12), "version"),
        (v2(1, 0x41, bytes(12)), "family"),
        (v2(1, 0x11, bytes(8)), "shorter"),  # the address block cut
        (v2(1, 0x12, bytes(12)), "stream"),  # UDP
        (v2(1, 0x11, bytes(12) + b"\x04\x00"), "truncated TLV"),
        (v2(1, 0x11, bytes(12) + b"\x04\x00\x09ab"), "TLV longer"),
    ],
)
def test_v2_malformed(header: bytes, why: str) -> None:
    with pytest.raises(ProxyProtocolError, match=why):
        read(header)


def test_wrong_signature_and_versions_not_accepted() -> None:
    for junk in (b"GET / HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00", b"PROXX", b"\r\n\r\n\x00\r\nQUIX"):
        with pytest.raises(ProxyProtocolError):
            pp.header_length(junk)
    with pytest.raises(ProxyProtocolError, match="v2"):
        pp.header_length(b"PROXY TCP4 ", v1=False)
    with pytest.raises(ProxyProtocolError, match="v1"):
        pp.header_length(pp.V2_SIGNATURE, v2=False)


def test_truncated_asks_for_more() -> None:
    full = v2(1, 0x11, bytes(12))
    for n in range(len(full)):
        assert pp.header_length(full[:n]) == (MORE if n < 16 else 28)
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\r\n"
    for n in range(len(line)):
        assert pp.header_length(line[:n]) == MORE
    with pytest.raises(ProxyProtocolError):
        pp.parse(full[:20])  # a header cut short is refused, never read past


def test_v2_bad_fixed_bytes_fail_before_the_length_is_waited_for() -> None:
    # A bad version, command, family or protocol says so with the byte that carries it,
    # not after the (up to 64 KiB) its length field claims: the listener closes at once
    # instead of holding the socket until the header timeout.
    for bad, why in (
        (pp.V2_SIGNATURE + b"\x11", "version 1"),
        (pp.V2_SIGNATURE + b"\x22", "command 2"),
        (pp.V2_SIGNATURE + b"\x21\x41", "family or protocol 0x41"),
        (pp.V2_SIGNATURE + b"\x21\x13\xff\xff", "family or protocol 0x13"),
    ):
        with pytest.raises(ProxyProtocolError, match=why):
            pp.header_length(bad)
    assert pp.header_length(pp.V2_SIGNATURE + b"\x21\x11") == MORE


def test_build_and_read_back() -> None:
    for build in (pp.build_v1, pp.build_v2):
        h, _ = read(build(("192.0.2.7", 5000), ("198.51.100.1", 80)))
        assert h.source == ("192.0.2.7", 5000) and h.dest == ("198.51.100.1", 80)
        h, _ = read(build(("2001:db8::1", 5000), ("192.0.2.1", 80)))  # mixed: all IPv6
        assert h.source == ("2001:db8::1", 5000) and h.dest == ("::ffff:c000:201", 80)
        h, _ = read(build(("::ffff:192.0.2.7", 1), ("192.0.2.1", 2)))  # mapped: IPv4
        assert h.source == ("192.0.2.7", 1)
        h, _ = read(build(None, ("192.0.2.1", 2)))  # no client address: UNKNOWN / LOCAL
        assert h.source is None
    assert pp.build_v1(("192.0.2.7", 5), ("192.0.2.1", 6)) == (
        b"PROXY TCP4 192.0.2.7 192.0.2.1 5 6\r\n"
    )


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)),
    port,
    port,
    st.booleans(),
    st.binary(max_size=40),
)
def test_fuzz_round_trip(
    ips: tuple[str, str], sport: int, dport: int, use_v2: bool, after: bytes
) -> None:
    build = pp.build_v2 if use_v2 else pp.build_v1
    header = build((ips[0], sport), (ips[1], dport))
    h, rest = read(header + after)
    assert rest == after
    assert h.source is not None and h.dest is not None
    assert (h.source[1], h.dest[1]) == (sport, dport)
    # Fed in pieces, the length is MORE until the header is whole, never past it.
    for n in range(len(header)):
        got = pp.header_length(header[:n])
        assert got == MORE or (n >= 16 and got == len(header))


@settings(max_examples=2000, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=200).map(lambda b: pp.V2_SIGNATURE + b),
        st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    )
)
def test_fuzz_garbage_is_refused_or_read(data: bytes) -> None:
    """Any bytes: a clear ProxyProtocolError, MORE, or a header within the bytes given."""
    try:
        n = pp.header_length(data)
        if n == MORE:
            return
        if n > len(data):
            return  # a v2 header whose TLVs are still to come
        h = pp.parse(data[:n])
    except ProxyProtocolError:
        return
    assert h.version in (1, 2)
    if h.source is not None:
        assert 0 <= h.source[1] <= 65535
