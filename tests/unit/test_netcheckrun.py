"""The node's netcheck glue: printing in Tailscale's shape, the mapped endpoint first, and a
report without relays or a tunnel that asks nobody."""

from __future__ import annotations

import asyncio

import pytest

from meshnode.node.netcheckrun import NodeConnectivity, format_report


def _report(**over: object) -> dict:
    r = {"udp": True, "ipv4": True, "ipv6": False, "global_v4": "198.51.100.7:40001", "global_v6": None,
         "mapping_varies_by_dest_ip": True, "port_mapping": [], "preferred_relay": 2,
         "relay_latency_ms": {"999": 12.5, "2": 3.25}, "captive_portal": None, "nat": "behind a hard NAT",
         "port_mapping_detail": {"mapped": None}, "relay_regions": {"2": "fra", "999": "control"}}
    r.update(over)
    return r


def test_format_report_in_tailscales_shape() -> None:
    lines = format_report(_report())
    assert lines == ["\t* UDP works: true", "\t* IPv4: yes, 198.51.100.7:40001", "\t* IPv6: no",
                     "\t* MappingVariesByDestIP: true", "\t* PortMapping: none answered",
                     "\t* Nearest relay: 2 (fra)", "\t* Relay latency:", "\t\t- 2 (fra): 3.2ms",
                     "\t\t- 999 (control): 12.5ms", "\t* Captive portal: unknown", "\t* NAT: behind a hard NAT"]
    lines = format_report(_report(udp=False, global_v4=None, mapping_varies_by_dest_ip=None, relay_latency_ms={},
                                  preferred_relay=None, port_mapping=["PCP"], captive_portal=True,
                                  port_mapping_detail={"mapped": "198.51.100.7:41641", "protocol": "PCP"}))
    assert "\t* UDP works: false" in lines and "\t* IPv4: no" in lines
    assert "\t* MappingVariesByDestIP: unknown" in lines and "\t* Relay latency: none measured" in lines
    assert "\t  (mapped 198.51.100.7:41641 with PCP; reported first to the control server)" in lines
    assert "\t* Captive portal: yes" in lines and "\t* Nearest relay: -" in lines
    assert format_report({"mode": "dns-only"}) == []     # an older daemon's report prints as before


def test_without_relays_or_tunnel_nobody_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import meshnode.node.netcheckrun as nr

    def no(*a: object, **k: object) -> None:
        raise AssertionError("must not probe")

    monkeypatch.setattr(nr, "default_gateway", no)
    monkeypatch.setattr(nr, "run_netcheck", no)
    out = asyncio.run(NodeConnectivity().netcheck(None, "", 1.0, None))
    assert out["udp"] is False and out["port_mapping"] == [] and "no relay servers" in out["nat"]
    assert out["relay_regions"] == {}


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHNODE_DISABLE_PORTMAPPER", "1")
    conn = NodeConnectivity()

    async def go() -> None:
        conn.start_portmap(41641)
    asyncio.run(go())
    assert conn._mapper is None and conn.portmap_status()["enabled"] is False
