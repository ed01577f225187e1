"""Relay maps: Tailscale's DERPMap JSON in, our network-map JSON out and back, merging, and errors
that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshnode.derp.derpmap import RelayMap, RelayMapError, RelayMapFile, RelayNode, embedded_map
from meshnode.policy import PolicyError, parse_policy

TS = {"Regions": {"1": {"RegionID": 1, "RegionCode": "nyc", "RegionName": "New York",
                        "Nodes": [{"Name": "1a", "RegionID": 1, "HostName": "derp1.example", "IPv4": "192.0.2.1",
                                   "IPv6": "2001:db8::1", "STUNPort": 0, "DERPPort": 0},
                                  {"Name": "1b", "RegionID": 1, "HostName": "derp1b.example", "STUNPort": -1,
                                   "DERPPort": 8443}]}}}


def test_tailscale_format_defaults_and_round_trip() -> None:
    m = RelayMap.from_tailscale(TS)
    r = m.region(1)
    assert r is not None and (r.code, r.name) == ("nyc", "New York")
    assert r.nodes[0] == RelayNode("1a", 1, "derp1.example", 443, 3478, True, "192.0.2.1", "2001:db8::1")
    assert (r.nodes[1].port, r.nodes[1].stun_port) == (8443, -1)
    assert RelayMap.from_json(json.loads(m.dumps())) == m
    assert r.nodes[1].url() == "https://derp1b.example:8443/derp"
    assert r.urls() == ["https://derp1.example:443/derp", "https://derp1b.example:8443/derp"]


def test_merge_replaces_regions_by_id_unless_omit_default() -> None:
    base = embedded_map(999, "", 8080, tls=False)
    merged = base.merged(RelayMap.from_tailscale(TS))
    assert [r.region_id for r in merged.regions] == [1, 999]
    override = RelayMap.from_tailscale({"Regions": {"999": {"RegionID": 999, "Nodes": [{"HostName": "x"}]}}})
    assert merged.merged(override).region(999).nodes[0].host == "x"
    only = RelayMap.from_tailscale({"OmitDefaultRegions": True, **TS})
    assert [r.region_id for r in merged.merged(only).regions] == [1]


def test_empty_host_is_the_control_servers() -> None:
    node = embedded_map(999, "", 8080, tls=False).regions[0].nodes[0]
    assert node.url("http://ctrl.example:8080") == "http://ctrl.example:8080/derp"
    assert node.url("http://[::1]:8080") == "http://[::1]:8080/derp"
    with pytest.raises(RelayMapError):
        node.url("")


@pytest.mark.parametrize("bad, where", [
    ([], "derpMap"),
    ({"Regions": []}, "Regions"),
    ({"Regions": {"1": {"RegionID": 2, "Nodes": [{}]}}}, "does not match"),
    ({"Regions": {"1": {"RegionID": 1, "Nodes": []}}}, "no servers"),
    ({"Regions": {"1": {"RegionID": 1, "Nodes": [{"DERPPort": 70000}]}}}, "DERPPort"),
    ({"Regions": {"1": {"RegionID": 1, "Nodes": [{"IPv4": "2001:db8::1"}]}}}, "IPv4"),
    ({"Regions": {"1": {"RegionID": 1, "Nodes": [{"HostName": "a b"}]}}}, "HostName"),
    ({"Regions": {"1": {"RegionID": 1, "Nodes": [{"RegionID": 3}]}}}, "RegionID"),
    ({"Regions": {}, "Surprise": 1}, "Surprise"),
    ({"Regions": {"0": {"RegionID": 0, "Nodes": [{}]}}}, "RegionID"),
])
def test_errors_name_the_field(bad: object, where: str) -> None:
    with pytest.raises(RelayMapError, match=where):
        RelayMap.from_tailscale(bad)


def test_policy_derp_map_section() -> None:
    policy = parse_policy(json.dumps({"acls": [], "derpMap": TS}))
    assert policy.derp_map == RelayMap.from_tailscale(TS) and "derpMap" not in policy.ignored_sections
    with pytest.raises(PolicyError, match="derpMap"):
        parse_policy(json.dumps({"acls": [], "derpMap": {"Regions": {"1": {"RegionID": 1, "Nodes": []}}}}))


def test_map_file_keeps_the_last_good_map(tmp_path: Path) -> None:
    p = tmp_path / "m.json"
    p.write_text(json.dumps(TS))
    f = RelayMapFile(str(p))
    good = f.current
    p.write_text('{"Regions": {"1": {"RegionID": 1, "Nodes": []}}}   ')
    assert not f.reload() and f.current == good and "no servers" in (f.error or "")
    p.write_text(json.dumps({"Regions": {"7": {"RegionID": 7, "Nodes": [{"HostName": "h"}]}}}))
    assert f.reload() and f.current.region(7) is not None and f.error is None
    p.write_text("nope")
    with pytest.raises(RelayMapError):
        RelayMapFile(str(p))


def test_relay_urls() -> None:
    from meshnode.derp.client import parse_relay_url
    assert parse_relay_url("https://relay.example") == ("https", "relay.example", 443, "/derp", True)
    assert parse_relay_url("http://127.0.0.1:8080/derp") == ("http", "127.0.0.1", 8080, "/derp", False)
    assert parse_relay_url("[::1]:80") == ("http", "::1", 80, "/derp", False)
    for bad in ("ftp://x/derp", "http://", ""):
        with pytest.raises(ValueError):
            parse_relay_url(bad)
