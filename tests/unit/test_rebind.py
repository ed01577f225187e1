"""Rebinding protection on the wire: every form a tailnet address can take in a forwarded answer."""

from __future__ import annotations

import ipaddress

from dnslib import RR, DNSRecord
from hypothesis import given, strategies as st

from magicdns.cache import scan_message
from magicdns.rebind import (is_tailnet_v4, is_tailnet_v6, strip_tailnet_addresses, svcb_has_tailnet_hint,
                             svcb_without_tailnet_hints, tailnet_address_records)


def reply_with(*zone_lines: str, qtype: str = "A") -> bytes:
    r = DNSRecord.question("x.example.", qtype).reply()
    for line in zone_lines:
        r.add_answer(*RR.fromZone(line))
    return bytes(r.pack())


def flagged(reply: bytes) -> bool:
    return tailnet_address_records(reply, scan_message(reply))


def svcb(priority: int, target: bytes, params: list[tuple[int, bytes]]) -> bytes:
    out = priority.to_bytes(2, "big") + target
    for key, value in params:
        out += key.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value
    return out


V4_TAIL = ipaddress.ip_address("100.64.1.2").packed
V4_OK = ipaddress.ip_address("192.0.2.1").packed
V6_TAIL = ipaddress.ip_address("fd7a:115c:a1e0::2").packed
V6_OK = ipaddress.ip_address("2001:db8::1").packed


def test_nat64_and_mapped_forms_of_tailnet_addresses() -> None:
    assert is_tailnet_v6(ipaddress.ip_address("64:ff9b::100.64.0.1").packed)
    assert is_tailnet_v6(ipaddress.ip_address("64:ff9b::647f:ffff").packed)  # 100.127.255.255: the /10's end
    assert not is_tailnet_v6(ipaddress.ip_address("64:ff9b::6480:1").packed)  # 100.128.0.1: outside
    assert not is_tailnet_v6(ipaddress.ip_address("64:ff9b::192.0.2.1").packed)
    assert is_tailnet_v6(ipaddress.ip_address("::ffff:100.100.100.100").packed)
    assert not is_tailnet_v6(ipaddress.ip_address("64:ff9b:1::100.64.0.1").packed)  # RFC 8215 local-use: not ours
    assert flagged(reply_with("x.example. 60 IN AAAA 64:ff9b::6440:1", qtype="AAAA"))
    stripped, names = strip_tailnet_addresses(reply_with("x.example. 60 IN AAAA 64:ff9b::6440:1",
                                                         "x.example. 60 IN AAAA 64:ff9b::c000:201", qtype="AAAA"))
    assert names == ("x.example.",)
    assert [str(rr.rdata) for rr in DNSRecord.parse(stripped).rr] == ["64:ff9b::c000:201"]


@given(st.ip_addresses(v=4))
def test_v4_range_matches_ipaddress(addr: ipaddress.IPv4Address) -> None:
    inside = addr in ipaddress.ip_network("100.64.0.0/10")
    assert is_tailnet_v4(addr.packed) == inside
    assert is_tailnet_v6(ipaddress.ip_address(f"64:ff9b::{addr}").packed) == inside
    assert is_tailnet_v6(ipaddress.ip_address(f"::ffff:{addr}").packed) == inside


def test_https_hints_are_filtered() -> None:
    reply = reply_with("x.example. 60 IN HTTPS 1 . alpn=h2 ipv4hint=100.64.1.2,192.0.2.1 ipv6hint=fd7a:115c:a1e0::2",
                       qtype="HTTPS")
    assert flagged(reply)
    stripped, names = strip_tailnet_addresses(reply)
    assert names == ("x.example.",) and not flagged(stripped)
    rr = DNSRecord.parse(stripped).rr[0]
    text = str(rr.rdata)
    assert "ipv4hint=192.0.2.1" in text and "100.64" not in text and "ipv6hint" not in text and "alpn=h2" in text


def test_svcb_hints_raw() -> None:
    target = b"\x03svc\x07example\x00"
    rdata = svcb(1, target, [(1, b"\x02h2"), (4, V4_OK + V4_TAIL), (6, V6_OK)])
    assert svcb_has_tailnet_hint(rdata)
    assert svcb_without_tailnet_hints(rdata) == svcb(1, target, [(1, b"\x02h2"), (4, V4_OK), (6, V6_OK)])
    only_tail = svcb(1, target, [(6, V6_TAIL)])
    assert svcb_without_tailnet_hints(only_tail) == svcb(1, target, [])
    # A hint the record declares mandatory cannot be dropped: then the record goes.
    mandatory = svcb(1, target, [(0, b"\x00\x04"), (4, V4_TAIL)])
    assert svcb_without_tailnet_hints(mandatory) is None
    assert not svcb_has_tailnet_hint(svcb(1, target, [(4, V4_OK), (6, V6_OK)]))
    assert not svcb_has_tailnet_hint(b"\x00\x01\x05abc")  # garbled: not ours to judge, not a crash

    wire = reply_with(f"x.example. 60 IN TYPE64 \\# {len(rdata)} {rdata.hex()}",
                      f"x.example. 60 IN TYPE64 \\# {len(mandatory)} {mandatory.hex()}", qtype="SVCB")
    assert flagged(wire)
    stripped, _ = strip_tailnet_addresses(wire)
    rrs = DNSRecord.parse(stripped).rr
    assert len(rrs) == 1 and not flagged(stripped)


def test_authority_section_and_plain_answers_untouched() -> None:
    assert not flagged(reply_with("x.example. 60 IN A 192.0.2.1", "x.example. 60 IN AAAA 2001:db8::1"))
    assert not flagged(reply_with("x.example. 60 IN HTTPS 1 . alpn=h2 ipv4hint=192.0.2.1", qtype="HTTPS"))
