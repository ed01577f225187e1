"""End to end: the relay (DERP, embedded in the control server with `--derp`) carries traffic at
once when UDP between two nodes is blocked, the path moves to direct when UDP is let through, and
falls back to the relay within 7 s when UDP is blocked again. Two node daemons on the bridged LAN
of test_node_tunnel.py; nftables in each node namespace blocks UDP between the nodes."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.test_node_routing import CONTROL, Tailnet
from tests.e2e.test_node_tunnel import MESHNODE, WHO_SERVER, Lan, ask, run
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]

BLOCK = """
table inet lab {
  chain input {
    type filter hook input priority 0; policy accept;
    ip saddr { 10.78.0.11, 10.78.0.12 } meta l4proto udp drop
  }
}
"""


def relay_supported() -> bool:
    return "--derp" in run(*MESHNODE, "control", "serve", "--help").stdout


METRICS = "127.0.0.1:9100"  # inside each node's own namespace


def scrape(net: Tailnet, i: int) -> dict[str, float]:
    """node `i`'s `--metrics` page, series -> value."""
    r = net.sh(i, sys.executable, "-c", "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
               f"'http://{METRICS}/metrics', timeout=5).read().decode())")
    assert r.returncode == 0, r.stderr
    return {x.rsplit(" ", 1)[0]: float(x.rsplit(" ", 1)[1]) for x in r.stdout.splitlines()
            if x and not x.startswith("#")}


class RelayTailnet(Tailnet):
    def start_daemon(self, i: int) -> None:
        d, ns = self.dir(i), self.ns(i)
        self.daemons[i] = self.lan.popen(ns, *MESHNODE, "daemon", "--state-dir", str(d / "state"), "--socket",
                                         str(d / "mn.sock"), "--tun", "mn0", "--resolv-conf",
                                         f"/etc/netns/{ns}/resolv.conf", "--metrics", METRICS, "-v",
                                         log=d / "daemon.log")

    def start(self, listen: str = CONTROL) -> None:
        self.lan.popen(self.lan.ctl, *MESHNODE, "control", "serve", "--listen", listen, "--db", str(self.db),
                       "--derp", log=self.lan.root / "control.log")
        for i in range(1, len(self.lan.nodes) + 1):
            self.dir(i).mkdir()
            self.start_daemon(i)
        for i in range(1, len(self.lan.nodes) + 1):
            self.wait_daemon(i)
        wait_until(lambda: self.sh(1, sys.executable, "-c", "import socket; socket.create_connection("
                                   "('10.78.0.1', 8080), 1).close()").returncode == 0,
                   timeout=20, what="control server")


def block(net: Tailnet, on: bool) -> None:
    for i in (1, 2):
        run("ip", "netns", "exec", net.ns(i), "nft", "delete", "table", "inet", "lab", check=False)
        if on:
            (net.lan.root / "block.nft").write_text(BLOCK)
            run("ip", "netns", "exec", net.ns(i), "nft", "-f", str(net.lan.root / "block.nft"))


def ctl_home(net: Tailnet, i: int) -> object:
    """The home region node `i` reported, as its peer's map has it (from the control server)."""
    peers = net.status(3 - i)["peers"]
    return peers[0].get("home_region") if peers else None


def path(net: Tailnet, i: int) -> dict:
    peers = net.status(i)["peers"]
    return (peers[0].get("path") or {}) if peers else {}


@pytest.fixture
def relay_net(tmp_path: Path) -> Iterator[Tailnet]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    if not relay_supported():
        pytest.skip("this control server has no embedded relay (--derp) yet")
    lan = Lan(tmp_path, 2)
    try:
        lan.build()
        yield RelayTailnet(lan)
    finally:
        lan.destroy()


def test_relay_first_then_direct_then_relay_again(relay_net: Tailnet) -> None:
    net = relay_net
    block(net, True)
    net.start()
    key = net.control("authkey", "create", "--reusable")
    for i in (1, 2):
        net.cli(i, "up", "--login-server", f"http://{CONTROL}", "--authkey", key, "--hostname", f"node{i}")
        net.lan.popen(net.ns(i), sys.executable, "-c", WHO_SERVER, f"node{i}", log=net.lan.root / f"who{i}.log")
    addr2 = net.status(2)["self"]["addresses"][0]

    # UDP between the nodes is blocked: the relay carries the traffic from the start.
    wait_until(lambda: ask(net.ns(1), "node2.tailnet", "4").startswith("node2 "), timeout=15,
               what="node1 reaching node2 through the relay")
    p = path(net, 1)
    assert p["type"] == "relay" and p["endpoint"] is None and p["relay_region"] == 999
    assert 'relay "999"' in net.cli(1, "status").stdout
    assert f"pong from node2 ({addr2}) via DERP(999) in " in net.cli(1, "ping", "node2", "-c", "1").stdout
    # Each node measured the one region, homes there, and told the control server: peers see it.
    wait_until(lambda: ctl_home(net, 2) == 999, timeout=10, what="node2's home region in node1's map")
    m = scrape(net, 1)
    assert m['meshnode_paths{type="relay"}'] == 1 and m['meshnode_paths{type="direct"}'] == 0
    assert m['meshnode_relay_bytes_total{direction="sent"}'] > 0
    assert m['meshnode_relay_bytes_total{direction="received"}'] > 0
    assert m["meshnode_relay_home_region"] == 999 and m["meshnode_relay_connected"] == 1
    assert m["meshnode_disco_pings_sent_total"] > 0 and m["meshnode_stun_queries_total"] > 0

    # UDP let through: a direct path answers and takes over.
    block(net, False)
    t = time.monotonic()
    wait_until(lambda: path(net, 1).get("type") == "direct" and path(net, 2).get("type") == "direct",
               timeout=15, what="both sides direct once UDP passes")
    assert path(net, 1)["endpoint"] == "10.78.0.12:41641"
    assert time.monotonic() - t < 15
    assert "via 10.78.0.12:41641" in net.cli(1, "ping", "node2", "-c", "3", "--until-direct").stdout
    m2 = scrape(net, 1)
    assert m2['meshnode_paths{type="direct"}'] == 1 and m2['meshnode_paths{type="relay"}'] == 0
    assert m2["meshnode_path_switches_total"] > m["meshnode_path_switches_total"]
    assert m2["meshnode_disco_pongs_received_total"] > m["meshnode_disco_pongs_received_total"]

    # UDP blocked again: back on the relay within 7 s, and traffic flows there.
    blocked_at = time.time()
    block(net, True)
    wait_until(lambda: path(net, 1).get("type") == "relay", timeout=10, what="fallback to the relay")
    took = path(net, 1)["since"] - blocked_at  # when the node switched, not when we looked
    assert took <= 7.0, f"fell back after {took:.1f}s"
    wait_until(lambda: ask(net.ns(1), "node2.tailnet", "4").startswith("node2 "), timeout=10,
               what="node1 reaching node2 through the relay again")
    counters = net.status(1)["tunnel"]["paths"]
    assert counters["relay_sent"] > 0 and counters["relay_received"] > 0
    print(json.dumps(counters))


TWO_REGIONS_BLOCK = """
table inet lab {
  chain input {
    type filter hook input priority 0; policy accept;
    ip saddr { 10.78.0.11, 10.78.0.12 } meta l4proto udp drop
  }
  chain output {
    type filter hook output priority 0; policy accept;
    ip daddr 10.78.0.1 udp dport %d drop
  }
}
"""


def test_nodes_homed_on_two_regions_reach_each_other_through_the_relays(relay_net: Tailnet) -> None:
    """Region 999 (embedded in the control server) and region 900 (a standalone relay). node1 cannot
    reach 900's STUN port and node2 cannot reach 999's, so their measured homes differ; UDP between
    them is blocked, so only the relays connect them: each sends to the other's home region."""
    net = relay_net
    dmap = net.lan.root / "derpmap.json"
    dmap.write_text(json.dumps({"Regions": {"900": {
        "RegionID": 900, "RegionCode": "b", "RegionName": "B", "Nodes": [{
            "Name": "900a", "RegionID": 900, "HostName": "10.78.0.1", "DERPPort": 8081,
            "STUNPort": 3479, "HTTPOnly": True}]}}}))
    net.lan.popen(net.lan.ctl, *MESHNODE, "derp", "serve", "--listen", "10.78.0.1:8081", "--stun-port", "3479",
                  "--admit-any", log=net.lan.root / "derp900.log")
    for i, port in ((1, 3479), (2, 3478)):
        (net.lan.root / f"block{i}.nft").write_text(TWO_REGIONS_BLOCK % port)
        run("ip", "netns", "exec", net.ns(i), "nft", "-f", str(net.lan.root / f"block{i}.nft"))
    net.lan.popen(net.lan.ctl, *MESHNODE, "control", "serve", "--listen", CONTROL, "--db", str(net.db),
                  "--derp", "--derp-map", str(dmap), log=net.lan.root / "control.log")
    for i in (1, 2):
        net.dir(i).mkdir()
        net.start_daemon(i)
    for i in (1, 2):
        net.wait_daemon(i)
    wait_until(lambda: net.sh(1, sys.executable, "-c", "import socket; socket.create_connection("
                              "('10.78.0.1', 8080), 1).close()").returncode == 0, timeout=20, what="control")
    key = net.control("authkey", "create", "--reusable")
    for i in (1, 2):
        net.cli(i, "up", "--login-server", f"http://{CONTROL}", "--authkey", key, "--hostname", f"node{i}")
        net.lan.popen(net.ns(i), sys.executable, "-c", WHO_SERVER, f"node{i}", log=net.lan.root / f"who{i}.log")
    wait_until(lambda: ctl_home(net, 1) == 999 and ctl_home(net, 2) == 900, timeout=20,
               what="node1 homed on 999, node2 on 900, each known to the other")
    wait_until(lambda: ask(net.ns(1), "node2.tailnet", "4").startswith("node2 "), timeout=15,
               what="node1 reaching node2 across regions")
    wait_until(lambda: ask(net.ns(2), "node1.tailnet", "4").startswith("node1 "), timeout=15,
               what="node2 reaching node1 across regions")
    assert path(net, 1)["relay_region"] == 900 and path(net, 2)["relay_region"] == 999
    assert scrape(net, 1)["meshnode_relay_home_region"] == 999
    assert scrape(net, 2)["meshnode_relay_home_region"] == 900
