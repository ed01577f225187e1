"""The data plane's packet hooks, which carry the ACL filter: the inbound check, the outbound tap
on the send path, and `call_soon_dataplane` (new rules applied on the receive thread).

First on the sans-I/O engine, then on two real `Device`s in this process talking over loopback UDP,
each with a datagram socketpair standing in for its TUN (no root needed): the test writes inner
packets where the TUN would hand them to the device and reads what the device writes back.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
import threading
from typing import Iterator

import pytest

from meshnode.policy import AcceptReason, DropReason, FilterRule, PacketFilter, PortRange
from meshnode.wg.crypto import clamp, public_key
from meshnode.wg.device import Device, open_udp
from meshnode.wg.engine import Drop, Engine
from meshnode.wg.peer import PeerConfig
from tests.support import wait_until
from tests.unit.test_wg_engine import A_IP, B_IP, B_PUB, EP_A, T0, handshake, make_pair

TCP = 6


def tcp4(src: str, dst: str, sport: int, dport: int, flags: int = 0x02) -> bytes:
    """An IPv4 TCP segment (checksums are not checked by anything here)."""
    segment = struct.pack("!HHIIBBHHH", sport, dport, 0, 0, 5 << 4, flags, 65535, 0, 0)
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), 1, 0, 64, TCP, 0,
                       ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed) + segment


def allow_tcp(src: str, dst: str, port: int) -> FilterRule:
    return FilterRule((ipaddress.ip_network(f"{src}/32"),), (ipaddress.ip_network(f"{dst}/32"),),
                      (PortRange(port, port),), (TCP,))


# -- the engine --------------------------------------------------------------------------------

def test_outbound_hook_sees_every_routed_packet_unpadded_staged_or_sent() -> None:
    a, b = make_pair()
    seen: list[tuple[bytes, bytes]] = []
    a.outbound_hook = lambda packet, peer, now: seen.append((packet, peer))
    staged = tcp4(A_IP, B_IP, 40000, 80)
    assert a.send(staged, T0) is None            # no session yet: staged, still seen
    assert seen == [(staged, B_PUB)]
    assert a.send(tcp4(A_IP, "10.9.9.9", 1, 2), T0) is None
    assert a.drops[Drop.NO_ROUTE] == 1 and len(seen) == 1  # no peer: nothing to track
    a.drops.clear()
    handshake(a, b, T0)                          # sends the staged packet: not seen twice
    assert len(seen) == 1
    odd = tcp4(A_IP, B_IP, 40000, 80) + b"abc"   # not a multiple of 16: padded after the hook
    odd = odd[:2] + len(odd).to_bytes(2, "big") + odd[4:]
    assert a.send(odd, T0) is not None
    assert seen[-1] == (odd, B_PUB)


def test_policy_filter_on_the_engine_passes_replies_of_tracked_connections() -> None:
    a, b = make_pair()
    handshake(a, b)
    fa = PacketFilter(())                         # a accepts nothing new, only replies
    fb = PacketFilter([allow_tcp(A_IP, B_IP, 80)])
    a.inbound_filter = lambda p, k, now: fa.check(p, now)
    a.outbound_hook = lambda p, k, now: fa.note_outbound(p, now)
    b.inbound_filter = lambda p, k, now: fb.check(p, now)

    def deliver(src: Engine, dst: Engine, packet: bytes) -> bool:
        out = src.send(packet, T0)
        assert out is not None
        return dst.receive(out[0], EP_A, T0) is not None

    assert deliver(a, b, tcp4(A_IP, B_IP, 40000, 80))          # allowed by b's rule
    assert not deliver(a, b, tcp4(A_IP, B_IP, 40000, 81))      # not allowed: dropped
    assert fb.drops[DropReason.NOT_ALLOWED] == 1 and b.drops[Drop.FILTERED] == 1
    assert deliver(b, a, tcp4(B_IP, A_IP, 80, 40000, 0x12))   # the reply a's tap tracked
    assert not deliver(b, a, tcp4(B_IP, A_IP, 80, 40001, 0x12))  # a port a never used
    assert fa.accepts[AcceptReason.REPLY] == 1 and fa.drops[DropReason.NOT_ALLOWED] == 1


# -- two devices on loopback -------------------------------------------------------------------

class Side:
    """A device, the test's end of its TUN stand-in, and its tailnet address."""

    def __init__(self, private: bytes, ip: str, io_threads: int) -> None:
        self.private, self.ip = private, ip
        self.tun, dev_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        dev_end.setblocking(False)  # as a TUN fd is: the device drains it until EAGAIN
        self.device = Device(Engine(private), dev_end.detach(), open_udp(None), io_threads=io_threads)

    def peer_of(self, other: "Side") -> PeerConfig:
        return PeerConfig(public_key(other.private), endpoint=("::1", other.device.listen_port),
                          allowed_ips=(ipaddress.ip_network(f"{other.ip}/32"),))

    def receive(self, timeout: float) -> bytes | None:
        """The next packet the device wrote to its TUN, or None within `timeout`."""
        if not select.select([self.tun], [], [], timeout)[0]:
            return None
        return self.tun.recv(65536)


@pytest.fixture(params=[1, 2], ids=["one-io-thread", "two-io-threads"])
def sides(request: pytest.FixtureRequest) -> Iterator[tuple[Side, Side]]:
    made: list[Side] = []
    try:
        a = Side(clamp(os.urandom(32)), "10.203.0.1", request.param)
        made.append(a)
        b = Side(clamp(os.urandom(32)), "10.203.0.2", request.param)
        made.append(b)
        a.device.set_peers([a.peer_of(b)])
        b.device.set_peers([b.peer_of(a)])
        yield a, b
    finally:
        for side in made:
            side.device.close()
            side.tun.close()


def install(side: Side, rules: list[FilterRule]) -> PacketFilter:
    pf = PacketFilter(rules)
    side.device.set_packet_filter(lambda p, k, now: pf.check(p, now), lambda p, k, now: pf.note_outbound(p, now))
    return pf


def test_call_soon_dataplane_runs_on_the_receive_thread(sides: tuple[Side, Side]) -> None:
    a, _ = sides
    inline = a.device.call_soon_dataplane(lambda: threading.current_thread().name)
    assert inline.result(0) == threading.current_thread().name  # not started: runs at once
    a.device.start()
    want = "wg-io" if a.device.io_threads == 1 else "wg-udp"
    assert a.device.call_soon_dataplane(lambda: threading.current_thread().name).result(5) == want
    with pytest.raises(ZeroDivisionError):  # an error reaches whoever waits
        a.device.call_soon_dataplane(lambda: 1 // 0).result(5)
    a.device.close()
    assert a.device.call_soon_dataplane(lambda: 42).result(0) == 42  # closed: inline again


def test_filter_hooks_across_two_devices(sides: tuple[Side, Side]) -> None:
    a, b = sides
    fa = install(a, [])                                 # a accepts only replies
    fb = install(b, [allow_tcp(a.ip, b.ip, 80)])        # b accepts a -> b:80
    a.device.start()
    b.device.start()

    # An allowed connection goes through (after the handshake its first packet started).
    syn = tcp4(a.ip, b.ip, 40000, 80)
    a.tun.send(syn)
    assert b.receive(10) == syn
    # Its reply passes a's filter: a's send path tracked the connection.
    synack = tcp4(b.ip, a.ip, 80, 40000, 0x12)
    b.tun.send(synack)
    assert a.receive(5) == synack
    assert fa.accepts[AcceptReason.REPLY] == 1

    # A port the rules do not name is dropped and counted by b; nothing reaches b's TUN.
    a.tun.send(tcp4(a.ip, b.ip, 40001, 81))
    wait_until(lambda: fb.drops[DropReason.NOT_ALLOWED] == 1, timeout=5, what="b's drop of port 81")
    assert b.device.drops().get("filtered") == 1 and b.receive(0) is None
    # So is a connection b opens to a: a has no rule for it.
    b.tun.send(tcp4(b.ip, a.ip, 50000, 22))
    wait_until(lambda: fa.drops[DropReason.NOT_ALLOWED] == 1, timeout=5, what="a's drop of port 22")
    assert a.receive(0) is None

    # New rules, applied on the receive thread, open port 81 and keep a's tracked connection.
    b.device.call_soon_dataplane(
        lambda: fb.set_rules([allow_tcp(a.ip, b.ip, 80), allow_tcp(a.ip, b.ip, 81)])).result(5)
    a.device.call_soon_dataplane(lambda: fa.set_rules([])).result(5)
    again = tcp4(a.ip, b.ip, 40002, 81)
    a.tun.send(again)
    assert b.receive(5) == again
    b.tun.send(synack)
    assert a.receive(5) == synack and fa.accepts[AcceptReason.REPLY] == 2

    # Removing the hooks lets everything through again.
    a.device.set_packet_filter(None)
    stray = tcp4(b.ip, a.ip, 50000, 22)
    b.tun.send(stray)
    assert a.receive(5) == stray
