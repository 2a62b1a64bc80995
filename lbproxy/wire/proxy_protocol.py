"""The PROXY protocol header (HAProxy's spec, versions 1 and 2): reading one that a layer-4
balancer puts before a client's bytes, and writing one before a backend connection's.

Pure bytes, no sockets. Reading is in two steps, so the caller never takes a byte off the
socket that is not the header's (what follows, a TLS ClientHello or an HTTP request, must
stay for the front end): ``header_length`` says, of the bytes peeked so far, how long the
header is, or that every byte of them is still header (take them all and peek again), or
that they cannot start a header (``ProxyProtocolError``); ``parse`` then reads the header
taken. Version 1 is a text line of at most 107 bytes; version 2 a 16-byte fixed part and
its length of addresses and TLVs (type-length-value fields: skipped, bounds-checked; a
TLS one is reported). ``LOCAL`` (v2) and ``UNKNOWN`` (v1), and v2's AF_UNIX and AF_UNSPEC,
carry no client address: the connection's own address stands (the balancer's health checks).
"""

from __future__ import annotations

import ipaddress
from typing import Final

V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX: Final = b"PROXY "
V1_MAX: Final = 107  # the longest v1 line, CRLF included (the spec's bound)
V2_FIXED: Final = 16  # signature, version and command, family and protocol, length
MORE: Final = -1  # header_length: every byte given is header; peek again
PP2_TYPE_SSL: Final = 0x20  # the TLV a balancer that ended TLS may add (its client's TLS)


class ProxyProtocolError(ValueError):
    """Bytes that are not a PROXY protocol header (of the versions accepted)."""


class ProxyHeader:
    """A parsed header. ``source`` and ``dest`` are ``(ip, port)`` or None (``LOCAL``, v1
    ``UNKNOWN``, a v2 family without IP addresses): then the socket's own addresses stand."""

    __slots__ = ("dest", "source", "tls", "version")

    def __init__(
        self,
        version: int,
        source: tuple[str, int] | None,
        dest: tuple[str, int] | None,
        tls: bool = False,
    ) -> None:
        self.version = version
        self.source = source
        self.dest = dest
        self.tls = tls  # a v2 PP2_TYPE_SSL TLV said the client spoke TLS to the balancer

    def __repr__(self) -> str:
        return f"ProxyHeader(v{self.version}, {self.source}, {self.dest}, tls={self.tls})"


def header_length(data: bytes, v1: bool = True, v2: bool = True) -> int:
    """The length of the header at the start of ``data`` (a v2 header's may be more than
    ``data`` holds yet: all of ``data`` is then header), or ``MORE`` when all of ``data`` is
    the start of a header that goes on. Raises ProxyProtocolError when ``data`` cannot start
    a header of an accepted version."""
    if not data:
        return MORE
    if v2 and data[:12] == V2_SIGNATURE[: len(data)]:
        # Version, command, family and protocol checked as soon as they arrive: a bad one
        # fails now rather than after waiting for as many bytes as its length field says.
        _check_v2_fixed(data)
        if len(data) < V2_FIXED:
            return MORE
        return V2_FIXED + int.from_bytes(data[14:16], "big")
    if v1 and data[:6] == V1_PREFIX[: len(data)]:
        end = data.find(b"\n", 0, V1_MAX)
        if end >= 0:
            return end + 1
        if len(data) >= V1_MAX:
            raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return MORE
    wanted = " or ".join(n for n, on in (("v1", v1), ("v2", v2)) if on)
    raise ProxyProtocolError(f"no PROXY protocol {wanted} header")


def parse(header: bytes) -> ProxyHeader:
    """The header ``header`` (exactly ``header_length`` bytes) says; ProxyProtocolError if
    it is malformed."""
    if header.startswith(V2_SIGNATURE):
        return _parse_v2(header)
    if header.startswith(V1_PREFIX):
        return _parse_v1(header)
    raise ProxyProtocolError("no PROXY protocol header")


def _parse_v1(header: bytes) -> ProxyHeader:
    if len(header) > V1_MAX or not header.endswith(b"\r\n"):
        raise ProxyProtocolError("PROXY v1 line not ended by CRLF within 107 bytes")
    parts = header[:-2].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(1, None, None)  # the rest of the line is to be ignored
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyProtocolError("PROXY v1: expected 'PROXY TCP4|TCP6 src dst sport dport'")
    version = 4 if parts[1] == b"TCP4" else 6
    src = _v1_ip(parts[2], version)
    dst = _v1_ip(parts[3], version)
    return ProxyHeader(1, (src, _v1_port(parts[4])), (dst, _v1_port(parts[5])))


def _v1_ip(text: bytes, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyProtocolError(f"PROXY v1: bad address {text[:48]!r}") from None
    if ip.version != version:
        raise ProxyProtocolError(f"PROXY v1: {ip} is not an IPv{version} address")
    return str(ip)


def _v1_port(text: bytes) -> int:
    # The spec: decimal, no leading zero, 0..65535.
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[0] == 0x30):
        raise ProxyProtocolError(f"PROXY v1: bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"PROXY v1: bad port {port}")
    return port


_V2_ADDRESS_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX: the address block


def _parse_v2(header: bytes) -> ProxyHeader:
    if len(header) < V2_FIXED or len(header) != V2_FIXED + int.from_bytes(header[14:16], "big"):
        raise ProxyProtocolError("PROXY v2: length does not match")
    _check_v2_fixed(header)
    command = header[12] & 0xF
    family, transport = header[13] >> 4, header[13] & 0xF
    body = memoryview(header)[V2_FIXED:]
    size = _V2_ADDRESS_SIZES.get(family, 0)
    if len(body) < size:
        raise ProxyProtocolError("PROXY v2: address block shorter than its family's")
    tls = _tlvs(body[size:])
    if command == 0 or family in (0, 3):
        # LOCAL (the balancer's own connection, e.g. a health check), AF_UNSPEC or AF_UNIX:
        # no IP address of a client; the socket's own addresses stand.
        return ProxyHeader(2, None, None, tls)
    if transport != 1:
        raise ProxyProtocolError("PROXY v2: not a stream (TCP) connection")
    n = 4 if family == 1 else 16
    src = str(ipaddress.ip_address(bytes(body[:n])))
    dst = str(ipaddress.ip_address(bytes(body[n : 2 * n])))
    ports = body[2 * n : 2 * n + 4]
    sport = int.from_bytes(ports[:2], "big")
    dport = int.from_bytes(ports[2:], "big")
    return ProxyHeader(2, (src, sport), (dst, dport), tls)


def _check_v2_fixed(data: bytes) -> None:
    """The version-and-command and family-and-protocol bytes of a v2 header, those of them
    ``data`` holds (bytes 12 and 13)."""
    if len(data) > 12:
        ver_cmd = data[12]
        if ver_cmd >> 4 != 2:
            raise ProxyProtocolError(f"PROXY v2: unknown version {ver_cmd >> 4}")
        if ver_cmd & 0xF not in (0, 1):
            raise ProxyProtocolError(f"PROXY v2: unknown command {ver_cmd & 0xF}")
    if len(data) > 13:
        fam = data[13]
        if fam >> 4 > 3 or fam & 0xF > 2:
            raise ProxyProtocolError(f"PROXY v2: unknown address family or protocol 0x{fam:02x}")


def _tlvs(rest: memoryview) -> bool:
    """Walk the TLVs (each bounds-checked, their values skipped); True when a PP2_TYPE_SSL
    one says the client's connection to the balancer was TLS."""
    tls = False
    i = 0
    while i < len(rest):
        if len(rest) - i < 3:
            raise ProxyProtocolError("PROXY v2: truncated TLV")
        kind = rest[i]
        length = int.from_bytes(rest[i + 1 : i + 3], "big")
        if len(rest) - i - 3 < length:
            raise ProxyProtocolError("PROXY v2: TLV longer than the header")
        if kind == PP2_TYPE_SSL and length >= 1:
            tls = bool(rest[i + 3] & 0x01)  # PP2_CLIENT_SSL
        i += 3 + length
    return tls


# ----------------------------------------------------------------------------- writing


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _pair(
    source: tuple[str, int] | None, dest: tuple[str, int] | None
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] | None:
    """Both addresses of one family (an IPv4 one mapped into IPv6 when the other is IPv6),
    or None when either is not an IP address."""
    if source is None or dest is None:
        return None
    src, dst = _ip(source[0]), _ip(dest[0])
    if src is None or dst is None:
        return None
    if src.version != dst.version:
        src, dst = (
            ipaddress.IPv6Address(f"::ffff:{a}") if a.version == 4 else a for a in (src, dst)
        )
    return (src, dst)


def build_v1(source: tuple[str, int] | None, dest: tuple[str, int] | None) -> bytes:
    """A v1 line for a connection from ``source`` to ``dest``; ``PROXY UNKNOWN`` when either
    is not an IP address."""
    pair = _pair(source, dest)
    if pair is None or source is None or dest is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = pair
    family = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {family} {src} {dst} {source[1]} {dest[1]}\r\n".encode("ascii")


def build_v2(source: tuple[str, int] | None, dest: tuple[str, int] | None) -> bytes:
    """A v2 header for a connection from ``source`` to ``dest``; ``LOCAL`` when either is
    not an IP address."""
    pair = _pair(source, dest)
    if pair is None or source is None or dest is None:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    src, dst = pair
    fam = b"\x11" if src.version == 4 else b"\x21"
    body = src.packed + dst.packed + source[1].to_bytes(2, "big") + dest[1].to_bytes(2, "big")
    return V2_SIGNATURE + b"\x21" + fam + len(body).to_bytes(2, "big") + body
