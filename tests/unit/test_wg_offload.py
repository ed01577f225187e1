"""TUN offloads: TSO super-packets split into checksummed segments; segments coalesced back."""

from __future__ import annotations

import ipaddress
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.wg import offload as o


def slow_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def tcp_ok(p: bytes) -> bool:
    v6 = p[0] >> 4 == 6
    iphl = 40 if v6 else 20
    seg = p[iphl:]
    pseudo = (p[8:40] if v6 else p[12:20]) + struct.pack("!HH", 6, len(seg))
    return slow_sum(pseudo + seg) == 0xFFFF


def tcp_packet(v6: bool, payload: bytes, seq: int = 1000, flags: int = o.TCP_ACK | o.TCP_PSH,
               opts: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, (5 + len(opts) // 4) << 4, flags,
                      500, 0, 0) + opts
    if v6:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(tcp) + len(payload), 6, 64,
                         ipaddress.ip_address("fd00::1").packed, ipaddress.ip_address("fd00::2").packed)
    else:
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 9, 0x4000,
                                   64, 6, 0, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])))
        o.ipv4_header_checksum(ip)
        ip = bytes(ip)
    return ip + tcp + payload


@pytest.mark.parametrize("v6", [False, True])
def test_tso_split_gives_valid_segments_and_coalesces_back(v6: bool) -> None:
    payload = os.urandom(5000)
    sp = tcp_packet(v6, payload, flags=o.TCP_ACK | o.TCP_PSH | o.TCP_CWR,
                    opts=b"\x01\x01\x08\x0a" + bytes(8))
    hl = (40 if v6 else 20) + 32
    vnet = o.VNET_HDR.pack(o.F_NEEDS_CSUM, o.GSO_TCPV6 if v6 else o.GSO_TCPV4, hl, 1200,
                           40 if v6 else 20, 16)
    segs = o.from_tun(vnet + sp)
    assert [len(s) - hl for s in segs] == [1200, 1200, 1200, 1200, 200]
    assert b"".join(s[hl:] for s in segs) == payload
    for i, s in enumerate(segs):
        assert tcp_ok(s)
        if not v6:
            assert slow_sum(s[:20]) == 0xFFFF
        flags = s[(40 if v6 else 20) + 13]
        assert bool(flags & o.TCP_PSH) == (i == len(segs) - 1)
        assert bool(flags & o.TCP_CWR) == (i == 0)
    # The CWR segment is left alone (as Linux GRO does); the other four become one.
    first, merged = o.to_tun(segs)
    assert first == o.PLAIN_HDR + segs[0]
    hdr = o.VNET_HDR.unpack_from(merged)
    assert hdr == (o.F_NEEDS_CSUM, o.GSO_TCPV6 if v6 else o.GSO_TCPV4, hl, 1200,
                   40 if v6 else 20, 16)
    assert merged[o.VNET_HDR_LEN + hl:] == payload[1200:]
    inner = merged[o.VNET_HDR_LEN:]
    if not v6:
        assert slow_sum(inner[:20]) == 0xFFFF and int.from_bytes(inner[2:4], "big") == len(inner)
    else:
        assert int.from_bytes(inner[4:6], "big") == len(inner) - 40


def test_partial_checksum_is_finished() -> None:
    p = bytearray(tcp_packet(False, b"hello world"))
    pseudo = o._fold(o.csum_sum(p[12:20]) + 6 + len(p) - 20)
    struct.pack_into("!H", p, 36, pseudo)
    out = o.from_tun(o.VNET_HDR.pack(o.F_NEEDS_CSUM, 0, 0, 0, 20, 16) + bytes(p))
    assert tcp_ok(out[0])


def test_non_tcp_and_gaps_are_not_coalesced() -> None:
    a = tcp_packet(False, b"a" * 100, seq=0)
    b = tcp_packet(False, b"b" * 100, seq=100)
    gap = tcp_packet(False, b"c" * 100, seq=500)
    syn = tcp_packet(False, b"", seq=600, flags=o.TCP_SYN)
    udp = bytes([0x45]) + bytes(27)
    out = o.to_tun([a, b, gap, syn, udp])
    assert len(out) == 4
    assert out[0][o.VNET_HDR_LEN + 40:] == b"a" * 100 + b"b" * 100
    assert out[1] == o.PLAIN_HDR + gap and out[2] == o.PLAIN_HDR + syn and out[3] == o.PLAIN_HDR + udp


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000))
def test_checksum_matches_reference(data: bytes) -> None:
    assert o.csum_sum(data) % 0xFFFF == slow_sum(data) % 0xFFFF


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=8))
def test_to_tun_never_raises(packets: list[bytes]) -> None:
    o.to_tun([p for p in packets if p])


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=10, max_size=10), st.binary(max_size=200))
def test_from_tun_fails_only_with_offload_error(vnet: bytes, packet: bytes) -> None:
    # Device drops (and counts) exactly these; anything else would be a bug in the splitter.
    try:
        segments = o.from_tun(vnet + packet)
    except o.OffloadError:
        return
    assert all(isinstance(s, bytes) for s in segments)
