"""Per-source handshake rate limiting under load."""

from __future__ import annotations

from meshnode.wg.ratelimit import BURST, RATE, RateLimiter, source_key


def test_burst_then_rate() -> None:
    r = RateLimiter()
    assert all(r.allow(b"k", 0.0) for _ in range(BURST))
    assert not r.allow(b"k", 0.0)
    assert r.allow(b"other", 0.0)  # buckets are per source
    assert r.allow(b"k", 1 / RATE)  # one token back after 1/RATE s
    assert not r.allow(b"k", 1 / RATE)


def test_bounded_and_collected() -> None:
    r = RateLimiter(max_sources=2)
    assert r.allow(b"a", 0.0) and r.allow(b"b", 0.0)
    assert not r.allow(b"c", 0.5)  # full and nobody idle: newcomers refused
    assert r.allow(b"c", 2.0)  # a and b idle for > 1 s were forgotten
    assert len(r) == 1


def test_source_keys() -> None:
    assert source_key("192.0.2.1") == bytes([192, 0, 2, 1])
    assert source_key("::ffff:192.0.2.1") == bytes([192, 0, 2, 1])
    assert source_key("2001:db8::1") == source_key("2001:db8::ffff") != source_key("2001:db9::1")
