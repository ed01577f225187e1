"""Allowed IPs: longest-prefix match for v4 and v6, ownership moves, removal, cache coherence."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.wg.allowedips import AllowedIPs


def test_longest_prefix_wins_v4() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.0/8", "wide")
    t.insert("10.1.0.0/16", "mid")
    t.insert("10.1.2.3/32", "host")
    assert t.lookup_ip("10.1.2.3") == "host"
    assert t.lookup_ip("10.1.2.4") == "mid"
    assert t.lookup_ip("10.200.0.1") == "wide"
    assert t.lookup_ip("11.0.0.1") is None


def test_v6_and_default_routes() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("::/0", "v6default")
    t.insert("fd7a:115c:a1e0::/48", "tailnet")
    t.insert("0.0.0.0/0", "v4default")
    assert t.lookup_ip("fd7a:115c:a1e0::2") == "tailnet"
    assert t.lookup_ip("2001:db8::1") == "v6default"
    assert t.lookup_ip("192.0.2.1") == "v4default"


def test_prefix_has_one_owner_and_removal() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.0/24", "a")
    assert t.lookup_ip("10.0.0.9") == "a"  # cached now
    t.insert("10.0.0.0/24", "b")
    assert t.lookup_ip("10.0.0.9") == "b"  # the cache followed the change
    t.insert("10.0.1.0/24", "b")
    assert sorted(map(str, t.networks_of("b"))) == ["10.0.0.0/24", "10.0.1.0/24"]
    t.remove_value("b")
    assert t.lookup_ip("10.0.0.9") is None and list(t.networks_of("b")) == []


def test_host_bits_are_masked() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.77/24", "a")
    assert t.lookup_ip("10.0.0.1") == "a"


prefixes4 = st.builds(lambda a, n: ipaddress.ip_network((a, n), strict=False),
                      st.integers(0, 2**32 - 1), st.integers(0, 32))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(prefixes4, st.integers(0, 5)), max_size=30),
       st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20))
def test_matches_brute_force(entries: list, addrs: list[int]) -> None:
    t: AllowedIPs[int] = AllowedIPs()
    owners: dict = {}
    for net, owner in entries:
        t.insert(net, owner)
        owners[net] = owner
    for a in addrs:
        ip = ipaddress.IPv4Address(a)
        best = max((n for n in owners if ip in n), key=lambda n: n.prefixlen, default=None)
        assert t.lookup(ip.packed) == (owners[best] if best is not None else None)
