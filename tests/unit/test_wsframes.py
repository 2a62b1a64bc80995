"""WebSocket frame headers (wsframes) and the frame-aware tunnel ends, in memory.

The tunnel's two ends are driven with in-memory transports: what they forward must be
byte-for-byte what they read, however the stream is cut into reads, and a close frame the
proxy injects must land exactly on a frame boundary.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

from lbproxy.config import AccessLog as AccessLogConfig
from lbproxy.config import Address, Server, WebSocketPolicy
from lbproxy.core.metrics import ListenerStats, Registry
from lbproxy.core.snapshot import ServerState
from lbproxy.proxy.access_log import AccessLog
from lbproxy.proxy.tunnel import Tunnel
from lbproxy.wire import wsframes


def frame(opcode: int, payload: bytes, *, fin: bool = True, mask: bool = False) -> bytes:
    """One frame as a client (mask=True) or a server would write it."""
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = bytes((b0, m | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, m | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def close(code: int, *, mask: bool) -> bytes:
    return frame(8, code.to_bytes(2, "big") + b"bye", mask=mask)


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.closed = False
        self.protocol: Any = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def resume_reading(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def make_tunnel(
    policy: WebSocketPolicy | None = None,
) -> tuple[Tunnel, FakeTransport, FakeTransport, ListenerStats]:
    loop = asyncio.get_running_loop()
    client, upstream = FakeTransport(), FakeTransport()
    reg = Registry()
    ls = reg.listener("web")
    ls.connections_active = 1
    server = ServerState("g/127.0.0.1:1", "g", Server(Address("127.0.0.1", 1)), reg)
    server.active = 1
    t = Tunnel(
        loop,
        client,
        upstream,
        listener=ls,
        group="g",
        server=server,
        idle_timeout=60.0,
        client_addr="127.0.0.1:2",
        method_path=("GET", "/ws"),
        access=AccessLog(AccessLogConfig(enabled=False)),
        policy=policy,
    )
    t.start(b"", b"", False)
    return t, client, upstream, ls


def feed(end: Any, data: bytes, cuts: list[int]) -> None:
    """Deliver ``data`` to ``end`` in reads cut at ``cuts``."""
    pos = 0
    for c in [*cuts, len(data)]:
        if c > pos:
            end.data_received(data[pos:c])
            pos = c


def client_stream() -> tuple[bytes, int]:
    """A client's stream: masked data messages (one fragmented, with a ping between the
    fragments), sizes across the 7/16/64-bit length forms; and its number of messages."""
    parts = [
        frame(1, b"hello", mask=True),
        frame(2, os.urandom(200), mask=True),  # 16-bit length
        frame(1, b"frag-1 ", fin=False, mask=True),
        frame(9, b"ping", mask=True),  # control frames may sit between fragments
        frame(0, b"frag-2 ", fin=False, mask=True),
        frame(0, b"frag-3", mask=True),
        frame(2, os.urandom(70000), mask=True),  # 64-bit length
        frame(1, b"", mask=True),
    ]
    return b"".join(parts), 5


# ------------------------------------------------------------------ pure header functions


def test_parse_header_every_length_form_and_mask() -> None:
    for n in (0, 125, 126, 65535, 65536):
        for mask in (False, True):
            f = frame(2, bytes(n), mask=mask)
            h = wsframes.parse_header(f)
            assert h is not None
            assert (h.fin, h.opcode, h.length, len(h.mask)) == (True, 2, n, 4 if mask else 0)
            assert h.size + n == len(f)
            assert wsframes.header_size(f[:2]) == h.size
            # Any shorter prefix of the header is "not yet".
            assert all(wsframes.parse_header(f[:k]) is None for k in range(h.size))


def test_close_frames_both_directions_carry_their_code() -> None:
    for code in (1001, 1012):
        for masked in (False, True):
            f = wsframes.close_frame(code, "drain", masked=masked)
            h = wsframes.parse_header(f)
            assert h is not None and h.opcode == 8 and h.fin and bool(h.mask) == masked
            payload = f[h.size :]
            assert len(payload) == h.length == 2 + len("drain")
            assert wsframes.close_code(payload[:2], h.mask) == code


# ------------------------------------------------------------------ the tunnel's ends


async def test_forwarded_bytes_are_the_bytes_read_however_the_reads_fall() -> None:
    data, messages = client_stream()
    rnd = random.Random(7)
    cut_sets = [[], list(range(1, 40)), sorted(rnd.sample(range(1, len(data)), 60))]
    cut_sets += [sorted(rnd.sample(range(1, len(data)), 8)) for _ in range(20)]
    for cuts in cut_sets:
        t, _, upstream, ls = make_tunnel()
        assert t.ends is not None
        feed(t.ends[0], data, cuts)
        assert bytes(upstream.data) == data
        assert t.messages() == (messages, 0)
        assert ls.ws_messages_in == messages
        t.close("client")


async def test_every_read_split_of_a_header_is_followed() -> None:
    data = frame(1, b"x" * 300, mask=True) + close(1000, mask=True)
    for cut in range(1, len(data)):
        t, _, upstream, ls = make_tunnel()
        assert t.ends is not None
        feed(t.ends[0], data, [cut])
        assert bytes(upstream.data) == data
        assert t.messages() == (1, 0)
        assert (t.close_side, t.close_code) == ("client", 1000)
        assert ls.ws_close_codes == {("client", "1000"): 1}
        t.close(None)


async def test_close_code_and_a_close_frame_without_one() -> None:
    t, _, _, ls = make_tunnel()
    assert t.ends is not None
    t.ends[1].data_received(frame(8, b""))  # the server's close without a code
    t.ends[0].data_received(close(1000, mask=True))
    assert ls.ws_close_codes == {("server", "none"): 1, ("client", "1000"): 1}
    assert (t.close_side, t.close_code) == ("server", None)
    t.close(None)
    assert t.reason == "server"


async def test_go_away_at_a_boundary_goes_out_at_once_both_ways() -> None:
    t, client, upstream, ls = make_tunnel()
    assert t.ends is not None
    t.ends[1].data_received(frame(1, b"hi"))
    t.go_away(1001, "drain")
    to_client = wsframes.close_frame(1001, masked=False)
    assert bytes(client.data) == frame(1, b"hi") + to_client
    h = wsframes.parse_header(bytes(upstream.data))
    assert h is not None and h.opcode == 8 and h.mask
    assert wsframes.close_code(bytes(upstream.data)[h.size : h.size + 2], h.mask) == 1001
    assert ls.ws_close_codes == {("proxy", "1001"): 1}
    # After its close, nothing more reaches a side: the server's next message is dropped,
    # and both answers to the proxy's close end the tunnel.
    t.ends[1].data_received(frame(1, b"late") + close(1001, mask=False))
    assert bytes(client.data) == frame(1, b"hi") + to_client
    assert not t.closed
    t.ends[0].data_received(close(1001, mask=True))
    assert t.closed and t.reason == "drain"
    assert client.closed and upstream.closed
    assert ls.ws_closes["drain"] == 1


async def test_go_away_mid_frame_waits_for_the_frame_in_flight() -> None:
    t, client, _, _ = make_tunnel()
    assert t.ends is not None
    big = frame(2, os.urandom(50000), fin=False)  # the first fragment of a large message
    rest = frame(0, os.urandom(1000))
    t.ends[1].data_received(big[:20000])
    t.go_away(1001, "drain")
    to_client = wsframes.close_frame(1001, masked=False)
    assert bytes(client.data) == big[:20000]  # not inside the frame
    # The rest of the frame and the start of the next arrive in one read: the close goes
    # exactly between them, and the next frame is not passed on.
    t.ends[1].data_received(big[20000:] + rest)
    assert bytes(client.data) == big + to_client
    assert t.messages() == (0, 1)
    t.close(None)


async def test_go_away_after_a_close_frame_passed_injects_nothing() -> None:
    t, client, upstream, ls = make_tunnel()
    assert t.ends is not None
    t.ends[0].data_received(close(1000, mask=True))
    before = bytes(client.data), bytes(upstream.data)
    t.go_away(1001, "shutdown")
    assert (bytes(client.data), bytes(upstream.data)) == before
    assert ls.ws_close_codes == {("client", "1000"): 1}
    t.close(None)
    assert t.reason == "shutdown"


# ------------------------------------------------------------------ message policies

BIG = WebSocketPolicy(max_message_size=1 << 20, messages_per_second=1e6, burst=1000)


async def test_a_policy_within_its_limits_changes_no_byte_however_the_reads_fall() -> None:
    data, messages = client_stream()
    rnd = random.Random(11)
    cut_sets = [
        list(range(1, 60)),
        *(sorted(rnd.sample(range(1, len(data)), 9)) for _ in range(20)),
    ]
    for cuts in cut_sets:
        t, _, upstream, _ = make_tunnel(BIG)
        assert t.ends is not None
        feed(t.ends[0], data, cuts)
        assert bytes(upstream.data) == data
        assert t.messages() == (messages, 0) and not t.ending
        t.close("client")


def refused(upstream: FakeTransport, before: bytes) -> None:
    """What reached the server: ``before``, then the proxy's masked 1001, nothing else."""
    got = bytes(upstream.data)
    assert got.startswith(before)
    rest = got[len(before) :]
    h = wsframes.parse_header(rest)
    assert h is not None and h.opcode == 8 and h.mask and len(rest) == h.size + h.length
    assert wsframes.close_code(rest[h.size : h.size + 2], h.mask) == 1001


async def test_a_message_over_max_message_size_is_refused_before_any_of_it_passes() -> None:
    policy = WebSocketPolicy(max_message_size=1000)
    ok = frame(1, b"x" * 1000, mask=True)
    big = frame(2, b"y" * 1001, mask=True)
    for cut in range(len(ok) + 1, len(ok) + 8):  # the big header split across two reads
        t, client, upstream, ls = make_tunnel(policy)
        assert t.ends is not None
        feed(t.ends[0], ok + big, [cut])
        refused(upstream, ok)
        assert bytes(client.data) == wsframes.close_frame(1009, masked=False)
        assert (t.ending, ls.ws_policy["max_message_size"]) == ("policy", 1)
        assert ls.ws_close_codes == {("proxy", "1009"): 1}
        t.close(None)
        assert t.reason == "policy" and ls.ws_closes["policy"] == 1


async def test_fragments_add_up_to_the_message_size() -> None:
    policy = WebSocketPolicy(max_message_size=1000)
    parts = [
        frame(1, b"a" * 400, fin=False, mask=True),
        frame(9, b"ping", mask=True),  # control frames do not count
        frame(0, b"b" * 400, fin=False, mask=True),
    ]
    t, client, upstream, _ = make_tunnel(policy)
    assert t.ends is not None
    t.ends[1].data_received(frame(1, b"s" * 300)[:100])  # the server is mid-frame
    feed(t.ends[0], b"".join(parts) + frame(0, b"c" * 201, mask=True), [])
    refused(upstream, b"".join(parts))
    # Toward the client the close waits for the end of the server's frame in flight.
    assert bytes(client.data) == frame(1, b"s" * 300)[:100]
    t.ends[1].data_received(frame(1, b"s" * 300)[100:] + frame(1, b"dropped"))
    assert bytes(client.data) == frame(1, b"s" * 300) + wsframes.close_frame(1009, masked=False)
    t.close(None)


async def test_messages_past_the_rate_and_burst_get_1008() -> None:
    policy = WebSocketPolicy(messages_per_second=1.0, burst=3)
    msgs = [frame(1, b"m%d" % i, mask=True) for i in range(4)]
    t, client, upstream, ls = make_tunnel(policy)
    assert t.ends is not None
    for m in msgs:
        t.ends[0].data_received(m)
    refused(upstream, b"".join(msgs[:3]))
    assert bytes(client.data) == wsframes.close_frame(1008, masked=False)
    assert ls.ws_policy == {"max_message_size": 0, "messages_per_second": 1, "extension": 0}
    t.close(None)


async def test_server_to_client_traffic_is_never_limited() -> None:
    policy = WebSocketPolicy(max_message_size=10, messages_per_second=1.0, burst=1)
    t, client, _, _ = make_tunnel(policy)
    assert t.ends is not None
    out = b"".join(frame(1, b"z" * 500) for _ in range(10))
    t.ends[1].data_received(out)
    assert bytes(client.data) == out and t.ending is None
    t.close(None)


def rsv1(f: bytes) -> bytes:
    """``f`` with RSV1 set: what permessage-deflate marks a compressed message with."""
    return bytes((f[0] | 0x40,)) + f[1:]


async def test_an_extension_frame_under_max_message_size_gets_1002_before_any_of_it_passes() -> (
    None
):
    """Under max_message_size no extension is negotiated: a frame with an RSV bit (a
    compressed one, whatever its length) is a protocol error, refused before it passes."""
    policy = WebSocketPolicy(max_message_size=1000)
    ok = frame(1, b"x" * 10, mask=True)
    for bad in (rsv1(frame(1, b"tiny", mask=True)), rsv1(frame(9, b"", mask=True))):
        for cut in (len(ok) + 1, len(ok) + 2):
            t, client, upstream, ls = make_tunnel(policy)
            assert t.ends is not None
            feed(t.ends[0], ok + bad + ok, [cut])
            refused(upstream, ok)
            assert bytes(client.data) == wsframes.close_frame(1002, masked=False)
            assert ls.ws_policy == {
                "max_message_size": 0,
                "messages_per_second": 0,
                "extension": 1,
            }
            assert ls.ws_close_codes == {("proxy", "1002"): 1}
            t.close(None)
            assert t.reason == "policy"


async def test_a_rate_only_policy_and_no_policy_pass_extension_frames() -> None:
    """Without max_message_size the extension is negotiated end to end: RSV1 frames pass."""
    data = rsv1(frame(1, b"deflated", mask=True)) + rsv1(frame(2, b"z" * 300, mask=True))
    for policy in (None, WebSocketPolicy(messages_per_second=1e6, burst=1000)):
        t, _, upstream, _ = make_tunnel(policy)
        assert t.ends is not None
        feed(t.ends[0], data, [3])
        assert bytes(upstream.data) == data and t.ending is None
        assert t.messages() == (2, 0)
        t.close("client")
