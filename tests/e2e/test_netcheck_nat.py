"""End to end: `meshnode netcheck` of a node daemon (`--tun`) behind a NAT made of namespaces
(tests/e2e/portmap_lab.py), with the control server (`--derp`, STUN on udp/3478, region 999) and a
standalone relay (`derp serve`, STUN on udp/3479, region 2 from `--derp-map`) on two WAN addresses,
so the NAT's mapping toward two destinations can be compared.

- `masquerade` (endpoint independent) with miniupnpd on the router: UDP works, the router's WAN
  address is the global address, the mapping does not vary, NAT-PMP and PCP answer, both relay
  regions have a latency, the NAT is called "easy"; and the daemon reports the port-mapped
  address first among its endpoints at the control server.
- `masquerade random` (a new port per destination): the mapping varies, the NAT is called "hard".
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.portmap_lab import GW_WAN_IP, WAN_IP, WAN_IP2, NatLab
from tests.e2e.netns import MESHNODE, run
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]

CONTROL = f"http://{WAN_IP}:8080"


class Site:
    def __init__(self, lab: NatLab, root: Path) -> None:
        self.lab, self.root = lab, root
        self.db = root / "control.db"

    def start(self) -> None:
        lab, root = self.lab, self.root
        derp_map = root / "derpmap.json"
        derp_map.write_text(json.dumps({"Regions": {"2": {"RegionID": 2, "RegionCode": "r2", "RegionName": "Second",
                                                          "Nodes": [{"Name": "2a", "RegionID": 2, "HostName": WAN_IP2,
                                                                     "IPv4": WAN_IP2, "DERPPort": 8443,
                                                                     "STUNPort": 3479, "HTTPOnly": True}]}}}))
        lab.lab.popen(lab.wan, *MESHNODE, "control", "serve", "--listen", f"{WAN_IP}:8080", "--db", str(self.db),
                      "--derp", "--stun-port", "3478", "--derp-map", str(derp_map), log=root / "control.log")
        lab.lab.popen(lab.wan, *MESHNODE, "derp", "serve", "--listen", f"{WAN_IP2}:8443", "--stun-port", "3479",
                      "--admit-any", log=root / "derp.log")
        for host, port in ((WAN_IP, 8080), (WAN_IP2, 8443)):
            wait_until(lambda: run("ip", "netns", "exec", lab.wan, sys.executable, "-c",
                                   f"import socket; socket.create_connection(('{host}', {port}), 1).close()",
                                   check=False).returncode == 0, timeout=30, what=f"{host}:{port} listening")
        (root / "node").mkdir()
        lab.lab.write_resolv_conf(lab.lan, "nameserver 10.61.0.1\n")
        lab.lab.popen(lab.lan, *MESHNODE, "daemon", "--state-dir", str(root / "node" / "state"), "--socket",
                      str(root / "node" / "mn.sock"), "--tun", "mn0", "--resolv-conf",
                      f"/etc/netns/{lab.lan}/resolv.conf", "-v", log=root / "node" / "daemon.log")
        # a fresh daemon answers `status` with "Logged out" (exit 1): it is up
        wait_until(lambda: "Logged out" in self.cli("status", check=False).stdout, timeout=20, what="daemon")
        key = run(*MESHNODE, "control", "authkey", "create", "--reusable", "--db", str(self.db)).stdout.strip()
        self.cli("up", "--login-server", CONTROL, "--authkey", key, "--hostname", "n1")

    def cli(self, *args: str, check: bool = True) -> Any:
        return run("ip", "netns", "exec", self.lab.lan, *MESHNODE, "--socket", str(self.root / "node" / "mn.sock"),
                   *args, check=check, timeout=60)

    def netcheck(self) -> dict[str, Any]:
        return json.loads(self.cli("netcheck", "--json").stdout)


def _site(tmp_path: Path, masquerade: str, miniupnpd: bool) -> tuple[NatLab, Site]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    lab = NatLab.create(masquerade)
    try:
        if miniupnpd:
            lab.start_miniupnpd(tmp_path)
        site = Site(lab, tmp_path)
        site.start()
    except BaseException:
        lab.destroy()
        raise
    return lab, site


@pytest.mark.skipif(shutil.which("miniupnpd") is None, reason="miniupnpd-nftables not installed")
def test_easy_nat_with_port_mapping(tmp_path: Path) -> None:
    lab, site = _site(tmp_path, "masquerade", miniupnpd=True)
    try:
        # the map (with both relay regions) has arrived once `up` returned; the mapping may take a moment
        wait_until(lambda: (site.netcheck().get("port_mapping_detail") or {}).get("mapped"), timeout=20,
                   what="the daemon's port mapping")
        r = site.netcheck()
        assert r["udp"] is True and r["ipv4"] is True
        assert r["global_v4"].rsplit(":", 1)[0] == GW_WAN_IP
        assert r["mapping_varies_by_dest_ip"] is False
        assert r["port_mapping"] == ["PCP", "NAT-PMP", "UPnP"]
        assert set(r["relay_latency_ms"]) == {"999", "2"} and all(v >= 0 for v in r["relay_latency_ms"].values())
        assert r["preferred_relay"] in (999, 2)
        assert r["captive_portal"] is False
        assert "endpoint-independent" in r["nat"]
        assert set(r) >= {"udp", "ipv4", "ipv6", "global_v4", "global_v6", "mapping_varies_by_dest_ip",
                          "port_mapping", "preferred_relay", "relay_latency_ms", "captive_portal", "nat"}
        # the port-mapped address goes first among the endpoints the control server has
        mapped = r["port_mapping_detail"]["mapped"]
        assert mapped.startswith(GW_WAN_IP + ":")
        wait_until(lambda: (site.netcheck()["endpoints"]["at_control"] or [None])[0] == mapped, timeout=10,
                   what="the mapped endpoint first at the control server")
        human = site.cli("netcheck").stdout
        assert "\t* UDP works: true" in human and f"\t* IPv4: yes, {GW_WAN_IP}:" in human
        assert "\t* MappingVariesByDestIP: false" in human and "\t* PortMapping: PCP, NAT-PMP, UPnP" in human
        assert "\t\t- 999" in human and "\t\t- 2 (r2)" in human and "endpoint-independent" in human
        assert "\t* Control server: http://" in human  # the report tests already rely on is still there
        # `down` deletes the mapping at the gateway
        site.cli("down")
        wait_until(lambda: "dnat" not in run("ip", "netns", "exec", lab.rtr, "nft", "list", "chain", "inet",
                                             "filter", "prerouting_miniupnpd").stdout,
                   timeout=10, what="the mapping deleted at the gateway")
    finally:
        lab.destroy()


def test_hard_nat_mapping_varies(tmp_path: Path) -> None:
    lab, site = _site(tmp_path, "masquerade random", miniupnpd=False)
    try:
        r = site.netcheck()
        assert r["udp"] is True and r["global_v4"].rsplit(":", 1)[0] == GW_WAN_IP
        assert r["mapping_varies_by_dest_ip"] is True
        assert r["port_mapping"] == []
        assert "hard" in r["nat"]
        human = site.cli("netcheck").stdout
        assert "\t* MappingVariesByDestIP: true" in human and "\t* PortMapping: none answered" in human
    finally:
        lab.destroy()
