"""The listener bandwidth cap (``bandwidth``): reading pauses to keep a listener under it.

Owns one ``Shaper`` per listener and direction (bytes read from its clients; bytes read from
backends for its clients), a listener's two being its ``Bandwidth``. The accounting is a byte
bucket (``ByteBucket``, pure: the clock is passed in): every read spends its size, so the
bucket may go into debt by one read; a reader that finds it in debt pauses and queues. When
the debt is paid (a timer, one per shaper, never per connection) every queued reader
resumes, in the order they paused, and reads once more: each connection gets one read per
round, so a busy connection cannot starve the others, and over any few seconds the listener
moves ``rate`` bytes a second.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

BURST_SECONDS = 0.05  # how much unused rate a quiet moment may save up
MIN_BURST = 16384
MIN_WAIT = 0.002  # timer granularity: never wake more often than this


class ByteBucket:
    """Tokens are bytes, refilled at ``rate`` a second up to ``burst``; spending may go
    below zero (a read has already happened when it is counted)."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: int, now: float) -> None:
        self.rate = rate
        self.burst = max(MIN_BURST, int(rate * BURST_SECONDS))
        self.tokens = float(self.burst)
        self.stamp = now

    def set_rate(self, rate: int) -> None:
        self.rate = rate
        self.burst = max(MIN_BURST, int(rate * BURST_SECONDS))

    def refill(self, now: float) -> None:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
            self.stamp = now

    def spend(self, n: int, now: float) -> float:
        """Count ``n`` bytes read at ``now``: 0.0 while within the rate, else the seconds
        until the debt is paid."""
        self.refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def wait(self, now: float) -> float:
        self.refill(now)
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Shaper:
    """One direction of one listener: readers over the rate pause until a shared timer."""

    __slots__ = ("bucket", "loop", "timer", "waiting")

    def __init__(self, rate: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.bucket = ByteBucket(rate, self.loop.time())
        self.waiting: list[Callable[[], None]] = []
        self.timer: asyncio.TimerHandle | None = None

    def spend(self, n: int, resume: Callable[[], None]) -> bool:
        """``n`` bytes were just read; True: the reader must pause now, and ``resume`` is
        called when it may read again."""
        now = self.loop.time()
        wait = self.bucket.spend(n, now)
        if not wait:
            return False
        self.waiting.append(resume)
        if self.timer is None:
            self.timer = self.loop.call_at(now + max(wait, MIN_WAIT), self._wake)
        return True

    def _wake(self) -> None:
        self.timer = None
        now = self.loop.time()
        wait = self.bucket.wait(now)
        if wait:
            self.timer = self.loop.call_at(now + max(wait, MIN_WAIT), self._wake)
            return
        waiting, self.waiting = self.waiting, []
        for resume in waiting:
            resume()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.waiting = []


class Bandwidth:
    """A listener's two shapers: bytes read from its clients, and from backends for them."""

    __slots__ = ("inbound", "outbound")

    def __init__(self, rate: int) -> None:
        self.inbound = Shaper(rate)
        self.outbound = Shaper(rate)

    def set_rate(self, rate: int) -> None:
        self.inbound.bucket.set_rate(rate)
        self.outbound.bucket.set_rate(rate)

    def close(self) -> None:
        self.inbound.close()
        self.outbound.close()
