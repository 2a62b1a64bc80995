"""The per-client limit decisions (issue 16) in memory, with the clock passed in: whose
address a request counts against, the token bucket with its exact Retry-After, the bounded
least-recently-seen table under 100,000 distinct addresses, and open-connection counts.
"""

from __future__ import annotations

import ipaddress

import pytest

from lbproxy.core.client_limits import (
    MAX_KEY,
    Cidrs,
    ConnectionCounts,
    RateTable,
    client_key,
    refill,
)

TRUSTED = Cidrs(
    (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("2001:db8:aa::/48"),
        ipaddress.ip_network("192.0.2.9/32"),
    )
)


# ------------------------------------------------------------------------------ client_key


def test_cidrs_match_v4_v6_and_v4_mapped_addresses():
    assert TRUSTED.matches("10.200.3.4") and TRUSTED.matches("192.0.2.9")
    assert not TRUSTED.matches("11.0.0.1") and not TRUSTED.matches("192.0.2.8")
    assert TRUSTED.matches("::1") and TRUSTED.matches("2001:db8:aa:ffff::1")
    assert not TRUSTED.matches("2001:db8:ab::1") and not TRUSTED.matches("::2")
    assert TRUSTED.matches("::ffff:10.1.2.3") and not TRUSTED.matches("::ffff:11.1.2.3")
    for junk in ("", "x", "10.0.0", "10.0.0.1.2", "010.0.0.1 ", "unknown", "10.0.0.1/8"):
        assert not TRUSTED.matches(junk)
    assert Cidrs(()).matches("10.0.0.1") is False
    assert Cidrs(TRUSTED.cidrs) == TRUSTED  # compared by its CIDRs (config reload changes)


def test_without_forwarded_hops_the_trusted_peer_is_the_client():
    assert client_key([], TRUSTED, "10.1.1.1") == "10.1.1.1"
    assert client_key([b" , "], TRUSTED, "10.1.1.1") == "10.1.1.1"


def test_behind_a_trusted_proxy_the_nearest_untrusted_hop_is_the_client():
    assert client_key([b"198.51.100.7"], TRUSTED, "10.1.1.1") == "198.51.100.7"
    # a client's invented hops sit left of the address its proxy appended
    assert client_key([b"1.1.1.1, 2.2.2.2, 198.51.100.7"], TRUSTED, "10.1.1.1") == "198.51.100.7"
    # a chain of trusted proxies is skipped, across several header fields
    assert client_key([b"6.6.6.6, 198.51.100.7", b"10.2.2.2 ,10.3.3.3"], TRUSTED, "::1") == (
        "198.51.100.7"
    )
    assert client_key([b"2001:db8::7"], TRUSTED, "10.1.1.1") == "2001:db8::7"
    # only trusted hops: the first is the client
    assert client_key([b"10.9.9.9, 10.2.2.2"], TRUSTED, "10.1.1.1") == "10.9.9.9"
    # junk is a key like any other, but a bounded one
    assert client_key([b"x" * 500], TRUSTED, "10.1.1.1") == "x" * MAX_KEY


# ------------------------------------------------------------------------------ the bucket


def test_burst_then_refused_with_the_exact_wait_and_refused_requests_take_nothing():
    t = RateTable()
    rate, burst = 2.0, 3  # a token every 0.5 s, three at once
    assert [t.take("a", 100.0, rate, burst, 16) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert t.take("a", 100.0, rate, burst, 16) == 0.5
    assert t.take("a", 100.0, rate, burst, 16) == 0.5  # the refusal took no token
    assert abs(t.take("a", 100.2, rate, burst, 16) - 0.3) < 1e-9  # 0.4 token there
    assert t.take("a", 100.5, rate, burst, 16) == 0.0  # one token back after 0.5 s
    assert t.take("a", 100.5, rate, burst, 16) == 0.5
    # a long quiet spell refills no more than burst
    assert [t.take("a", 1000.0, rate, burst, 16) for _ in range(4)] == [0.0, 0.0, 0.0, 0.5]
    # another client has its own bucket
    assert t.take("b", 1000.0, rate, burst, 16) == 0.0


def test_slow_rates_give_long_waits():
    t = RateTable()
    assert t.take("a", 0.0, 0.01, 1, 16) == 0.0
    assert t.take("a", 0.0, 0.01, 1, 16) == 100.0
    assert abs(t.take("a", 40.0, 0.01, 1, 16) - 60.0) < 1e-9


def test_the_clock_going_back_never_adds_tokens():
    t = RateTable()
    assert t.take("a", 10.0, 1.0, 1, 16) == 0.0
    assert t.take("a", 5.0, 1.0, 1, 16) == 1.0


def test_table_stays_bounded_under_100000_distinct_addresses_least_recently_seen_go():
    t = RateTable()
    size = 1000
    # a regular client that exhausted its bucket and keeps coming back stays remembered
    assert t.take("198.51.100.1", 0.0, 0.001, 1, size) == 0.0
    for i in range(100_000):
        key = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        assert t.take(key, 1.0, 0.001, 1, size) == 0.0  # every new address has a full bucket
        assert len(t) <= size
        if i % 500 == 0:
            assert t.take("198.51.100.1", 1.0, 0.001, 1, size) > 0  # still limited
    assert len(t) == size
    assert t.evicted == 100_001 - size
    assert "198.51.100.1" in t.buckets
    assert "10.0.0.0" not in t.buckets  # the oldest went first
    assert list(t.buckets)[-1] == "10.1.134.159"  # address 99,999: the newest stays
    # a smaller table_size after a reload trims on the next new client
    t.take("new", 2.0, 0.001, 1, 10)
    assert len(t) == 10


# ------------------------------------------------------------------------------ connections


def test_connection_counts_hold_only_open_clients():
    c = ConnectionCounts()
    assert c.acquire("a", 2) and c.acquire("a", 2)
    assert not c.acquire("a", 2)
    assert c.acquire("b", 2)
    assert c.open == {"a": 2, "b": 1}
    c.release("a")
    assert c.acquire("a", 2)
    c.release("a")
    c.release("a")
    c.release("b")
    assert c.open == {}


def test_cluster_scope_counts_what_each_client_took_for_the_batch() -> None:
    t = RateTable()
    assert t.take("a", 0.0, 10.0, 2, 100) == 0.0  # scope local: nothing counted
    assert t.used is None
    t.used = {}
    for _ in range(3):
        t.take("a", 0.0, 10.0, 2, 100)  # the third is refused: not counted
    t.take("b", 0.0, 10.0, 2, 100)
    assert t.batch() == {"a": 1, "b": 1}
    assert t.batch() == {}  # counting starts again


def test_reconcile_sets_the_local_bucket_to_the_fleets_minus_what_was_taken_since() -> None:
    t = RateTable()
    t.used = {}
    t.take("a", 0.0, 10.0, 20, 100)
    t.batch()  # sent; meanwhile two more are taken here
    t.take("a", 0.0, 10.0, 20, 100)
    t.take("a", 0.0, 10.0, 20, 100)
    # The fleet's bucket after the batch: 3 tokens (other instances took the rest).
    t.reconcile("a", 3.0, 0.0)
    assert t.take("a", 0.0, 10.0, 20, 100) == 0.0  # 3 - 2 = 1 token left
    assert t.take("a", 0.0, 10.0, 20, 100) > 0
    # A fleet in debt (other instances took more than the bucket held): refused here until
    # the debt is refilled at the rate.
    t.batch()
    t.reconcile("a", -5.0, 1.0)
    assert t.take("a", 1.0, 10.0, 20, 100) == pytest.approx((1.0 + 5.0) / 10.0)
    t.reconcile("unknown", 1.0, 1.0)  # a client forgotten here meanwhile: nothing to set


def test_refill_is_the_one_arithmetic_of_both_scopes() -> None:
    assert refill(1.0, 0.5, 10.0, 20) == 6.0
    assert refill(1.0, 10.0, 10.0, 20) == 20.0  # up to burst
    assert refill(-4.0, 0.0, 10.0, 20) == -4.0
    assert refill(-4.0, -1.0, 10.0, 20) == -4.0  # a clock step back adds nothing


def test_connection_counts_add_the_fleets() -> None:
    c = ConnectionCounts()
    c.fleet, c.changed = {"a": 2}, set()
    assert c.acquire("a", 3)
    assert not c.acquire("a", 3)  # 1 here + 2 elsewhere
    assert c.acquire("b", 3)
    c.release("b")
    assert c.changed == {"a", "b"}  # b's 0 is sent too, so the fleet forgets it
