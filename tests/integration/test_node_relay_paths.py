"""The path layer with the relay, on loopback: two WireGuard devices (a SEQPACKET socket pair
stands in for each TUN), their path runners and a real DERP relay in-process. Traffic starts on the
relay at once while no direct path is known, and moves to the direct path as soon as one answers."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from meshnode.node.pathmetrics import paths_text
from meshnode.node.pathrunner import PathRunner
from meshnode.paths import PathType
from meshnode.wg.crypto import public_key
from meshnode.wg.device import Device, open_udp
from meshnode.wg.engine import Engine
from meshnode.wg.peer import PeerConfig
from tests.integration.test_derp_relay import Relay
from tests.support import async_wait_until


@dataclass(frozen=True)
class FakePeer:  # the MapNode fields the runner reads
    node_key: str
    disco_key: str
    endpoints: tuple[str, ...]
    home_region: int | None = None


def ipv4_udp(src: str, dst: str, payload: bytes) -> bytes:
    total = 28 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0, 64, 17, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header + struct.pack("!HHHH", 5000, 5000, 8 + len(payload), 0) + payload


class Node:
    def __init__(self, addr: str) -> None:
        self.private = os.urandom(32)
        self.public = public_key(self.private)
        self.addr = addr
        self.tun, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.setblocking(False)
        self.tun.settimeout(0.1)
        self.device = Device(Engine(self.private), theirs.detach(), open_udp(None))
        self.runner = PathRunner(self.device, self.private)

    def map_entry(self, endpoint: str, home_region: int | None = None) -> FakePeer:
        return FakePeer(base64.b64encode(self.public).decode(),
                        base64.b64encode(self.runner.disco_key.public).decode(), (endpoint,), home_region)

    def received(self, want: bytes) -> bool:
        try:
            while True:
                if self.tun.recv(65536) == want:
                    return True
        except (TimeoutError, BlockingIOError):
            return False


def metric(lines: list[str], series: str) -> float:
    return float(next(x for x in lines if x.startswith(series + " ")).split()[-1])


def order(texts):
    from meshnode.node.tunnel import candidate_order
    return candidate_order(texts)


def test_traffic_starts_on_the_relay_and_moves_to_the_direct_path() -> None:
    async def main() -> None:
        a, b = Node("100.64.0.1"), Node("100.64.0.2")
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))  # a port that never answers: the map's endpoint at first
        dead_ep = f"127.0.0.1:{dead.getsockname()[1]}"
        async with Relay() as relay:
            try:
                for me, other in ((a, b), (b, a)):
                    me.device.engine.set_peers([PeerConfig(other.public, allowed_ips=(
                        ipaddress.ip_network(f"{other.addr}/32"),))])
                    me.device.start()
                    me.runner.start()
                    await me.runner.set_relay(7, [relay.url])
                    me.runner.set_peers([other.map_entry(dead_ep)], order)
                assert await a.runner.relay.wait_connected(3) and await b.runner.relay.wait_connected(3)
                # No direct path: the relay carries the first packet (handshake included) at once.
                assert a.runner.layer.path(b.public).type is PathType.RELAY
                packet = ipv4_udp(a.addr, b.addr, b"through the relay")
                a.tun.send(packet)
                await async_wait_until(lambda: b.received(packet), timeout=5, what="packet via relay")
                assert a.runner.counters["relay_sent"] >= 2  # handshake initiation + data
                path = b.runner.path_json(a.public)
                assert path["type"] == "relay" and path["relay_region"] == 7
                # What `meshnode daemon --metrics` serves for these runners.
                text = paths_text(a.runner).splitlines()
                assert 'meshnode_paths{type="relay"} 1' in text and 'meshnode_paths{type="direct"} 0' in text
                assert "meshnode_relay_home_region 7" in text and "meshnode_relay_connected 1" in text
                sent = metric(text, 'meshnode_relay_bytes_total{direction="sent"}')
                assert sent >= len(packet) and metric(text, 'meshnode_relay_packets_total{direction="sent"}') >= 2
                assert metric(paths_text(b.runner).splitlines(),
                              'meshnode_relay_bytes_total{direction="received"}') >= len(packet)

                # The map now has the real endpoints: the direct path answers and takes over.
                for me, other in ((a, b), (b, a)):
                    me.runner.set_peers([other.map_entry(f"127.0.0.1:{other.device.listen_port}")], order)
                await async_wait_until(
                    lambda: a.runner.layer.path(b.public).type is PathType.DIRECT
                    and b.runner.layer.path(a.public).type is PathType.DIRECT, timeout=5,
                    what="direct path found")
                relayed = a.runner.counters["relay_sent"]
                packet = ipv4_udp(a.addr, b.addr, b"direct now")
                a.tun.send(packet)
                await async_wait_until(lambda: b.received(packet), timeout=5, what="packet direct")
                assert a.runner.counters["relay_sent"] == relayed  # not through the relay any more
                assert a.runner.path_json(b.public)["endpoint"] == f"127.0.0.1:{b.device.listen_port}"
                text = paths_text(a.runner).splitlines()
                assert 'meshnode_paths{type="direct"} 1' in text and 'meshnode_paths{type="relay"} 0' in text
                assert metric(text, "meshnode_path_switches_total") >= 1
                assert metric(text, "meshnode_disco_pings_sent_total") >= 1
                assert metric(text, "meshnode_disco_pongs_received_total") >= 1
            finally:
                for n in (a, b):
                    await n.runner.close()
                    n.device.close()
                    n.tun.close()
                dead.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_peers_homed_on_different_regions_reach_each_other_through_the_relays() -> None:
    """Node a homes on region 1, node b on region 2 (two relay servers, no mesh between them); the
    map says where each homes. Each sends to the other's region, and both ways work."""
    async def main() -> None:
        a, b = Node("100.64.0.1"), Node("100.64.0.2")
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))
        dead_ep = f"127.0.0.1:{dead.getsockname()[1]}"
        async with Relay() as r1, Relay() as r2:
            try:
                homes = {a: 1, b: 2}
                for me, other in ((a, b), (b, a)):
                    me.device.engine.set_peers([PeerConfig(other.public, allowed_ips=(
                        ipaddress.ip_network(f"{other.addr}/32"),))])
                    me.device.start()
                    me.runner.start()
                    me.runner.set_relay_regions({1: [r1.url], 2: [r2.url]})
                    await me.runner.set_relay(homes[me], [(r1 if homes[me] == 1 else r2).url])
                    me.runner.set_peers([other.map_entry(dead_ep, homes[other])], order)
                assert await a.runner.relay.wait_connected(3) and await b.runner.relay.wait_connected(3)
                assert a.runner.layer.path(b.public).relay_region == 2
                assert b.runner.layer.path(a.public).relay_region == 1
                packet = ipv4_udp(a.addr, b.addr, b"across regions")
                a.tun.send(packet)
                await async_wait_until(lambda: b.received(packet), timeout=5, what="a -> b via region 2")
                back = ipv4_udp(b.addr, a.addr, b"and back")
                b.tun.send(back)
                await async_wait_until(lambda: a.received(back), timeout=5, what="b -> a via region 1")
                assert a.runner.path_json(b.public)["relay_region"] == 2
                assert set(a.runner._others) == {2} and set(b.runner._others) == {1}

                # a re-homes on region 2 (a faster measurement) and the map tells b: both are on
                # one region now, no extra client is left, and traffic still flows both ways.
                await a.runner.set_relay(2, [r2.url])
                b.runner.set_peers([a.map_entry(dead_ep, 2)], order)
                assert await a.runner.relay.wait_connected(3)
                assert not a.runner._others and not b.runner._others
                again = ipv4_udp(b.addr, a.addr, b"same region now")
                b.tun.send(again)
                await async_wait_until(lambda: a.received(again), timeout=5, what="b -> a on region 2")
                forth = ipv4_udp(a.addr, b.addr, b"and forth")
                a.tun.send(forth)
                await async_wait_until(lambda: b.received(forth), timeout=5, what="a -> b on region 2")
                await a.runner.set_relay(1, [r1.url])  # back home on 1 for the next step

                # The map stops naming b's home: a falls back to its own region and drops the
                # extra client (b is not there, so the relay path no longer reaches it).
                a.runner.set_peers([b.map_entry(dead_ep, None)], order)
                assert a.runner.layer.path(b.public).relay_region == 1 and not a.runner._others
            finally:
                for n in (a, b):
                    await n.runner.close()
                    n.device.close()
                    n.tun.close()
                dead.close()

    asyncio.run(asyncio.wait_for(main(), 60))
