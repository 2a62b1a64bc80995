"""The HTTP/2 rapid-reset bucket refills at its documented rate (README: 100, refilled at 50
a second; ``h2_front.RAPID_RESET_BURST``/``RAPID_RESET_RATE``), over real TLS.

Time is measured by counts against bounds that load can only loosen: every batch of resets
is followed by PINGs, and their ACK (or a GOAWAY) says the proxy has read the whole batch,
so a batch was read between its send and that answer. Three clients:

- one that keeps to 40 resets a second after spending most of the burst is never cut (a
  bucket that does not refill, or refills slower than that, cuts it within a few steps);
- one that spends the burst, waits a second and then resets more than a second at 50 can
  have refilled is cut with GOAWAY ENHANCE_YOUR_CALM, and while it is not cut it has never
  reset more than 100 + 50 x (time since its first byte) streams (a faster refill breaks it);
- one that waits a second before its first reset still has only 100 (the bucket is capped).
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from hyperframe.frame import Frame, PingFrame, RstStreamFrame

from lbproxy.control.app import Proxy
from lbproxy.proxy.http2 import RAPID_RESET_BURST, RAPID_RESET_RATE
from tests.h2client import GoAwayFrame, RawH2
from tests.hardening import make_cert, openssl_available
from tests.integration.test_http2 import ENHANCE_YOUR_CALM, h2_doc

BURST = 100  # what README promises; the constants must agree with it
RATE = 50.0


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    openssl_available()
    return make_cert(str(tmp_path_factory.mktemp("h2rr")), "h2")


class Resetter:
    """A client that opens streams and resets them at once, a batch at a time."""

    def __init__(self, c: RawH2) -> None:
        self.c = c
        self.sent = 0  # streams reset so far
        self.pings = 0

    @classmethod
    async def connect(cls, proxy: Proxy, cafile: str) -> Resetter:
        addr = proxy.listeners.address("secure")
        return cls(await RawH2.connect(addr.host, addr.port, cafile))

    async def batch(self, n: int) -> Frame:
        """Open and reset ``n`` streams in one write, then a PING: the PING's ACK once the
        proxy has read them all, or the GOAWAY it sent instead."""
        frames: list[Frame] = []
        for _ in range(n):
            h = self.c.headers_frame("/whoami")
            r = RstStreamFrame(h.stream_id)
            r.error_code = 8  # CANCEL
            frames += [h, r]
        self.c.send(*frames)
        self.sent += n
        # h2 answers a PING as it parses it, before the proxy looks at the resets of the
        # same read: its ACK may come just before the GOAWAY. A second PING, sent once the
        # first is answered, is read later: everything the batch caused comes before its ACK.
        for _ in range(2):
            f = await self.ping()
            if not isinstance(f, PingFrame):
                return f
        return f

    async def ping(self) -> Frame:
        self.pings += 1
        ping = PingFrame(0)
        ping.opaque_data = self.pings.to_bytes(8, "big")
        self.c.send(ping)
        while True:
            f = await self.c.frame(timeout=15)
            assert f is not None, "closed without a GOAWAY"
            if isinstance(f, GoAwayFrame):
                return f
            if isinstance(f, PingFrame) and "ACK" in f.flags:
                assert f.opaque_data == ping.opaque_data
                return f


def test_the_constants_are_the_documented_ones() -> None:
    assert (RAPID_RESET_BURST, RAPID_RESET_RATE) == (BURST, RATE)


async def test_a_client_resetting_below_the_rate_is_never_cut(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    r = await Resetter.connect(proxy, cert[0])
    assert isinstance(await r.batch(BURST - 10), PingFrame)
    # 5 resets, then at least 0.1 s from the ACK (the proxy read the batch before it) to the
    # next batch: at least 5 tokens back at 50 a second before each batch is read. Load only
    # makes the gaps longer. Without a refill the 10 left would be gone by the third batch.
    for step in range(20):
        f = await r.batch(5)
        assert isinstance(f, PingFrame), (step, r.sent, f)
        await asyncio.sleep(0.1)
    assert r.sent == BURST - 10 + 100  # twice the burst in all
    sid = r.c.request("/whoami")
    head, body = await r.c.response(sid)
    assert (head[":status"], body) == ("200", b"A")
    assert proxy.registry.listeners["secure"].h2_rapid_resets == 0
    r.c.close()


async def test_a_client_resetting_faster_than_the_refill_is_cut(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    t0 = time.monotonic()  # before the connection: the bucket starts full at its accept
    r = await Resetter.connect(proxy, cert[0])

    def most() -> float:
        """The most resets a correct bucket can have allowed by now (load only adds)."""
        return BURST + RATE * (time.monotonic() - t0)

    f = await r.batch(BURST - 5)
    assert isinstance(f, PingFrame)
    for _ in range(8):
        await asyncio.sleep(1.0)  # ~50 tokens back; a bucket refilling faster gets more
        # 15 more than 50 a second can have given back by now. The batch is read a little
        # later (each 0.1 s of delay gives 5 tokens): a late read may survive, never a
        # refill faster than 65 a second (the proxy's own clock is never ahead of ours).
        f = await r.batch(math.ceil(most() - r.sent) + 15)
        if isinstance(f, GoAwayFrame):
            break
        assert r.sent <= most() + 1, f"{r.sent} resets allowed in {time.monotonic() - t0:.2f}s"
    assert isinstance(f, GoAwayFrame), "never cut"
    assert f.error_code == ENHANCE_YOUR_CALM
    while await r.c.frame() is not None:  # then the connection closes
        pass
    assert proxy.registry.listeners["secure"].h2_rapid_resets == 1


async def test_the_bucket_holds_no_more_than_the_burst(make_backend, make_proxy, cert):
    a = await make_backend("A")
    proxy = await make_proxy(h2_doc([a.address], cert))
    r = await Resetter.connect(proxy, cert[0])
    # One request first: the connection is up and idle for a second (50 tokens' worth).
    sid = r.c.request("/whoami")
    assert (await r.c.response(sid))[1] == b"A"
    await asyncio.sleep(1.0)
    f = await r.batch(BURST + 20)
    assert isinstance(f, GoAwayFrame)
    assert f.error_code == ENHANCE_YOUR_CALM
    assert proxy.registry.listeners["secure"].h2_rapid_resets == 1
