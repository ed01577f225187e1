"""The tailnet ranges' single owner: the reverse zones derived from them, and every way an address
of the tailnet can be written."""

from __future__ import annotations

import ipaddress

import dns.reversename

from magicdns.ranges import V4_REVERSE_APEXES, V6_REVERSE_APEX, in_tailnet
from magicdns.view import DnsView
from magicdns.zone import LocalZone, Zone


def test_reverse_zones_cover_exactly_the_ranges() -> None:
    assert V4_REVERSE_APEXES[0] == "64.100.in-addr.arpa" and V4_REVERSE_APEXES[-1] == "127.100.in-addr.arpa"
    assert len(V4_REVERSE_APEXES) == 64
    assert V6_REVERSE_APEX == "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa"
    zone = Zone(DnsView())
    for addr, ours in (("100.64.0.1", True), ("100.127.255.254", True), ("100.128.0.1", False),
                       ("100.63.255.255", False), ("fd7a:115c:a1e0::1", True), ("fd7a:115c:a1e1::1", False)):
        name = str(dns.reversename.from_address(addr)).rstrip(".")
        assert isinstance(zone.route_for(name)[0], LocalZone) == ours, addr
        assert in_tailnet(ipaddress.ip_address(addr)) == ours, addr


def test_every_spelling_of_a_tailnet_address() -> None:
    for text in ("::ffff:100.64.0.1", "64:ff9b::100.64.0.1", "64:ff9b::6440:1"):
        assert in_tailnet(ipaddress.ip_address(text)), text
    for text in ("::ffff:8.8.8.8", "64:ff9b::8.8.8.8", "64:ff9b:1::100.64.0.1", "2001:db8::100.64.0.1"):
        assert not in_tailnet(ipaddress.ip_address(text)), text
