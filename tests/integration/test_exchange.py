"""An exchange driven by a front end that is not an HTTP/1.1 client connection (as an HTTP/2
stream will be): it sees only the ``Downstream`` interface, never a client transport, and the
request still reaches a real backend and its answer comes back, framed for that front end."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json

from lbproxy.control.app import Proxy
from lbproxy.proxy.dispatch import Dispatch
from lbproxy.proxy.exchange import Exchange
from lbproxy.proxy.response import Response
from lbproxy.wire.http1 import BODY_CHUNKED, BODY_LENGTH, ResponseHead, parse_request_head
from tests.support import config_doc, wait_for


class RecordingDownstream:
    """A front end with no socket: records what the exchange asks of it."""

    client_ip = "127.0.0.9"
    client_addr = "127.0.0.9:5555"
    chunked_ok = False  # like an HTTP/2 stream: the body's payload, never its chunked framing
    protocol = "HTTP/2"
    cert_headers: tuple[bytes, ...] = ()  # no client certificate
    slot = None  # no per-client limits
    shapers = None  # no bandwidth cap
    write_paused = False

    def __init__(self) -> None:
        self.last = 0.0
        self.status = 0
        self.kind = -1
        self.extra: tuple[bytes, ...] = ()
        self.body = bytearray()
        self.errors: list[int] = []
        self.ended = asyncio.Event()
        self.paused = 0
        self.wakes: list[float] = []

    def send_head(
        self, resp: ResponseHead, extra: tuple[bytes, ...], kind: int, ended: bool
    ) -> int:
        self.status, self.kind, self.extra = resp.status, kind, extra
        return 0

    def write(self, data: bytes) -> None:
        self.body += data

    def flush(self) -> None:
        pass

    def end(self) -> None:
        self.ended.set()

    def send_error(self, status: int, reason: str, extra: tuple[tuple[str, str], ...]) -> int:
        self.errors.append(status)
        self.ended.set()
        return 0

    def cut(self) -> None:
        raise AssertionError("cut")

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None:
        self.paused -= 1

    def wake_at(self, when: float) -> None:
        self.wakes.append(when)

    def upgrade(self, head: bytes) -> tuple[asyncio.Transport, bytes]:
        raise AssertionError("upgrade")

    def local_host(self) -> bytes:
        return b"127.0.0.1"

    def forwarding_lines(self, fwd: object) -> tuple[bytes, ...]:
        return ()


def exchange(proxy: Proxy, head: bytes) -> tuple[Exchange, RecordingDownstream]:
    lr = proxy.listeners.handles["web"].runtime
    req = parse_request_head(bytearray(head), lr.limits)
    assert req is not None
    down = RecordingDownstream()
    ex = Exchange(proxy.ctx, lr, req, down, asyncio.get_running_loop())
    assert ex.begin()
    return ex, down


async def test_an_exchange_without_a_client_transport_relays_a_decoded_body(
    make_backend, make_proxy
):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    ex, down = exchange(proxy, b"GET /download/200000?chunked=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    ex.send()
    await asyncio.wait_for(down.ended.wait(), 10)
    assert (down.status, down.kind, down.errors) == (200, BODY_CHUNKED, [])
    expected = (bytes(range(256)) * 256 * 4)[:200000]
    assert bytes(down.body) == expected  # the payload, not chunk-size lines
    assert down.wakes and down.paused == 0
    (server,) = proxy.snapshot.groups["rs1"].servers
    assert server.active == 0 and len(server.pool.idle) == 1  # released, kept for reuse
    stats = proxy.registry.listeners["web"]
    assert stats.requests[("rs1", a.address, "200")] == 1


async def test_an_exchange_takes_its_body_in_pieces_and_forwards_it(make_backend, make_proxy):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    body = bytes(range(256)) * 1000
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    ex, down = exchange(proxy, head)
    ex.send()
    for i in range(0, len(body), 10000):
        assert ex.request_data(body[i : i + 10000]) == b""
        await asyncio.sleep(0)
    assert ex.req_done
    await asyncio.wait_for(down.ended.wait(), 10)
    assert (down.status, down.kind) == (200, BODY_LENGTH)
    answer = json.loads(bytes(down.body))
    assert answer["bytes"] == len(body)
    assert answer["sha256"] == hashlib.sha256(body).hexdigest()
    req = a.requests[-1]
    assert req[2]["X-Forwarded-For"] == "127.0.0.9"  # the front end's client, not a socket's


async def test_an_exchange_with_no_server_answers_503_through_its_front_end(
    make_backend, make_proxy
):
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    await a.stop()
    (server,) = proxy.snapshot.groups["rs1"].servers
    await wait_for(lambda: not server.health.available, what="the server to be seen down")
    ex, down = exchange(proxy, b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
    ex.send()
    await asyncio.wait_for(down.ended.wait(), 10)
    assert down.errors == [503] and ex.done


async def test_a_finished_exchange_is_freed_without_the_cycle_collector(make_backend, make_proxy):
    """Nothing in an exchange points back at it: once its front end lets go, reference
    counting frees it (no per-request garbage left for the cycle collector)."""
    a = await make_backend("A")
    proxy = await make_proxy(config_doc([a.address]))
    gc.collect()
    gc.disable()
    try:
        for _ in range(3):
            ex, down = exchange(proxy, b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
            ex.send()
            await asyncio.wait_for(down.ended.wait(), 10)
            assert bytes(down.body) == b"A"
            del ex, down
        await asyncio.sleep(0)
        assert not [o for o in gc.get_objects() if isinstance(o, (Exchange, Dispatch, Response))]
    finally:
        gc.enable()
