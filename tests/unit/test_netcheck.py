"""The netcheck core: reports built from fabricated STUN answers (what NATs would do), hysteresis of
the home region, and the words for each kind of NAT."""

from __future__ import annotations

from meshnode.netcheck import NetcheckProbe, Target, describe_nat, preferred_region
from meshnode.stun.message import response

T1 = Target(1, "1a", "192.0.2.1", 3478)
T1B = Target(1, "1b", "192.0.2.2", 3478)
T2 = Target(2, "2a", "198.51.100.1", 3478)
T6 = Target(2, "2a", "2001:db8::1", 3478)


def answer(probe: NetcheckProbe, target: Target, mapped: tuple[str, int], now: float) -> bool:
    txid = next(t for t, s in probe._sent.items() if s.target == target)
    return probe.receive(response(txid, *mapped), now)


def test_easy_nat_report() -> None:
    p = NetcheckProbe([T1, T1B, T2, T6], now=10.0)
    assert len(p.requests()) == 4
    assert answer(p, T1, ("203.0.113.5", 40000), 10.030)
    assert answer(p, T1B, ("203.0.113.5", 40000), 10.020)
    assert answer(p, T2, ("203.0.113.5", 40000), 10.080)
    assert not p.receive(b"garbage", 10.1) and not p.done
    r = p.report()
    assert r.udp and r.ipv4 and not r.ipv6
    assert r.global_v4 == "203.0.113.5:40000" and r.global_v6 is None
    assert r.mapping_varies_by_dest_ip is False
    assert {k: round(v, 3) for k, v in r.relay_latency_ms.items()} == {1: 20.0, 2: 80.0}   # best of region
    assert r.preferred_relay == 1 and "easy" in r.nat
    j = r.to_json()
    assert set(j) == {"udp", "ipv4", "ipv6", "global_v4", "global_v6", "mapping_varies_by_dest_ip",
                      "port_mapping", "preferred_relay", "relay_latency_ms", "captive_portal", "nat"}
    assert j["relay_latency_ms"] == {"1": 20.0, "2": 80.0} and j["port_mapping"] == []


def test_hard_nat_and_ipv6() -> None:
    p = NetcheckProbe([T1, T2, T6], now=0.0)
    answer(p, T1, ("203.0.113.5", 40000), 0.01)
    answer(p, T2, ("203.0.113.5", 40001), 0.02)    # another port for another destination
    answer(p, T6, ("2001:db8:1::5", 41641), 0.03)
    assert p.done and not answer(p, T1, ("203.0.113.5", 1), 0.5)   # a duplicate answer is ignored
    r = p.report()
    assert r.mapping_varies_by_dest_ip is True and "hard" in r.nat
    assert r.ipv6 and r.global_v6 == "[2001:db8:1::5]:41641"


def test_no_udp_and_unknown_nat_and_no_nat() -> None:
    r = NetcheckProbe([T1, T2], now=0.0).report()
    assert not r.udp and r.preferred_relay is None and "blocked" in r.nat and r.mapping_varies_by_dest_ip is None
    p = NetcheckProbe([T1], now=0.0)
    answer(p, T1, ("192.0.2.77", 41641), 0.01)
    assert "unknown" in p.report().nat
    assert "no NAT" in p.report(local_ips=frozenset({"192.0.2.77"})).nat
    assert "IPv6 only" in describe_nat(True, None, None, frozenset())


def test_home_region_hysteresis() -> None:
    assert preferred_region({1: 30.0, 2: 25.0}, previous=1) == 1      # not a third faster: stay
    assert preferred_region({1: 30.0, 2: 19.0}, previous=1) == 2      # much faster: move
    assert preferred_region({2: 25.0}, previous=1) == 2                # old home not measured
    assert preferred_region({1: 5.0, 2: 5.0}, previous=None) == 1      # ties: lowest id, stable
    assert preferred_region({}, previous=1) is None
