"""HPACK (RFC 7541) encoding of the header blocks the HTTP/2 front sends, without a dynamic
table: ``StaticEncoder``, which h2 uses in place of the hpack package's encoder.

Why: with the dynamic table, a field's encoding depends on every block the connection sent
before it, so each field of each response is searched in the table, maybe inserted, and its
value Huffman-coded in Python again: about a tenth of an HTTP/2 request's CPU (bench/H2.md).
Without it, a field's encoding is a function of the field alone, so it is made once and then
looked up (one dict lookup a field), shared by every connection. This is what nginx does
(literal fields without indexing, names from the static table); what it gives up is the few
bytes a repeated field costs after its first time on a connection, not correctness: an HPACK
decoder must accept any mix of representations.

The fields: an exact entry of the static table (``:status: 200``) as its index (6.1); else
the name as a static-table index or a literal, and the value as a literal (6.2.2, "without
indexing"), Huffman-coded when that is shorter (5.2); a field h2 hands over as never-indexed
(``hpack.NeverIndexedHeaderTuple``) as such (6.2.3, not cached). Each block the encoder
sends after the peer's SETTINGS_HEADER_TABLE_SIZE may have changed opens with a dynamic table
size update to 0 (6.3; always within the peer's limit, and what tells a decoder such as
nghttp2, which requires an update after lowering the setting, that nothing is indexed).

The decoding side stays the hpack package's (h2's inbound checks are kept).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from hpack import HeaderTuple
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

# name -> its first index in the static table (RFC 7541 Appendix A); (name, value) -> index.
_STATIC_NAMES: dict[bytes, int] = {}
_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
for _i, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _STATIC_NAMES.setdefault(_name, _i)
    if _value:
        _STATIC_FIELDS[(_name, _value)] = _i

_CODES: list[int] = list(REQUEST_CODES)
_LENGTHS: list[int] = list(REQUEST_CODES_LENGTH)

CACHE_MAX = 4096  # encoded fields kept (shared by every connection); emptied when full
CACHED_FIELD_MAX: Final = 512  # longer fields (say a large cookie) are encoded each time, not kept
_cache: dict[tuple[bytes, bytes], bytes] = {}

_SIZE_UPDATE_TO_0: Final = b"\x20"  # 001 prefix, size 0 (RFC 7541 6.3)


class StaticEncoder:
    """What h2 asks of an encoder: ``encode(headers) -> bytes`` and a ``header_table_size``
    it sets when the peer's SETTINGS_HEADER_TABLE_SIZE arrives."""

    __slots__ = ("_update",)

    def __init__(self) -> None:
        # The first block sets the table to 0, so that no peer assumes anything of it.
        self._update = True

    @property
    def header_table_size(self) -> int:
        return 0

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._update = True  # the next block says the table is 0 (within any new limit)

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        parts: list[bytes] = []
        if self._update:
            self._update = False
            parts.append(_SIZE_UPDATE_TO_0)
        cache = _cache
        for header in headers:
            name: bytes = header[0]
            value: bytes = header[1]
            if isinstance(header, HeaderTuple) and not header.indexable:
                parts.append(encode_field(name, value, True))
                continue
            key = (name, value)
            block = cache.get(key)
            if block is None:
                block = encode_field(name, value, False)
                if len(name) + len(value) <= CACHED_FIELD_MAX:
                    if len(cache) >= CACHE_MAX:
                        cache.clear()
                    cache[key] = block
            parts.append(block)
        return b"".join(parts)


def encode_field(name: bytes, value: bytes, never_indexed: bool) -> bytes:
    """One field's representation, with no dynamic table (see the module docstring)."""
    if not never_indexed:
        index = _STATIC_FIELDS.get((name, value), 0)
        if index:
            return encode_integer(index, 7, 0x80)
    flag = 0x10 if never_indexed else 0x00
    index = _STATIC_NAMES.get(name, 0)
    if index:
        return encode_integer(index, 4, flag) + encode_string(value)
    return bytes((flag,)) + encode_string(name) + encode_string(value)


def encode_integer(value: int, prefix: int, first: int) -> bytes:
    """``value`` with an N-bit prefix (RFC 7541 5.1); ``first`` holds the first byte's other
    bits."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_string(data: bytes) -> bytes:
    """A string literal (RFC 7541 5.2): Huffman-coded when shorter, else as it is."""
    coded = huffman_encode(data)
    if len(coded) < len(data):
        return encode_integer(len(coded), 7, 0x80) + coded
    return encode_integer(len(data), 7, 0x00) + data


def huffman_encode(data: bytes) -> bytes:
    """``data`` Huffman-coded (RFC 7541 Appendix B), padded with the EOS prefix's 1 bits."""
    out = bytearray()
    acc = 0
    bits = 0
    codes = _CODES
    lengths = _LENGTHS
    for byte in data:
        n = lengths[byte]
        acc = (acc << n) | codes[byte]
        bits += n
        while bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
        acc &= (1 << bits) - 1  # keep the pending bits only: acc stays under 2^38
    if bits:
        out.append(((acc << (8 - bits)) | ((1 << (8 - bits)) - 1)) & 0xFF)
    return bytes(out)
