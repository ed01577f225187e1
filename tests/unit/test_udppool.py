"""udppool.py: spare upstream sockets, each used for one attempt, against a real loopback socket."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from magicdns.udppool import IDLE_AFTER, UdpSlot, UdpSockets
from tests.support import async_wait_until


class Owner:
    def __init__(self) -> None:
        self.got: list[bytes] = []

    def slot_readable(self, index: int, slot: UdpSlot) -> None:
        try:
            while True:
                self.got.append(slot.sock.recv(65535))
        except BlockingIOError:
            pass


def _peer() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def test_take_refill_release_and_close() -> None:
    async def main() -> None:
        peer = _peer()
        host, port = peer.getsockname()
        pool = UdpSockets(asyncio.get_running_loop(), spares=3)
        owner = Owner()
        first = pool.take(host, port, owner, 0, now=1.0)  # nothing ready: made on the spot
        assert pool.made == 1 and pool.from_spares == 0
        first.sock.send(b"q")
        data, src = peer.recvfrom(100)
        assert src == first.sock.getsockname()  # connected to the upstream: it sees our port
        peer.sendto(b"answer", src)
        await async_wait_until(lambda: owner.got == [b"answer"], what="the reply reaches its owner")
        pool.release(first)
        assert first.fd >= 0  # released, still open until recycle (after the reply is out)
        pool.recycle(now=1.0)
        assert first.fd == -1 and first.sock.fileno() == -1
        assert pool.spare_count(host, port) == 2  # the upstream needed one more than it had
        second = pool.take(host, port, owner, 1, now=2.0)
        assert pool.from_spares == 1 and second.sock.getsockname() != src
        pool.release(second)
        pool.close()
        assert second.fd == -1 and pool.spare_count(host, port) == 0
        peer.close()
    uvloop.run(main())


def test_spares_of_an_upstream_no_longer_asked_are_closed() -> None:
    async def main() -> None:
        peer = _peer()
        host, port = peer.getsockname()
        pool = UdpSockets(asyncio.get_running_loop(), spares=2)
        slot = pool.take(host, port, Owner(), 0, now=10.0)
        pool.release(slot)
        pool.recycle(now=10.0)
        spares = list(pool._by_addr[(host, port)].ready)
        assert spares
        pool.recycle(now=10.0 + IDLE_AFTER / 2)  # asked a while ago: kept
        assert pool.spare_count(host, port) == len(spares)
        pool.recycle(now=10.0 + IDLE_AFTER)  # nothing taken for IDLE_AFTER
        assert pool.spare_count(host, port) == 0 and all(s.fd == -1 for s in spares)
        pool.close()
        peer.close()
    uvloop.run(main())


def test_a_socket_that_cannot_be_had_is_an_oserror_and_leaves_nothing_open() -> None:
    async def main() -> None:
        pool = UdpSockets(asyncio.get_running_loop(), spares=2)
        with pytest.raises(OSError):
            pool.take("fe80::1", 53, Owner(), 0, now=0.0)  # link-local without a scope: connect fails
        assert pool.made == 0
        pool.close()
    uvloop.run(main())


def test_negative_spares_refused() -> None:
    with pytest.raises(ValueError):
        UdpSockets(asyncio.new_event_loop(), spares=-1)
