"""Property-based fuzzing of a live proxy (issue 9): random and mutated requests.

Hypothesis builds valid requests (methods, versions, fields, bodies framed by Content-Length
or chunked, pipelined in batches) and mutates them: bytes inserted (CR, LF, NUL, spaces,
colons, digits), deleted or replaced, header lines duplicated, framing fields added, huge
values and too many fields; some examples are plain random bytes. Each batch goes to the
proxy on a fresh connection, split into a few writes, and the client then half-closes.

For every example:
- no hang: the proxy answers and closes within a bound;
- every answer is a well-formed HTTP response (``http1.parse_response_head``), framed by its
  Content-Length, the error (if any) last, and nothing after the last one; then a clean close;
- no smuggling: the backend, a raw server reading with the strict parser, can frame every
  byte it was sent, and answered exactly as many requests as the client got 200s;
and throughout, a well-behaved client on another listener of the same proxy keeps getting 200s
(again between every few examples), and no callback of the event loop raised.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any

import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbproxy.control.app import Proxy
from lbproxy.wire.http1 import ParseError, parse_response_head
from tests.hardening import RecordingBackend, raw_config
from tests.support import start_proxy, wait_for

EXAMPLES = 1000
# Seconds: no answer-and-close may take longer. The proxy's timeouts are 1-2 s; the rest is room
# for a loaded machine (a hang guard, not a latency figure).
ANSWER_BOUND = 2.0 + 8
# The bystander's hang guard, and every how many examples it must have been answered again.
BYSTANDER_BOUND = 10.0
BYSTANDER_EVERY = 10
PROXY_STATUSES = {400, 408, 413, 414, 431, 501, 502, 503, 504, 505}

TOKEN = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
tokens = st.binary(min_size=1, max_size=10).map(lambda b: bytes(TOKEN[c % len(TOKEN)] for c in b))
values = st.binary(max_size=24).map(lambda b: bytes(0x21 + c % 0x5E for c in b))
paths = st.binary(max_size=16).map(lambda b: b"/" + bytes(0x21 + c % 0x5E for c in b))


@st.composite
def valid_request(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    target = draw(st.one_of(paths, paths.map(lambda p: b"http://fuzz.example" + p)))
    lines = [method + b" " + target + b" " + version, b"Host: fuzz.example"]
    lines += [n + b": " + v for n, v in draw(st.lists(st.tuples(tokens, values), max_size=5))]
    connection = draw(st.sampled_from([None, b"keep-alive", b"close"]))
    if connection:
        lines.append(b"Connection: " + connection)
    framing = draw(st.sampled_from(["none", "length", "chunked"]))
    body = b""
    if framing == "length":
        payload = draw(st.binary(max_size=40))
        lines.append(b"Content-Length: %d" % len(payload))
        body = payload
    elif framing == "chunked" and version == b"HTTP/1.1":
        lines.append(b"Transfer-Encoding: chunked")
        for chunk in draw(st.lists(st.binary(min_size=1, max_size=20), max_size=3)):
            body += b"%x\r\n%s\r\n" % (len(chunk), chunk)
        body += b"0\r\n\r\n"
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


NASTY = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b",", b"0", b"9", b"\x7f", b"\xff"]
FRAMING = [
    b"Content-Length: 5\r\n",
    b"Content-Length: 0\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b" folded\r\n",
    b"Host: other.example\r\n",
    b"Expect: 100-continue\r\n",
    b"Connection: upgrade\r\nUpgrade: websocket\r\n",
]


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(
            st.sampled_from(["insert", "delete", "replace", "duplicate", "framing", "huge", "many"])
        )
        pos = draw(st.integers(0, len(buf)))
        if op == "insert":
            buf[pos:pos] = draw(st.sampled_from(NASTY))
        elif op == "delete":
            del buf[pos : pos + draw(st.integers(1, 4))]
        elif op == "replace" and pos < len(buf):
            buf[pos : pos + 1] = draw(st.sampled_from(NASTY))
        elif op == "duplicate":
            lines = bytes(buf).split(b"\r\n")
            i = draw(st.integers(0, len(lines) - 1))
            lines.insert(i, lines[i])
            buf = bytearray(b"\r\n".join(lines))
        elif op == "framing":
            at = buf.find(b"\r\n") + 2 if b"\r\n" in buf else 0
            buf[at:at] = draw(st.sampled_from(FRAMING))
        elif op == "huge":
            at = buf.find(b"\r\n") + 2 if b"\r\n" in buf else 0
            size = draw(st.sampled_from([9000, 33000, 70000]))
            buf[at:at] = b"X-Huge: " + b"h" * size + b"\r\n"
        else:  # many fields
            at = buf.find(b"\r\n") + 2 if b"\r\n" in buf else 0
            buf[at:at] = b"".join(b"X-%d: v\r\n" % i for i in range(draw(st.integers(90, 130))))
    return bytes(buf)


maybe_mutated = valid_request().flatmap(
    lambda r: st.one_of(st.just(r), mutated(r), mutated(r), mutated(r))
)
batches = st.one_of(
    st.lists(maybe_mutated, min_size=1, max_size=3).map(b"".join),
    st.binary(min_size=1, max_size=200),
)


def split_points(data: bytes) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(data)), max_size=2).map(sorted)


def parse_answers(raw: bytes) -> list[int]:
    """Statuses of the responses in ``raw``; fails unless they are all well-formed and
    framed, with nothing left over."""
    statuses: list[int] = []
    buf = raw
    while buf:
        try:
            head = parse_response_head(buf)
        except ParseError as exc:
            raise AssertionError(f"malformed response ({exc}): {buf[:300]!r}") from None
        assert head is not None, f"incomplete response head: {buf[:300]!r}"
        assert head.content_length is not None and not head.chunked, buf[: head.raw_len]
        end = head.raw_len + head.content_length
        assert len(buf) >= end, f"response body cut short: {buf[:300]!r}"
        statuses.append(head.status)
        buf = buf[end:]
    return statuses


class Fuzz:
    """The proxy in front of a recording backend, and a well-behaved client meanwhile."""

    def __init__(self) -> None:
        self.backend = RecordingBackend()
        self.calm = RecordingBackend()  # the well-behaved client's (its own listener)
        self.proxy: Proxy | None = None
        self.crashes: list[dict[str, Any]] = []
        self.bystander_ok = 0
        self.bystander_seen = 0  # bystander_ok at the last look
        self.bystander_failures: list[str] = []
        self.bystander_task: asyncio.Task[None] | None = None
        self.examples = 0

    async def start(self) -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: self.crashes.append(ctx))
        await self.backend.start()
        await self.calm.start()
        doc = raw_config(
            [self.backend.address],
            listener={"client_header_timeout": "1s", "idle_timeout": "1s", "request_timeout": "2s"},
        )
        # The well-behaved client has a listener of its own, with the default timeouts: on a
        # loaded machine this whole process may stall for a second, and the fuzz listener's
        # 1 s idle timeout would then rightly close the bystander's keep-alive connection. It
        # is the same proxy, loop and code; what it proves is that the fuzz does not stop them.
        doc["listeners"].append({"name": "calm", "bind": "127.0.0.1:0", "server_group": "calm"})
        doc["server_groups"]["calm"] = {
            "servers": [self.calm.address],
            "health_check": {"enabled": False},
        }
        self.proxy = await start_proxy(doc)
        self.bystander_task = asyncio.get_running_loop().create_task(self._bystander())

    async def _bystander(self) -> None:
        a = self.proxy.listeners.address("calm")  # type: ignore[union-attr]
        reader, writer = await asyncio.open_connection(a.host, a.port)
        while True:
            started = time.monotonic()
            try:
                writer.write(b"GET /bystander HTTP/1.1\r\nHost: well.behaved\r\n\r\n")
                async with asyncio.timeout(BYSTANDER_BOUND):
                    head = await reader.readuntil(b"\r\n\r\n")
                    body = await reader.readexactly(2)
                if head.startswith(b"HTTP/1.1 200 OK\r\n") and body == b"ok":
                    self.bystander_ok += 1
                else:
                    self.bystander_failures.append(repr(head + body))
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.bystander_failures.append(f"{exc!r} after {time.monotonic() - started:.2f}s")
                writer.close()
                reader, writer = await asyncio.open_connection(a.host, a.port)
            await asyncio.sleep(0.005)

    async def example(self, data: bytes, cuts: list[int]) -> None:
        self.examples += 1
        a = self.proxy.listeners.address("web")  # type: ignore[union-attr]
        answered_before = self.backend.answered
        reader, writer = await asyncio.open_connection(a.host, a.port)
        started = time.monotonic()
        raw = b""
        try:
            last = 0
            for cut in [*cuts, len(data)]:
                writer.write(data[last:cut])
                last = cut
                await asyncio.sleep(0)
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(ANSWER_BOUND):
                while chunk := await reader.read(65536):
                    raw += chunk
        except TimeoutError:
            raise AssertionError(
                f"no answer and close within {ANSWER_BOUND}s: {data[:300]!r}"
            ) from None
        except ConnectionResetError:
            raise AssertionError(f"reset instead of a clean close, after {raw[:200]!r}") from None
        finally:
            writer.close()
        elapsed = time.monotonic() - started
        statuses = parse_answers(raw)
        assert all(s == 200 or s in PROXY_STATUSES for s in statuses), statuses
        assert all(s == 200 for s in statuses[:-1]), f"an answer after an error: {statuses}"
        # Every request the backend answered came back as one 200, and no other 200 came.
        assert self.backend.answered - answered_before == statuses.count(200), (statuses, data)
        assert self.backend.errors == [], self.backend.errors
        assert elapsed < ANSWER_BOUND
        if self.examples % BYSTANDER_EVERY == 0:
            # The well-behaved client is served all along: answered again since the last
            # look (an event, not a rate; the bound is a hang guard).
            await wait_for(
                lambda: self.bystander_ok > self.bystander_seen,
                BYSTANDER_BOUND,
                "the bystander to be answered during the fuzz",
            )
            self.bystander_seen = self.bystander_ok

    async def stop(self) -> None:
        if self.bystander_task is not None:
            self.bystander_task.cancel()
            await asyncio.gather(self.bystander_task, return_exceptions=True)
        if self.proxy is not None:
            await self.proxy.close(timeout=0.5)
        await self.backend.stop()
        await self.calm.stop()


def test_random_and_mutated_requests_never_crash_hang_or_smuggle() -> None:
    # The proxy's loop runs for the whole test in its own thread, while Hypothesis builds the
    # examples in this one: run_until_complete per example would freeze the loop between
    # examples, and on a loaded machine the bystander's request (or its keep-alive) could
    # outlast a 1-2 s timeout of the proxy's in a freeze, as if the proxy had failed it.
    loop = uvloop.new_event_loop()
    runner = threading.Thread(target=loop.run_forever, name="fuzz-loop", daemon=True)
    runner.start()

    def run(coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, loop).result()

    fuzz = Fuzz()
    try:
        run(fuzz.start())

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(st.data())
        def check(data: st.DataObject) -> None:
            payload = data.draw(batches, label="bytes")
            cuts = data.draw(split_points(payload), label="write boundaries")
            run(fuzz.example(payload, cuts))

        check()
        assert fuzz.crashes == []
        assert fuzz.bystander_failures == []
        # The well-behaved client was served all along: between every BYSTANDER_EVERY examples
        # (checked in example()).
        assert fuzz.examples >= BYSTANDER_EVERY
        assert fuzz.bystander_ok >= fuzz.examples // BYSTANDER_EVERY, fuzz.bystander_ok
    finally:
        run(fuzz.stop())
        loop.call_soon_threadsafe(loop.stop)
        runner.join()
        loop.close()
