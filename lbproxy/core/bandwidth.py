"""The byte bucket behind the listener bandwidth cap (``bandwidth``): pure arithmetic, the clock
passed in. Tokens are bytes, refilled at ``rate`` a second; every read spends its size, so the
bucket may go into debt by one read. The pausing and resuming of readers that this drives is
``proxy.shaping``.
"""

from __future__ import annotations

from typing import Final

BURST_SECONDS: Final = 0.05  # how much unused rate a quiet moment may save up
MIN_BURST: Final = 16384


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
