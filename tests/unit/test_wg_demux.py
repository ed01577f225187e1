"""One UDP socket carries WireGuard, disco and STUN (as Tailscale's does): the device hands what
is not WireGuard to the path layer's handler and keeps WireGuard to itself (loopback, no root)."""

from __future__ import annotations

import os
import queue
import socket
import time

from meshnode.disco import DiscoKey, Ping
from meshnode.wg.device import Device, open_udp
from meshnode.wg.engine import Drop, Engine

STUN_RESPONSE = bytes.fromhex("0101000c2112a442") + os.urandom(12) + bytes.fromhex("00200008000100011234abcd")
WG_INITIATION_GARBAGE = b"\x01\x00\x00\x00" + os.urandom(144)  # right type, bad MACs


def test_disco_and_stun_reach_the_handler_wireguard_does_not() -> None:
    r, w = os.pipe()
    device = Device(Engine(os.urandom(32)), r, open_udp(None))
    got: queue.Queue = queue.Queue()
    device.set_datagram_handler(lambda data, src: got.put((data, src)))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    try:
        device.start()
        disco = DiscoKey().box_with(DiscoKey().public).seal(Ping(b"t" * 12))
        for data in (WG_INITIATION_GARBAGE, disco, STUN_RESPONSE, b"\x04\x00\x00\x00" + bytes(40)):
            sender.sendto(data, ("127.0.0.1", device.listen_port))
        first, second = got.get(timeout=5), got.get(timeout=5)
        src = ("127.0.0.1", sender.getsockname()[1])
        assert {first, second} == {(disco, src), (STUN_RESPONSE, src)}
        assert got.empty()
        # And the way back: the path layer sends from the WireGuard socket itself.
        sender.settimeout(5)
        assert device.send_datagram(b"pong", src)
        data, addr = sender.recvfrom(100)
        assert data == b"pong" and addr[1] == device.listen_port
        deadline = time.monotonic() + 5
        while device.engine.drops[Drop.UNKNOWN_INDEX] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a counter the I/O thread sets, with a deadline
        assert device.engine.drops[Drop.UNKNOWN_INDEX] == 1  # the transport message
        assert device.engine.others == 2
    finally:
        device.close()
        os.close(w)
        sender.close()
