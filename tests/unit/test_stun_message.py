"""STUN codec against Tailscale's net/stun vectors (stun_test.go responses captured from real servers)
and the request layout of stun.go; fuzzed parsers raise only StunError."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from meshnode.stun.message import (BindingResponse, NotStun, StunError, fingerprint, is_stun, parse_request,
                                   parse_response, request, response)

TX = bytes.fromhex("2360b11e3ec68ffa93e08007")

# name, response bytes (hex), txid, address, port - from tailscale/net/stun/stun_test.go
RESPONSES = [
    ("google-1", "0101000c2112a4422360b11e3ec68ffa93e08007002000080001c7866957856f",
     "2360b11e3ec68ffa93e08007", "72.69.33.45", 59028),
    ("google-2", "0101000c2112a442f9f121cbde7d7c75923ce271002000080001c7876957856f",
     "f9f121cbde7d7c75923ce271", "72.69.33.45", 59029),
    ("stun-sipgate-net-10000",
     "010100442112a442482eb64715e8b28eaead6444000100080001e4ab4845212d000400080001271"
     "0d90a4498000500080001271 1d9747a8a802000080001c5b96957856f80220010566f766964612e6f726720302e393600",
     "482eb64715e8b28eaead6444", "72.69.33.45", 58539),
    ("stun-powervoip-com-3478",
     "010100242112a4427e57966829f444609d1deaa6000100080001e9d34845212d0004000800010d964d48a9d4"
     "000500080001 0d974d48a9d5", "7e57966829f444609d1deaa6", "72.69.33.45", 59859),
    ("in-process-pion-server",
     "010100242112a442ebc2d36ef471217c4f3e308e8022000a656e64706f696e74657200000020000800"
     "01ce665e12a443802800 04b699bb02010100242112a442", "ebc2d36ef471217c4f3e308e", "127.0.0.1", 61300),
    ("stuntman-server-ipv6",
     "010100482112a44206f56685d28af3e69ce341e2000100140002 90ce260200d1b4cfc10038b231fffeef96f6"
     "802b00140002 0d962604a880000200d10000000000c57001002000140002b1dc0710a493b23aa785ea38c219620cd714",
     "06f56685d28af3e69ce341e2", "2602:d1:b4cf:c100:38b2:31ff:feef:96f6", 37070),
    ("software-a", "010100142112a442ebc2d36ef471217c4f3e308e8022000161000000002000080001ce665e12a443",
     "ebc2d36ef471217c4f3e308e", "127.0.0.1", 61300),
    ("software-abc", "010100142112a442ebc2d36ef471217c4f3e308e8022000361626300002000080001ce665e12a443",
     "ebc2d36ef471217c4f3e308e", "127.0.0.1", 61300),
]


@pytest.mark.parametrize("name, data, txid, ip, port", RESPONSES, ids=[r[0] for r in RESPONSES])
def test_tailscale_response_vectors(name: str, data: str, txid: str, ip: str, port: int) -> None:
    got = parse_response(bytes.fromhex(data.replace(" ", "")))
    assert got == BindingResponse(bytes.fromhex(txid), ip, port)


def test_request_layout_is_tailscales() -> None:
    req = request(TX)
    head = bytes.fromhex("0001" "0014" "2112a442") + TX
    software = bytes.fromhex("8022" "0008") + b"tailnode"
    assert req[:32] == head + software
    fp = (zlib.crc32(head + software) ^ 0x5354554E) & 0xFFFFFFFF
    assert req[32:] == bytes.fromhex("8028" "0004") + struct.pack(">I", fp)
    assert len(req) == 40 and is_stun(req)
    assert parse_request(req) == TX


def test_response_builds_the_google_vector_byte_for_byte() -> None:
    assert response(TX, "72.69.33.45", 59028) == bytes.fromhex(RESPONSES[0][1])


def test_ipv6_response_round_trip_xors_the_txid() -> None:
    b = response(TX, "2001:db8::1", 41641)
    assert b[2:4] == b"\x00\x18"                       # attribute of 4 + 4 + 16 bytes
    assert parse_response(b) == BindingResponse(TX, "2001:db8::1", 41641)
    assert parse_response(response(TX, "::ffff:192.0.2.1", 7)) == BindingResponse(TX, "192.0.2.1", 7)


def test_requests_from_other_software_are_answered_but_bad_fingerprints_are_not() -> None:
    plain = bytes.fromhex("00010000 2112a442".replace(" ", "")) + TX     # no attributes at all
    assert parse_request(plain) == TX
    bad = bytearray(request(TX))
    bad[-1] ^= 1
    with pytest.raises(StunError, match="fingerprint"):
        parse_request(bytes(bad))
    with pytest.raises(NotStun):
        parse_request(b"\x01" * 40)
    with pytest.raises(StunError, match="binding request"):
        parse_request(response(TX, "127.0.0.1", 1))
    assert fingerprint(b"") == 0x5354554E


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120))
def test_parsers_raise_only_stun_error(data: bytes) -> None:
    for parse in (parse_request, parse_response):
        try:
            parse(data)
        except StunError:
            pass
        try:
            parse(bytes.fromhex("0101") + data[:2] + b"\x21\x12\xa4\x42" + data[2:])
        except StunError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=12, max_size=12), st.ip_addresses(), st.integers(0, 65535))
def test_response_round_trip(txid: bytes, ip: object, port: int) -> None:
    got = parse_response(response(txid, str(ip), port))
    assert got.txid == txid and got.port == port
