"""The device's send path on loopback: runs of datagrams go out as UDP GSO sends and arrive
intact and in order, whatever their sizes (no root needed: no TUN is opened)."""

from __future__ import annotations

import os
import socket

import pytest

from meshnode.wg.device import Device, open_udp
from meshnode.wg.engine import Engine


@pytest.fixture
def device_and_receiver():
    receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    receiver.bind(("::1", 0))
    receiver.settimeout(5)
    r, w = os.pipe()  # stands in for the TUN fd: _transmit never touches it
    device = Device(Engine(bytes(32)), r, open_udp(None))
    try:
        yield device, receiver
    finally:
        device.close()
        os.close(w)
        receiver.close()


@pytest.mark.parametrize("sizes", [
    [1296] * 64 + [1296] * 3,         # more than one GSO run
    [1296] * 10 + [80],               # a shorter last datagram ends a run
    [80, 1296, 1296, 32],             # a longer one starts a new run
    [1312] * 51,                      # full 1280-MTU packets: a run must stay under 65507 bytes
])
def test_gso_runs_arrive_intact(device_and_receiver, sizes: list[int]) -> None:
    device, receiver = device_and_receiver
    ep = receiver.getsockname()
    out = [(i.to_bytes(16, "big"), os.urandom(n - 16), ep) for i, n in enumerate(sizes)]
    device._transmit(out)
    got = [receiver.recv(65536) for _ in sizes]
    assert got == [h + b for h, b, _ in out]
    assert device.errors() == {"udp_send": 0, "tun_write": 0, "offload": 0}
