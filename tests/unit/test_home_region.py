"""The home relay region chosen by latency, with hysteresis and a minimum dwell, time passed in."""

from __future__ import annotations

from meshnode.paths.home import HomeRegion


def test_no_measurement_homes_on_the_first_region_of_the_map() -> None:
    h = HomeRegion()
    assert h.choose([900, 901], now=0) == 900
    assert h.choose([], now=1) is None


def test_the_fastest_region_wins_over_the_first() -> None:
    h = HomeRegion()
    h.measured({900: 40.0, 901: 5.0}, now=0)
    assert h.choose([900, 901], now=0) == 901


def test_hysteresis_keeps_the_home_unless_another_is_a_third_faster() -> None:
    h = HomeRegion(min_dwell=0)
    h.measured({900: 10.0, 901: 30.0}, now=0)
    assert h.choose([900, 901], now=0) == 900
    h.measured({900: 10.0, 901: 8.0}, now=100)   # faster, but not by a third
    assert h.choose([900, 901], now=100) == 900
    h.measured({900: 10.0, 901: 6.0}, now=200)   # a third faster: move
    assert h.choose([900, 901], now=200) == 901


def test_minimum_dwell_after_a_move() -> None:
    h = HomeRegion(min_dwell=300)
    h.measured({900: 10.0, 901: 50.0}, now=0)
    assert h.choose([900, 901], now=0) == 900
    h.measured({900: 50.0, 901: 10.0}, now=10)    # a move is allowed: 900 has been home since 0...
    assert h.choose([900, 901], now=10) == 900    # ...but only after the dwell
    assert h.choose([900, 901], now=299) == 900
    assert h.choose([900, 901], now=301) == 901
    h.measured({900: 5.0, 901: 10.0}, now=320)    # flapping back is held by the dwell too
    assert h.choose([900, 901], now=320) == 901
    assert h.choose([900, 901], now=602) == 900


def test_a_home_that_stops_answering_is_left_at_once() -> None:
    h = HomeRegion(min_dwell=300)
    h.measured({900: 10.0, 901: 50.0}, now=0)
    assert h.choose([900, 901], now=0) == 900
    h.measured({901: 50.0}, now=5)
    assert h.choose([900, 901], now=5) == 901


def test_udp_blocked_or_stale_keeps_the_home() -> None:
    h = HomeRegion(min_dwell=0, stale_after=600)
    h.measured({901: 10.0, 900: 50.0}, now=0)
    assert h.choose([900, 901], now=0) == 901
    h.measured({}, now=100)                       # no STUN answer at all: DERP over TCP still works
    assert h.choose([900, 901], now=100) == 901
    h.measured({900: 1.0}, now=200)
    assert h.choose([900, 901], now=900) == 901   # that measurement is stale by now


def test_a_region_that_left_the_map_is_never_home() -> None:
    h = HomeRegion(min_dwell=300)
    h.measured({900: 1.0, 901: 50.0}, now=0)
    assert h.choose([900, 901], now=0) == 900
    assert h.choose([901, 902], now=1) == 901      # 900 left the map: the fastest that remains
    h.measured({}, now=2)
    assert h.choose([902], now=3) == 902


def test_the_first_measurement_moves_the_default_home_at_once() -> None:
    h = HomeRegion(min_dwell=300)
    assert h.choose([900, 901], now=0) == 900     # nothing measured yet: the map's first region
    h.measured({900: 50.0, 901: 10.0}, now=2)
    assert h.choose([900, 901], now=2) == 901
