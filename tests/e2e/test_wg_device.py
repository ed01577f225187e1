"""Two in-process `Device`s in two namespaces, driven through the live API the node daemon uses:
peers removed and re-added, a private key changed, a packet filter installed, stats read."""

from __future__ import annotations

import ipaddress
import os
from typing import Iterator

import pytest

from meshnode.wg.crypto import clamp, public_key
from meshnode.wg.device import Device, create_device
from meshnode.wg.peer import PeerConfig
from tests.e2e.netns import NetnsPair, check_tcp_transfer, in_netns
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]

A_IP, B_IP = "10.202.0.1", "10.202.0.2"
PORT = 51830


def peer(pub: bytes, ip: str, endpoint: str | None) -> PeerConfig:
    ep = (endpoint, PORT) if endpoint else None  # the device converts it for its socket
    return PeerConfig(pub, endpoint=ep, allowed_ips=(ipaddress.ip_network(f"{ip}/32"),))


@pytest.fixture(params=[1, 2], ids=["one-io-thread", "two-io-threads"])
def devices(request: pytest.FixtureRequest) -> Iterator[tuple[NetnsPair, Device, Device, bytes, bytes]]:
    pair = NetnsPair.create("mnwd", subnet="10.199.0")
    made: list[Device] = []
    try:
        a_key, b_key = clamp(os.urandom(32)), clamp(os.urandom(32))
        for ns, key, other, ip, other_ip, ep in ((pair.a, a_key, b_key, A_IP, B_IP, pair.b_addr),
                                                 (pair.b, b_key, a_key, B_IP, A_IP, pair.a_addr)):
            made.append(in_netns(ns.name, lambda: create_device(
                key, f"t{ns.name}"[:15], addresses=[ipaddress.ip_interface(f"{ip}/24")],
                listen_port=PORT, peers=[peer(public_key(other), other_ip, ep)],
                io_threads=request.param)))
        yield pair, made[0], made[1], a_key, b_key
    finally:
        for d in made:
            d.close()
        pair.destroy()


def reaches(pair: NetnsPair, dst: str) -> bool:
    ns = pair.a if dst == B_IP else pair.b
    return ns.ping(dst, timeout=0.5) is not None


def test_live_api(devices: tuple[NetnsPair, Device, Device, bytes, bytes]) -> None:
    pair, a, b, a_key, b_key = devices
    a_pub, b_pub = public_key(a_key), public_key(b_key)
    wait_until(lambda: reaches(pair, B_IP), timeout=10, what="first handshake")
    (sa,) = a.stats()
    assert sa.public_key == b_pub and sa.endpoint == (pair.b_addr, PORT)
    assert sa.last_handshake is not None and sa.rx_bytes > 0 and sa.tx_bytes > 0

    # Bulk TCP both ways goes through GSO sends, GRO reads and coalesced TUN writes, error-free.
    check_tcp_transfer(pair.b, B_IP, pair.a, 2 << 20)
    check_tcp_transfer(pair.a, A_IP, pair.b, 2 << 20)
    assert a.errors() == b.errors() == {"udp_send": 0, "tun_write": 0, "offload": 0}
    assert a.stats()[0].tx_bytes > 2 << 20

    # The ACL hook: drop ICMP from the tunnel, counted; then let it through again.
    b.set_packet_filter(lambda packet, peer_key, now: packet[9] != 1)
    assert not reaches(pair, B_IP)
    assert b.drops().get("filtered", 0) >= 1
    b.set_packet_filter(None)
    assert reaches(pair, B_IP)

    # A peer removed is unreachable at once (its sessions go too); re-added, it comes back.
    b.remove_peer(a_pub)
    assert b.stats() == [] and not reaches(pair, B_IP)
    b.set_peers([peer(a_pub, A_IP, pair.a_addr)])
    # b has no session now and starts a handshake; a would otherwise keep using its old session
    # until its KEEPALIVE + REKEY_TIMEOUT (15 s) of silence ran out, as in any WireGuard.
    wait_until(lambda: reaches(pair, A_IP), timeout=15, what="peer re-added")
    assert reaches(pair, B_IP)

    # a changes its key; b learns the new one from the (simulated) network map.
    new_a = clamp(os.urandom(32))
    a.set_private_key(new_a)
    b.set_peers([peer(public_key(new_a), A_IP, pair.a_addr)])
    wait_until(lambda: reaches(pair, A_IP), timeout=15, what="re-keyed peer")
    assert [s.public_key for s in b.stats()] == [public_key(new_a)]

    # Allowed IPs move live: b routes and accepts 10.202.0.9 from a only after the change.
    extra = "10.202.0.9"
    pair.a.run("ip", "addr", "add", f"{extra}/32", "dev", a.ifname)
    b.set_peers([PeerConfig(public_key(new_a), endpoint=(pair.a_addr, PORT),
                            allowed_ips=(ipaddress.ip_network(f"{A_IP}/32"),
                                         ipaddress.ip_network(f"{extra}/32")))])
    a.set_peers([peer(b_pub, B_IP, pair.b_addr)])
    assert pair.b.ping(extra, timeout=2) is not None
