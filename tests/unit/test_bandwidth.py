"""The bandwidth cap's byte bucket (issue 16) with the clock passed in: debt of one read,
the exact wait until it is paid, a bounded saving-up while quiet, and a rate change."""

from __future__ import annotations

import pytest

from lbproxy.core.bandwidth import MIN_BURST, ByteBucket

MiB = 1 << 20


def test_reads_within_the_burst_go_then_debt_gives_the_exact_wait():
    b = ByteBucket(10 * MiB, now=0.0)
    assert b.burst == MiB // 2  # 50 ms of the rate
    assert b.spend(MiB // 2, 0.0) == 0.0
    assert b.spend(MiB, 0.0) == pytest.approx(0.1)  # 1 MiB in debt at 10 MiB/s
    assert b.wait(0.05) == pytest.approx(0.05)
    assert b.wait(0.1) == 0.0
    assert b.spend(1, 0.1) == pytest.approx(1 / (10 * MiB))


def test_a_quiet_spell_saves_up_no_more_than_the_burst():
    b = ByteBucket(10 * MiB, now=0.0)
    b.spend(MiB // 2, 0.0)
    assert b.wait(3600.0) == 0.0
    assert b.tokens == b.burst
    assert b.spend(b.burst + 10 * MiB, 3600.0) == pytest.approx(1.0)


def test_over_seconds_the_rate_holds_whatever_the_read_sizes():
    b = ByteBucket(4 * MiB, now=0.0)
    now, moved = 0.0, 0
    sizes = [65536, 262144, 1000, 200000, 7]
    i = 0
    while now < 10.0:
        n = sizes[i % len(sizes)]
        i += 1
        now += b.spend(n, now)  # a reader that waits exactly as told
        moved += n
    assert moved / now == pytest.approx(4 * MiB, rel=0.02)


def test_small_rates_keep_a_minimum_burst_and_a_rate_change_applies():
    b = ByteBucket(1024, now=0.0)
    assert b.burst == MIN_BURST
    b.spend(MIN_BURST + 1024, 0.0)
    assert b.wait(0.0) == pytest.approx(1.0)
    b.set_rate(2048)
    assert b.wait(0.0) == pytest.approx(0.5)
