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
from typing import Final

from ..core.bandwidth import ByteBucket

MIN_WAIT: Final = 0.002  # timer granularity: never wake more often than this


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
