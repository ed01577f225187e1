"""The tunnel's pure part: a network map turned into WireGuard peers and interface addresses."""

from __future__ import annotations

import base64
import ipaddress

from meshnode.netmap import MapNode, NetMap
from meshnode.node.tunnel import KEEPALIVE, peer_configs, self_interfaces

KEY = base64.b64encode(bytes(range(32))).decode()


def node(i: int, **kw) -> MapNode:  # noqa: ANN003
    base = dict(id=i, name=f"n{i}", fqdn=f"n{i}.tailnet", user="u",
                addresses=(f"100.64.0.{i}", f"fd7a:115c:a1e0::{i}"), node_key=KEY,
                allowed_ips=(f"100.64.0.{i}/32", f"fd7a:115c:a1e0::{i}/128"))
    base.update(kw)
    return MapNode(**base)


def test_peers_carry_key_endpoint_allowed_ips_and_keepalive() -> None:
    nm = NetMap(1, "tailnet", node(1), (node(2, endpoints=("bogus", "192.0.2.2:41641", "[2001:db8::2]:41641")),))
    (peer,) = peer_configs(nm)
    assert peer.public_key == bytes(range(32))
    assert peer.endpoint == ("192.0.2.2", 41641)  # the first usable one
    assert peer.allowed_ips == (ipaddress.ip_network("100.64.0.2/32"), ipaddress.ip_network("fd7a:115c:a1e0::2/128"))
    assert peer.persistent_keepalive == KEEPALIVE


def test_exit_routes_only_for_the_chosen_exit_node() -> None:
    exits = ("0.0.0.0/0", "::/0")
    nm = NetMap(1, "tailnet", node(1), (node(2, allowed_ips=node(2).allowed_ips + exits, exit_node=True),
                                        node(3, allowed_ips=node(3).allowed_ips + exits, exit_node=True)))
    assert all(p.allowed_ips[-1].prefixlen > 0 for p in peer_configs(nm))
    chosen = {p.endpoint or i: p for i, p in enumerate(peer_configs(nm, exit_node="n3.tailnet"))}
    assert [p.allowed_ips[-1].prefixlen for p in chosen.values()] == [128, 0]


def test_peers_with_unusable_keys_are_skipped() -> None:
    nm = NetMap(1, "tailnet", node(1), (node(2, node_key="not base64!"), node(3, node_key="AAAA"), node(4)))
    assert len(peer_configs(nm)) == 1


def test_self_addresses_are_host_routes() -> None:
    nm = NetMap(1, "tailnet", node(7))
    assert [str(i) for i in self_interfaces(nm)] == ["100.64.0.7/32", "fd7a:115c:a1e0::7/128"]


def test_icmp_echo_round_trip() -> None:
    from meshnode.node.icmp import checksum, echo_request, parse_echo_reply
    req = echo_request(0x1234, 7, b"payload")
    assert checksum(req) == 0
    # The reply as the kernel would hand it to a raw socket: IPv4 header, then the echo reply.
    reply_icmp = bytearray(req)
    reply_icmp[0] = 0
    reply_icmp[2:4] = b"\0\0"
    reply_icmp[2:4] = checksum(bytes(reply_icmp)).to_bytes(2, "big")
    ip_header = bytes([0x45]) + bytes(19)
    assert parse_echo_reply(ip_header + bytes(reply_icmp)) == (0x1234, 7)
    assert parse_echo_reply(ip_header + req) is None  # a request is not a reply
    corrupted = bytearray(reply_icmp)
    corrupted[-1] ^= 1
    assert parse_echo_reply(ip_header + bytes(corrupted)) is None


def test_relay_choice_takes_the_first_region_with_usable_servers() -> None:
    from dataclasses import dataclass, replace

    from meshnode.node.tunnel import relay_choice

    @dataclass(frozen=True)
    class Server:
        host: str

        def url(self, control_url: str = "") -> str:
            if not self.host and not control_url:
                raise ValueError("no host")
            return f"http://{self.host or control_url.split('//')[1]}/derp"

    @dataclass(frozen=True)
    class Region:
        region_id: int
        nodes: tuple

    @dataclass(frozen=True)
    class Map:
        regions: tuple

    nm = NetMap(1, "tailnet", node(1))
    assert relay_choice(nm) is None  # a map without relays
    relays = Map((Region(1, (Server(""),)), Region(2, (Server("r2a"), Server("r2b")))))
    nm2 = replace(nm, derp_map=relays) if hasattr(nm, "derp_map") else _WithMap(nm, relays)
    assert relay_choice(nm2) == (2, ["http://r2a/derp", "http://r2b/derp"])  # region 1 has no host
    assert relay_choice(nm2, "http://control:8080") == (1, ["http://control:8080/derp"])
    from meshnode.node.tunnel import relay_regions
    assert relay_regions(nm) == {}
    assert relay_regions(nm2) == {2: ["http://r2a/derp", "http://r2b/derp"]}  # peers homed on 1: unreachable
    assert relay_regions(nm2, "http://control:8080") == {1: ["http://control:8080/derp"],
                                                         2: ["http://r2a/derp", "http://r2b/derp"]}


class _WithMap:
    def __init__(self, nm, derp_map) -> None:  # noqa: ANN001
        self.nm, self.derp_map = nm, derp_map


def test_parsed_texts_are_reused_and_bad_ones_still_skipped() -> None:
    """Allowed IPs and endpoints are parsed once per process (a cache): the second map gives the
    same peers, and a bad CIDR or an endpoint that is not text is skipped, every time."""
    odd = node(5, endpoints=(["x"], 7, "bad", "[2001:db8::1]:9", "192.0.2.1:7"),   # type: ignore[arg-type]
               allowed_ips=("100.64.0.5/32", "nope/99", "fd7a:115c:a1e0::5/128"))
    nm = NetMap(1, "tailnet", node(1), (node(2, endpoints=("192.0.2.2:41641",)), odd))
    first = peer_configs(nm)
    assert peer_configs(nm) == first
    assert [c.endpoint for c in first] == [("192.0.2.2", 41641), ("2001:db8::1", 9)]
    assert [str(n) for n in first[1].allowed_ips] == ["100.64.0.5/32", "fd7a:115c:a1e0::5/128"]


def test_the_builder_gives_what_peer_configs_gives_as_peers_prefs_and_subnets_change() -> None:
    """PeerConfigBuilder reuses the configs of peers a map did not change; after every change it
    must equal a fresh `peer_configs` of the same map and prefs."""
    from dataclasses import replace as change

    from meshnode.node.tunnel import PeerConfigBuilder

    router = node(3, endpoints=("10.77.0.3:41641", "192.0.2.3:41641"), approved_routes=("10.77.0.0/24",),
                  allowed_ips=("100.64.0.3/32", "fd7a:115c:a1e0::3/128", "10.77.0.0/24"))
    exit_ = node(4, exit_node=True, endpoints=("192.0.2.4:41641",),
                 allowed_ips=("100.64.0.4/32", "fd7a:115c:a1e0::4/128", "0.0.0.0/0", "::/0"))
    peers = [node(2, endpoints=("10.77.0.9:41641", "192.0.2.2:1")), router, exit_,
             node(5, node_key="bad"), node(6, endpoints=("198.51.100.6:6",))]
    b = PeerConfigBuilder()
    steps = [("", False), ("", True), ("n4", True), ("n4", False)]
    for exit_node, accept in steps:
        nm = NetMap(1, "tailnet", node(1), tuple(peers))
        got = b.build(nm, exit_node, accept)
        assert got == peer_configs(nm, exit_node, accept), (exit_node, accept)
        again = b.build(nm, exit_node, accept)
        assert again == got and all(x is y for x, y in zip(again, got))   # nothing changed: reused
    # One peer's endpoint changes: only its config is new.
    before = b.build(NetMap(1, "tailnet", node(1), tuple(peers)), "n4", False)
    peers[4] = change(peers[4], endpoints=("198.51.100.7:7",))
    nm = NetMap(1, "tailnet", node(1), tuple(peers))
    after = b.build(nm, "n4", False)
    assert after == peer_configs(nm, "n4", False)
    assert [x is y for x, y in zip(before, after)] == [True, True, True, False]
    # The subnet router stops routing 10.77.0.0/24: node 2's endpoint there no longer loops, so
    # every config whose endpoint choice depends on the subnets is derived again.
    assert b.build(NetMap(1, "tailnet", node(1), tuple(peers)), "", True)[0].endpoint == ("192.0.2.2", 1)
    peers[1] = change(router, allowed_ips=router.allowed_ips[:2], approved_routes=())
    nm = NetMap(1, "tailnet", node(1), tuple(peers))
    assert b.build(nm, "", True) == peer_configs(nm, "", True)
    assert b.build(nm, "", True)[0].endpoint == ("10.77.0.9", 41641)
