"""NetMap JSON round trip and the NetMap -> DnsView bridge (meshnode.netmap)."""

import ipaddress

import pytest

from magicdns.records import parse_record
from magicdns.view import view_from_json
from meshnode.netmap import DnsConfig, MapNode, NetMap, NetMapError, netmap_to_view


def mk(i: int, name: str, **kw) -> MapNode:
    return MapNode(i, name, f"{name}.tailnet", "alice@example.com", (f"100.64.0.{i}", f"fd7a:115c:a1e0::{i}"),
                   "A" * 43 + "=", **kw)


def sample() -> NetMap:
    dns = DnsConfig(("1.1.1.1", "127.0.0.1:5301"), {"corp.example": ("10.0.0.53",), "internal.tailnet": ()},
                    ("tailnet",), (parse_record("grafana", "CNAME", "web", override=True),
                                   parse_record("txt", "TXT", '"hello world"')))
    return NetMap(7, "tailnet", mk(1, "laptop"),
                  (mk(2, "web", tags=("tag:server",), online=True, endpoints=("192.0.2.1:41641",),
                      approved_routes=("10.0.0.0/24",), exit_node=True, last_seen=12.5),),
                  dns, ({"src": ["*"], "dst": ["100.64.0.1/32"], "ports": "22", "protos": [6]},))


def test_round_trip() -> None:
    nm = sample()
    again = NetMap.from_json(nm.to_json())
    assert again.to_json() == nm.to_json()
    assert again.peers == nm.peers and again.self_node == nm.self_node


def test_view_carries_hosts_settings_and_override_flags() -> None:
    view = netmap_to_view(sample())
    assert view.self_host.name == "laptop"
    assert view.peers[0].addresses == (ipaddress.ip_address("100.64.0.2"), ipaddress.ip_address("fd7a:115c:a1e0::2"))
    assert view.peers[0].tags == ("tag:server",) and view.peers[0].online
    assert [r.override for r in view.dns.records] == [True, False]
    assert [u.spec for u in view.dns.nameservers] == ["1.1.1.1", "127.0.0.1:5301"]
    assert view.dns.routes["internal.tailnet"] == ()
    assert view.version == 7
    # The view JSON is the DESIGN.md section 2 format: it must read back identically.
    assert view_from_json(view.to_json()).to_json() == view.to_json()


def test_version_is_clamped_to_32_bits() -> None:
    nm = sample()
    big = NetMap(2**32 + 5, nm.domain, nm.self_node, nm.peers, nm.dns)
    assert netmap_to_view(big).version == 5


@pytest.mark.parametrize("mutate, field", [
    (lambda j: j.pop("self"), "self"),
    (lambda j: j["peers"][0].pop("node_key"), "node_key"),
    (lambda j: j["dns"]["records"].append({"name": "x", "type": "A", "value": "nope"}), "dns.records"),
    (lambda j: j.__setitem__("peers", {"a": 1}), "peers"),
])
def test_bad_maps_name_the_field(mutate, field: str) -> None:
    j = sample().to_json()
    mutate(j)
    with pytest.raises(NetMapError) as err:
        NetMap.from_json(j)
    assert field in str(err.value)


def test_bad_address_or_resolver_in_view_is_an_error() -> None:
    nm = sample()
    bad = NetMap(1, "tailnet", MapNode(1, "x", "x.tailnet", "u", ("300.1.1.1",), "k"), (), nm.dns)
    with pytest.raises(NetMapError):
        netmap_to_view(bad)
    bad_dns = NetMap(1, "tailnet", nm.self_node, (), DnsConfig(("dns.google",)))
    with pytest.raises(NetMapError):
        netmap_to_view(bad_dns)


def test_peer_lookup() -> None:
    nm = sample()
    assert nm.peer_by_name("WEB.tailnet.").id == 2 and nm.peer_by_name("nope") is None


def test_home_region_is_additive_and_checked() -> None:
    n = mk(2, "peer", home_region=901)
    assert n.to_json()["home_region"] == 901 and MapNode.from_json(n.to_json()) == n
    plain = mk(3, "old")
    assert "home_region" not in plain.to_json() and MapNode.from_json(plain.to_json()).home_region is None
    for bad in (0, -1, "901", True, 1.5):
        with pytest.raises(NetMapError, match="home_region"):
            MapNode.from_json({**n.to_json(), "home_region": bad})
