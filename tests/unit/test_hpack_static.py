"""wire.hpack_static: the HTTP/2 front's HPACK encoder without a dynamic table, checked
against the hpack package's decoder (the one h2 clients use) and RFC 7541's own examples."""

from __future__ import annotations

import random

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ResponseReceived
from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hpack.table import HeaderTable

from lbproxy.wire import hpack_static
from lbproxy.wire.hpack_static import (
    StaticEncoder,
    encode_field,
    encode_integer,
    huffman_encode,
)


def test_integers_as_rfc_7541_c_1() -> None:
    assert encode_integer(10, 5, 0) == bytes([0b01010])  # C.1.1
    assert encode_integer(1337, 5, 0) == bytes([0b11111, 0b10011010, 0b00001010])  # C.1.2
    assert encode_integer(42, 8, 0) == bytes([42])  # C.1.3
    assert encode_integer(31, 5, 0xE0) == bytes([0xFF, 0x00])  # the prefix full: one byte more


def test_huffman_as_rfc_7541_c_4() -> None:
    assert huffman_encode(b"www.example.com") == bytes.fromhex("f1e3c2e5f23a6ba0ab90f4ff")
    assert huffman_encode(b"no-cache") == bytes.fromhex("a8eb10649cbf")
    assert huffman_encode(b"custom-value") == bytes.fromhex("25a849e95bb8e8b4bf")
    assert huffman_encode(b"") == b""


def test_huffman_agrees_with_the_hpack_package_on_every_byte() -> None:
    reference = Encoder().huffman_coder
    rng = random.Random(7)
    samples = [bytes([b]) for b in range(256)] + [bytes(range(256))]
    samples += [rng.randbytes(rng.randrange(1, 300)) for _ in range(300)]
    for data in samples:
        assert huffman_encode(data) == reference.encode(data), data


def _decoded(block: bytes, decoder: Decoder | None = None) -> list[tuple[bytes, bytes]]:
    decoder = decoder if decoder is not None else Decoder()
    return [(bytes(n), bytes(v)) for n, v in decoder.decode(block, raw=True)]


def test_fields_decode_as_given_and_nothing_enters_the_decoders_table() -> None:
    fields = [
        (b":status", b"200"),  # an exact static entry: one byte
        (b":status", b"418"),  # a static name
        (b"content-type", b"text/plain"),
        (b"content-length", b"2"),
        (b"x-custom-name", b"custom value with spaces"),  # a literal name
        (b"set-cookie", b"\x80\xff binary-ish \x01"),  # not Huffman-shorter: raw
        (b"x-empty", b""),
        (b"x-long", b"a" * 5000),  # multi-byte lengths, not cached
    ]
    decoder = Decoder()
    decoder.max_header_list_size = 1 << 20
    enc = StaticEncoder()
    for _ in range(3):  # again from the cache
        assert _decoded(enc.encode(fields), decoder) == fields
    assert len(decoder.header_table.dynamic_entries) == 0
    assert decoder.header_table.maxsize == 0  # the first block set the table to 0
    assert encode_field(b":status", b"200", False) == b"\x88"


def test_a_never_indexed_field_stays_never_indexed() -> None:
    block = StaticEncoder().encode([NeverIndexedHeaderTuple(b"authorization", b"secret")])
    assert block[0] == 0x20  # the size update, then the field
    assert block[1] & 0xF0 == 0x10  # 6.2.3: literal never indexed
    (field,) = Decoder().decode(block, raw=True)
    assert isinstance(field, NeverIndexedHeaderTuple)


def test_a_table_size_setting_is_answered_by_an_update_to_0_in_the_next_block() -> None:
    enc = StaticEncoder()
    assert enc.encode([(b":status", b"200")]) == b"\x20\x88"
    assert enc.encode([(b":status", b"200")]) == b"\x88"
    enc.header_table_size = 256  # the peer's SETTINGS_HEADER_TABLE_SIZE
    assert enc.encode([(b":status", b"200")]) == b"\x20\x88"
    assert enc.header_table_size == 0
    decoder = Decoder()
    decoder.max_allowed_table_size = 0  # a peer that allows no table at all accepts it
    assert _decoded(b"\x20\x88", decoder) == [(b":status", b"200")]


def test_random_fields_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hpack_static, "CACHE_MAX", 16)  # the cache emptied and refilled too
    rng = random.Random(11)
    names = [n for n, _ in HeaderTable.STATIC_TABLE] + [b"x-a", b"x-request-id", b"via"]
    enc = StaticEncoder()
    decoder = Decoder()
    decoder.max_header_list_size = 1 << 20
    for _ in range(300):
        fields = []
        for _ in range(rng.randrange(1, 12)):
            name = rng.choice(names)
            value = bytes(
                rng.choice(b"abcxyz019 -_/;=,\t\x80\xfe") for _ in range(rng.randrange(40))
            )
            fields.append((name, value))
        assert _decoded(enc.encode(fields), decoder) == fields
    assert len(decoder.header_table.dynamic_entries) == 0


def test_h2_sends_its_headers_through_it() -> None:
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    server.encoder = StaticEncoder()  # type: ignore[assignment]
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":path", "/"), (":scheme", "https"),
                            (":authority", "a")], end_stream=True)  # fmt: skip
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    server.send_headers(1, [(b":status", b"200"), (b"content-type", b"text/plain")])
    events = client.receive_data(server.data_to_send())
    (resp,) = [e for e in events if isinstance(e, ResponseReceived)]
    assert resp.headers == [(b":status", b"200"), (b"content-type", b"text/plain")]
