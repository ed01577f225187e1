"""NAT-PMP and PCP: golden vectors from RFC 6886/6887's layouts and Tailscale's net/portmapper,
the client state machine driven with explicit time, and fuzzed parsers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from meshnode.portmap import client as pc
from meshnode.portmap import pcp, pmp
from meshnode.portmap.client import Protocol, PortMapClient, State

# Tailscale's net/portmapper/pcp_test.go examplePCPMapResponse: 135.180.175.246:1234, lifetime 7200.
TS_PCP_MAP_RESPONSE = bytes([2, 129, 0, 0, 0, 0, 28, 32, 0, 2, 155, 237, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                             129, 112, 9, 24, 241, 208, 251, 45, 157, 76, 10, 188, 17, 0, 0, 0, 4, 210, 4,
                             210, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 135, 180, 175, 246])
NONCE = bytes(range(1, 13))
PXP = [Protocol.PMP, Protocol.PCP]   # what PortMapClient drives (UPnP: upnp.py)


def test_pcp_golden_map_response_from_tailscale() -> None:
    r = pcp.parse_response(TS_PCP_MAP_RESPONSE)
    assert (r.op, r.result, r.lifetime, r.epoch) == (pcp.OP_MAP, 0, 7200, 0x00029BED)
    assert (r.external_ip, r.external_port, r.internal_port, r.protocol) == ("135.180.175.246", 1234, 1234, 17)
    assert r.nonce == bytes([129, 112, 9, 24, 241, 208, 251, 45, 157, 76, 10, 188])


def test_pcp_golden_map_request() -> None:
    # RFC 6887 7.1 + 11.1, as Tailscale's buildPCPRequestMappingPacket lays it out.
    got = pcp.map_request("192.168.1.10", NONCE, 41641, 7200)
    want = (bytes([2, 1, 0, 0]) + struct.pack("!I", 7200) + b"\0" * 10 + b"\xff\xff" + bytes([192, 168, 1, 10])
            + NONCE + bytes([17, 0, 0, 0]) + struct.pack("!HH", 41641, 0) + b"\0" * 10 + b"\xff\xff" + b"\0" * 4)
    assert got == want and len(got) == 60
    assert pcp.announce_request("10.0.0.2") == bytes([2, 0, 0, 0, 0, 0, 0, 0]) + b"\0" * 10 + b"\xff\xff\x0a\0\0\x02"


def test_pmp_golden_requests_and_responses() -> None:
    assert pmp.public_address_request() == b"\x00\x00"
    # Tailscale's buildPMPRequestMappingPacket(41641, 0, 7200)
    assert pmp.map_udp_request(41641, 0, 7200) == bytes([0, 1, 0, 0, 0xA2, 0xA9, 0, 0, 0, 0, 0x1C, 0x20])
    assert pmp.map_udp_request(41641, 0, 0) == bytes([0, 1, 0, 0, 0xA2, 0xA9, 0, 0, 0, 0, 0, 0])
    r = pmp.parse_response(bytes([0, 128, 0, 0, 0, 0, 0, 42, 203, 0, 113, 7]))
    assert (r.op, r.result, r.epoch, r.public_ip) == (0, 0, 42, "203.0.113.7")
    r = pmp.parse_response(bytes([0, 129, 0, 0, 0, 0, 0, 43, 0xA2, 0xA9, 0x30, 0x39, 0, 0, 0x0E, 0x10]))
    assert (r.op, r.internal_port, r.external_port, r.lifetime) == (1, 41641, 12345, 3600)
    # an error answer of 8 bytes, with its result in words
    r = pmp.parse_response(bytes([0, 129, 0, 2, 0, 0, 0, 1]))
    assert r.result == 2 and "not authorized" in pmp.result_words(r.result)
    assert "unknown" in pmp.result_words(99)


@pytest.mark.parametrize("data", [b"", b"\x00", bytes(7), bytes([1, 128]) + bytes(10), bytes([0, 1]) + bytes(10),
                                  bytes([0, 128, 0, 0, 0, 0, 0, 0, 1, 2]), bytes([0, 129]) + bytes(10),
                                  bytes([0, 200]) + bytes(14)])
def test_pmp_rejects(data: bytes) -> None:
    with pytest.raises(pmp.PmpError):
        pmp.parse_response(data)


@pytest.mark.parametrize("data", [bytes(23), bytes([0, 129]) + bytes(58), bytes([2, 1]) + bytes(58),
                                  bytes([2, 129]) + bytes(23), bytes([2, 129]) + bytes(1200),
                                  bytes([2, 129, 0, 0]) + bytes(20)])
def test_pcp_rejects(data: bytes) -> None:
    with pytest.raises(pcp.PcpError):
        pcp.parse_response(data)


def test_pcp_result_words() -> None:
    assert "address mismatch" in pcp.result_words(12)
    assert pcp.PcpResult.NO_RESOURCES.long_lifetime is False and pcp.PcpResult.NOT_AUTHORIZED.long_lifetime


@given(st.binary(max_size=1200))
@settings(max_examples=400, deadline=None)
def test_fuzzed_parsers_raise_only_their_errors(data: bytes) -> None:
    for parse, err in ((pmp.parse_response, pmp.PmpError), (pcp.parse_response, pcp.PcpError)):
        try:
            parse(data)
        except err:
            pass


@given(st.lists(st.binary(max_size=80), max_size=20), st.sampled_from(PXP))
@settings(max_examples=200, deadline=None)
def test_fuzzed_client_never_raises(datagrams: list[bytes], proto: Protocol) -> None:
    c = PortMapClient(proto, client_ip="10.0.0.2", internal_port=41641, nonce=NONCE, rand=lambda: 0.5)
    c.start(0.0)
    now = 0.0
    for d in datagrams:
        c.poll(now)
        c.receive(d, now)
        now += 0.1
    assert c.state in State


# --- a gateway in bytes, for the state machine ---------------------------------------------------

def pcp_answer(req: bytes, *, epoch: int, result: int = 0, lifetime: int | None = None,
               ext: tuple[str, int] = ("198.51.100.1", 40000)) -> bytes:
    life = struct.unpack_from("!I", req, 4)[0] if lifetime is None else lifetime
    head = struct.pack("!BBBBII12s", 2, req[1] | 0x80, 0, result, life, epoch, b"")
    return head + req[24:42] + struct.pack("!H", ext[1]) + pcp._ip16(ext[0])


def pmp_answers(reqs: list[bytes], *, epoch: int, ext_port: int = 40000, lifetime: int | None = None,
                ip: str = "198.51.100.1") -> list[bytes]:
    out = []
    for req in reqs:
        if req[1] == 0:
            out.append(bytes([0, 128, 0, 0]) + struct.pack("!I", epoch) + bytes(map(int, ip.split("."))))
        else:
            internal, _, life = struct.unpack_from("!HHI", req, 4)
            out.append(bytes([0, 129, 0, 0]) + struct.pack("!IHHI", epoch, internal, ext_port,
                                                              life if lifetime is None else lifetime))
    return out


def test_pmp_retransmits_on_rfc_schedule_then_gives_up() -> None:
    c = PortMapClient(Protocol.PMP, client_ip="10.0.0.2", internal_port=41641, give_up_after=None)
    c.start(0.0)
    sends, now = [], 0.0
    while now < 200:
        dgrams, events = c.poll(now)
        if dgrams:
            sends.append(now)
            assert len(dgrams) == 2                 # public address + map
        if events:
            assert isinstance(events[0], pc.Failed) and events[0].answered is False
            break
        now = c.next_deadline()
    # RFC 6886 3.1: 250 ms doubling, nine tries; given up after the ninth waited 64 s
    assert sends == [0.25 * (2 ** i - 1) for i in range(9)]
    assert now == pytest.approx(0.25 * (2 ** 9 - 1))
    assert c.state == State.FAILED and c.retry_at is not None


def test_pcp_retransmits_with_jitter_bounded_by_give_up() -> None:
    c = PortMapClient(Protocol.PCP, client_ip="10.0.0.2", internal_port=41641, give_up_after=30.0,
                      rand=lambda: 1.0)        # +10 % every time
    c.start(0.0)
    sends, now = [], 0.0
    while True:
        dgrams, events = c.poll(now)
        sends += [now] * bool(dgrams)
        if events:
            break
        now = c.next_deadline()
    assert sends == pytest.approx([0.0, 3.3, 3.3 + 7.26, 3.3 + 7.26 + 15.972])
    assert now == 30.0 and isinstance(events[0], pc.Failed)


@pytest.mark.parametrize("proto", PXP)
def test_mapping_renewed_at_half_lifetime_and_epoch_restart_noticed(proto: Protocol) -> None:
    c = PortMapClient(proto, client_ip="10.0.0.2", internal_port=41641, lifetime=600, nonce=NONCE)
    c.start(100.0)
    reqs, _ = c.poll(100.0)

    def answer(reqs: list[bytes], now: float, epoch: int, port: int = 40000) -> list[pc.Event]:
        if proto is Protocol.PCP:
            return c.receive(pcp_answer(reqs[0], epoch=epoch, ext=("198.51.100.1", port)), now)
        return [e for d in pmp_answers(reqs, epoch=epoch, ext_port=port) for e in c.receive(d, now)]

    events = answer(reqs, 100.1, epoch=1000)
    assert events == [pc.Mapped(c.mapping)] and c.mapping is not None
    assert c.mapping.endpoint == "198.51.100.1:40000" and c.mapping.renew_at == pytest.approx(400.1)
    assert c.next_deadline() == pytest.approx(400.1)
    assert c.poll(399.0) == ([], [])
    reqs, _ = c.poll(400.1)
    assert reqs, "a renewal at half the lifetime"
    if proto is Protocol.PCP:        # the renewal suggests the port and address we hold
        assert struct.unpack_from("!H", reqs[0], 42)[0] == 40000 and reqs[0][24:36] == NONCE
    else:
        assert struct.unpack_from("!H", reqs[-1], 6)[0] == 40000
    # the gateway rebooted meanwhile (epoch went back) and gave another port
    events = answer(reqs, 400.2, epoch=5, port=40001)
    assert events[0] == pc.GatewayRestarted() and isinstance(events[1], pc.Mapped)
    assert c.mapping.external_port == 40001


@pytest.mark.parametrize("proto", PXP)
def test_renewal_unanswered_until_expiry_loses_mapping(proto: Protocol) -> None:
    c = PortMapClient(proto, client_ip="10.0.0.2", internal_port=41641, lifetime=100, nonce=NONCE)
    c.start(0.0)
    reqs, _ = c.poll(0.0)
    if proto is Protocol.PCP:
        c.receive(pcp_answer(reqs[0], epoch=10), 0.0)
    else:
        for d in pmp_answers(reqs, epoch=10):
            c.receive(d, 0.0)
    assert c.state == State.MAPPED
    now, events = 0.0, []
    while not events:
        now = c.next_deadline()
        _, events = c.poll(now)
    assert now == 100.0 and isinstance(events[0], pc.Lost) and c.mapping is None


def test_pcp_ignores_other_nonce_port_and_reports_errors_in_words() -> None:
    c = PortMapClient(Protocol.PCP, client_ip="10.0.0.2", internal_port=41641, nonce=NONCE)
    c.start(0.0)
    reqs, _ = c.poll(0.0)
    other = bytearray(reqs[0])
    other[24] ^= 1
    assert c.receive(pcp_answer(bytes(other), epoch=1), 0.1) == []
    assert c.state == State.REQUESTING
    events = c.receive(pcp_answer(reqs[0], epoch=1, result=2), 0.2)
    assert events == [pc.Failed("PCP: the gateway supports PCP but mapping is turned off (not authorized)",
                                None, True)]
    assert c.state == State.FAILED and c.next_deadline() is None


def test_pcp_short_error_retries_after_its_lifetime() -> None:
    c = PortMapClient(Protocol.PCP, client_ip="10.0.0.2", internal_port=41641, nonce=NONCE)
    c.start(0.0)
    reqs, _ = c.poll(0.0)
    [ev] = c.receive(pcp_answer(reqs[0], epoch=1, result=8, lifetime=60), 0.5)
    assert isinstance(ev, pc.Failed) and ev.retry_at == 60.5 and "no mappings left" in ev.reason
    again, _ = c.poll(60.5)
    assert again and again[0][24:36] == NONCE


def test_pcp_to_pmp_only_gateway() -> None:
    c = PortMapClient(Protocol.PCP, client_ip="10.0.0.2", internal_port=41641)
    c.start(0.0)
    c.poll(0.0)
    [ev] = c.receive(bytes([0, 129, 0, 1, 0, 0, 0, 9]), 0.1)
    assert isinstance(ev, pc.Failed) and "NAT-PMP, not PCP" in ev.reason and ev.retry_at is None


@pytest.mark.parametrize("proto", PXP)
def test_release_deletes_and_is_confirmed(proto: Protocol) -> None:
    c = PortMapClient(proto, client_ip="10.0.0.2", internal_port=41641, nonce=NONCE)
    assert c.release() == []
    c = PortMapClient(proto, client_ip="10.0.0.2", internal_port=41641, nonce=NONCE)
    c.start(0.0)
    reqs, _ = c.poll(0.0)
    if proto is Protocol.PCP:
        c.receive(pcp_answer(reqs[0], epoch=1), 0.0)
    else:
        for d in pmp_answers(reqs, epoch=1):
            c.receive(d, 0.0)
    [delete] = c.release()
    if proto is Protocol.PCP:
        assert struct.unpack_from("!I", delete, 4)[0] == 0 and delete[24:36] == NONCE
        assert c.receive(pcp_answer(delete, epoch=2), 1.0) == [pc.Released()]
    else:
        assert delete == pmp.map_udp_request(41641, 0, 0)
        assert c.receive(pmp_answers([delete], epoch=2)[0], 1.0) == [pc.Released()]
    assert c.poll(5000.0) == ([], []) and c.next_deadline() is None


def test_client_refuses_upnp() -> None:
    with pytest.raises(ValueError, match="not UPnP"):
        PortMapClient(Protocol.UPNP, client_ip="10.0.0.2", internal_port=41641)
