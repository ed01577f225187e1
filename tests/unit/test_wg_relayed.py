"""Relayed WireGuard datagrams on two real `Device`s in this process (TUNs stood in by datagram
socketpairs, as in test_wg_hooks.py), the relay itself stood in by handing each device's
`relay_out` batches to the other's `receive_relayed_many` on a thread of the test's own, as the
DERP client's event loop does: decrypted on that thread (no hand-off to the receive thread), yet
never at the same time as a `call_soon_dataplane` call, and dropped once the device is closed."""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
from typing import Any, Iterator

import pytest

from meshnode.wg.crypto import clamp, public_key
from meshnode.wg.device import relay_endpoint
from tests.support import wait_until
from tests.unit.test_wg_hooks import Side, tcp4


class Relay:
    """Carries each device's relayed datagrams to the other, on one thread (the 'event loop')."""

    def __init__(self, a: Side, b: Side) -> None:
        self.q: queue.Queue[tuple[Side, list[tuple[bytes, Any]]] | None] = queue.Queue()
        self.a, self.b = a, b
        self.thread = threading.Thread(target=self._run, name="relay-loop", daemon=True)
        a.device.relay_out = lambda items: self.q.put((b, [(d, relay_endpoint(1)) for d, _ in items]))
        b.device.relay_out = lambda items: self.q.put((a, [(d, relay_endpoint(1)) for d, _ in items]))
        self.thread.start()

    def _run(self) -> None:
        while (job := self.q.get()) is not None:
            side, items = job
            side.device.receive_relayed_many(items)

    def stop(self) -> None:
        self.q.put(None)
        self.thread.join(5)


@pytest.fixture(params=[1, 2], ids=["one-io-thread", "two-io-threads"])
def relayed(request: pytest.FixtureRequest) -> Iterator[tuple[Side, Side, Relay]]:
    made: list[Side] = []
    relay: Relay | None = None
    try:
        a = Side(clamp(os.urandom(32)), "10.204.0.1", request.param)
        made.append(a)
        b = Side(clamp(os.urandom(32)), "10.204.0.2", request.param)
        made.append(b)
        a.device.set_peers([a.peer_of(b)])
        b.device.set_peers([b.peer_of(a)])
        # Both reach each other only through the relay (peer id 1 on each side).
        assert a.device.set_endpoint(public_key(b.private), relay_endpoint(1))
        assert b.device.set_endpoint(public_key(a.private), relay_endpoint(1))
        relay = Relay(a, b)
        a.device.start()
        b.device.start()
        yield a, b, relay
    finally:
        if relay is not None:
            relay.stop()
        for side in made:
            side.device.close()
            side.tun.close()


def test_relayed_packets_are_decrypted_on_the_relay_thread(relayed: tuple[Side, Side, Relay]) -> None:
    a, b, _ = relayed
    threads: list[str] = []
    b.device.set_packet_filter(lambda p, k, now: threads.append(threading.current_thread().name) or True)
    for port in range(40000, 40020):
        packet = tcp4(a.ip, b.ip, port, 80)
        a.tun.send(packet)
        assert b.receive(10) == packet
    reply = tcp4(b.ip, a.ip, 80, 40000, 0x12)
    b.tun.send(reply)
    assert a.receive(5) == reply
    assert threads and set(threads) == {"relay-loop"}  # not the device's receive thread
    assert b.device.errors() == {"udp_send": 0, "tun_write": 0, "offload": 0}


def test_a_dataplane_call_waits_for_the_relayed_batch_in_progress(relayed: tuple[Side, Side, Relay]) -> None:
    """`call_soon_dataplane` (new filter rules) runs between two batches, relayed ones included:
    never while a relayed batch is inside the filter."""
    a, b, _ = relayed
    inside, release = threading.Event(), threading.Event()

    def slow_accept(packet: bytes, key: bytes, now: float) -> bool:
        inside.set()
        assert release.wait(10)
        return True

    b.device.set_packet_filter(slow_accept)
    first = tcp4(a.ip, b.ip, 40000, 80)
    a.tun.send(first)
    assert inside.wait(10), "no relayed packet reached b's filter"
    call = b.device.call_soon_dataplane(lambda: b.device.set_packet_filter(None))
    with pytest.raises(concurrent.futures.TimeoutError):
        call.result(0.3)                  # the batch is still in the filter: the call waits
    release.set()
    call.result(5)
    assert b.receive(5) == first


def test_relayed_datagrams_after_close_are_dropped(relayed: tuple[Side, Side, Relay]) -> None:
    a, b, _ = relayed
    packet = tcp4(a.ip, b.ip, 40000, 80)
    sealed: list[tuple[bytes, Any]] = []
    a.device.relay_out = sealed.extend    # keep a's datagrams instead of delivering them
    a.tun.send(packet)
    b.device.close()
    # a's handshake initiation or data (whichever a sends first) comes in after b closed.
    wait_until(lambda: bool(sealed), timeout=10, what="a datagram from a")
    b.device.receive_relayed_many([(d, relay_endpoint(1)) for d, _ in sealed])
    assert b.device.errors()["tun_write"] == 0 and b.receive(0.2) is None
