"""The first packets to a peer reachable only through the relay, in the order the daemon wires
things (tunnel.py: the device gets the peer with its first map endpoint, then the path runner its
relay regions and peers, then its home relay). Before the fixes the first handshake initiation went
to the map endpoint (dead) or into a DERP connection still logging in, and the packet waited for
WireGuard's retry 5 s later. Two WireGuard devices, their path runners and an in-process relay on
loopback (the harness of test_node_relay_paths.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time

from meshnode.paths import PathType
from meshnode.wg.peer import PeerConfig
from meshnode.wg.timers import REKEY_TIMEOUT
from tests.integration.test_derp_relay import Relay
from tests.integration.test_node_relay_paths import Node, ipv4_udp, order
from tests.support import async_wait_until

FIRST_PACKET_BOUND = 2.0  # well under REKEY_TIMEOUT: no handshake retry was needed


def test_first_packet_through_the_relay_does_not_wait_for_a_handshake_retry() -> None:
    assert FIRST_PACKET_BOUND < REKEY_TIMEOUT

    async def main() -> None:
        a, b = Node("100.64.0.1"), Node("100.64.0.2")
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))  # the map's endpoint: never answers (UDP blocked)
        dead_ep = ("127.0.0.1", dead.getsockname()[1])
        dead_text = f"127.0.0.1:{dead_ep[1]}"
        async with Relay() as relay:
            try:
                # b is up and homed on region 5 already.
                b.device.engine.set_peers([PeerConfig(a.public, endpoint=dead_ep, allowed_ips=(
                    ipaddress.ip_network(f"{a.addr}/32"),))])
                b.device.start()
                b.runner.start()
                b.runner.set_relay_regions({5: [relay.url]})
                b.runner.set_peers([a.map_entry(dead_text, 5)], order)
                await b.runner.set_relay(5, [relay.url])
                assert await b.runner.relay.wait_connected(3)

                # a comes up: its device knows b at the map endpoint, and a packet is waiting.
                a.device.engine.set_peers([PeerConfig(b.public, endpoint=dead_ep, allowed_ips=(
                    ipaddress.ip_network(f"{b.addr}/32"),))])
                a.device.start()
                a.runner.start()
                packet = ipv4_udp(a.addr, b.addr, b"first")
                t0 = time.monotonic()
                a.tun.send(packet)   # the initiation goes to the dead endpoint
                await async_wait_until(lambda: a.device.engine.drops or a.device.stats()[0].tx_bytes > 0,
                                       timeout=2, what="a's first initiation")
                a.runner.set_relay_regions({5: [relay.url]})
                a.runner.set_peers([b.map_entry(dead_text, 5)], order)
                # No home relay yet: no client for "another" region that is about to be the home.
                assert not a.runner._others
                await a.runner.set_relay(5, [relay.url])   # not connected yet when the path moves
                assert a.runner.layer.path(b.public).type is PathType.RELAY
                await async_wait_until(lambda: b.received(packet), timeout=REKEY_TIMEOUT + 2,
                                       what="the first packet through the relay")
                took = time.monotonic() - t0
                assert took < FIRST_PACKET_BOUND, f"the first packet took {took:.2f}s"
                assert not a.runner._others and not b.runner._others
            finally:
                for n in (a, b):
                    await n.runner.close()
                    n.device.close()
                    n.tun.close()
                dead.close()

    asyncio.run(asyncio.wait_for(main(), 60))
