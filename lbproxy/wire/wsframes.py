"""WebSocket frame headers (RFC 6455 5.2): reading them, and the close frames the proxy sends.

Owns the byte-level facts a frame-aware tunnel needs and nothing else: where a frame header
ends and how long its payload is, what a close frame's code is, and how to build a close
frame for either direction. It never touches a payload beyond the two code bytes of a close
frame: data payloads are not unmasked, copied or decompressed. Pure: no sockets, no loop.

Why headers only: a proxy that knows where frames begin can put a control frame between two
frames (never inside one, which would corrupt the stream) and can count messages and close
codes, while the bytes it forwards stay exactly the bytes it received.
"""

from __future__ import annotations

from typing import Final

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8

GOING_AWAY: Final = 1001
PROTOCOL_ERROR: Final = 1002
POLICY_VIOLATION: Final = 1008
MESSAGE_TOO_BIG: Final = 1009
SERVICE_RESTART: Final = 1012
# Close codes the proxy may choose for a drain (group ``drain_close_code``).
DRAIN_CODES: Final = (GOING_AWAY, SERVICE_RESTART)

# RSV1-3 of a header's first byte: set only by a negotiated extension (RSV1: a compressed
# message under permessage-deflate, RFC 7692), a protocol error otherwise (RFC 6455 5.2).
RSV_BITS: Final = 0x70

# The longest header: 2 bytes, an 8-byte extended length, a 4-byte masking key.
MAX_HEADER: Final = 14
# A fixed masking key for the close frames the proxy sends to servers: RFC 6455 asks for
# an unpredictable key to defeat cache poisoning by *scripts* choosing payloads; the proxy's
# own two-byte payload is not attacker-chosen.
_PROXY_MASK: Final = b"\x6c\x62\x70\x78"


class Header:
    """A parsed frame header (the payload is not looked at)."""

    __slots__ = ("fin", "length", "mask", "opcode", "size")

    def __init__(self, fin: bool, opcode: int, size: int, length: int, mask: bytes) -> None:
        self.fin = fin
        self.opcode = opcode
        self.size = size  # bytes of the header itself
        self.length = length  # bytes of payload that follow it
        self.mask = mask  # the 4-byte masking key, or b"" when unmasked


def header_size(first_two: bytes) -> int:
    """How many bytes the header starting with ``first_two`` (at least 2 bytes) occupies."""
    b1 = first_two[1]
    n = 2
    code = b1 & 0x7F
    if code == 126:
        n += 2
    elif code == 127:
        n += 8
    if b1 & 0x80:
        n += 4
    return n


def parse_header(buf: bytes) -> Header | None:
    """The header at the start of ``buf``, or None when ``buf`` does not hold all of it yet."""
    if len(buf) < 2:
        return None
    size = header_size(buf)
    if len(buf) < size:
        return None
    b0, b1 = buf[0], buf[1]
    code = b1 & 0x7F
    pos = 2
    if code == 126:
        length = int.from_bytes(buf[2:4], "big")
        pos = 4
    elif code == 127:
        length = int.from_bytes(buf[2:10], "big")
        pos = 10
    else:
        length = code
    mask = bytes(buf[pos : pos + 4]) if b1 & 0x80 else b""
    return Header(bool(b0 & 0x80), b0 & 0x0F, size, length, mask)


def close_code(first_two_payload: bytes, mask: bytes) -> int:
    """The status code of a close frame from its first two payload bytes (unmasked here)."""
    if mask:
        return ((first_two_payload[0] ^ mask[0]) << 8) | (first_two_payload[1] ^ mask[1])
    return (first_two_payload[0] << 8) | first_two_payload[1]


def close_frame(code: int, reason: str = "", *, masked: bool) -> bytes:
    """A whole close frame with ``code`` and a short UTF-8 ``reason``; ``masked`` toward a
    server (clients must mask, RFC 6455 5.3), unmasked toward a client."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123]
    if not masked:
        return bytes((0x80 | OP_CLOSE, len(payload))) + payload
    key = _PROXY_MASK
    body = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes((0x80 | OP_CLOSE, 0x80 | len(payload))) + key + body
