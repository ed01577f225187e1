"""End to end, a NAT lab like Tailscale's natlab: each node behind its own router namespace that
masquerades (Linux `masquerade`: endpoint-independent mapping, port kept when free, and a
stateful firewall that only lets in answers). The control server embeds the relay and STUN.

    ctl   10.78.0.1 on the "internet" bridge: control server, DERP relay (region 999), STUN :3478
    r1    10.78.0.21 <-> 192.168.1.1     r2  10.78.0.22 <-> 192.168.2.1   (nft masquerade)
    n1    192.168.1.10, default via r1   n2  192.168.2.10, default via r2

Each node learns its public address by STUN and reports it; a call-me-maybe through the relay
makes both send at once, which opens both NATs: the path ends up direct, between the routers'
public addresses ("easy"). With r2 mapping each destination to a random port ("hard",
`masquerade random`, endpoint-dependent) facing r1's port-restricted filtering, no direct path can
exist and the relay carries the traffic. Two nodes on one LAN behind one NAT ("same-lan") meet over
their LAN addresses. Behind a carrier-grade NAT in front of a home NAT ("double"), node1 still
meets node2 directly, at the carrier NAT's public address."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.netns import Lab, unique_name
from tests.e2e.test_node_relay import RelayTailnet, path, relay_supported
from tests.e2e.test_node_routing import CONTROL
from tests.e2e.test_node_tunnel import WHO_SERVER, ask, run
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]

NAT = """
table ip nat {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "WAN" masquerade MODE
  }
}
table inet filter {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "LAN" accept
  }
  chain input {
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iifname "lo" accept
  }
}
"""


class NatLab(Lab):
    """The topology in the module docstring; `nodes` and `ctl` as `Lan` has them, for Tailnet."""

    def __init__(self, root: Path, kind: str = "easy") -> None:
        super().__init__()
        self.kind = kind
        self.hard = kind == "hard"  # r2 maps each destination to a new random port
        tag = unique_name("mnn")
        self.root = root
        self.ctl = f"{tag}c"
        self.routers = [f"{tag}r1", f"{tag}r2"]
        self.nodes = [f"{tag}n1", f"{tag}n2"]

    def veth(self, a_ns: str, b_ns: str) -> tuple[str, str]:
        a, b = unique_name("va"), unique_name("vb")
        run("ip", "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns)
        return a, b

    def build(self) -> None:
        if self.kind == "same-lan":
            self.build_one_lan()
            return
        for ns in [self.ctl, *self.routers, *self.nodes]:
            self.add_namespace(ns)
        run("ip", "-n", self.ctl, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.ctl, "addr", "add", "10.78.0.1/24", "dev", "br0")
        run("ip", "-n", self.ctl, "link", "set", "br0", "up")
        for i, (router, node) in enumerate(zip(self.routers, self.nodes), 1):
            if self.kind == "double" and i == 1:
                wan = self.carrier_nat(router)
            else:
                br, wan = self.veth(self.ctl, router)
                run("ip", "-n", self.ctl, "link", "set", br, "master", "br0", "up")
                run("ip", "-n", router, "addr", "add", f"10.78.0.{20 + i}/24", "dev", wan)
                run("ip", "-n", router, "link", "set", wan, "up")
            lan, eth = self.veth(router, node)
            run("ip", "-n", router, "addr", "add", f"192.168.{i}.1/24", "dev", lan)
            run("ip", "-n", router, "link", "set", lan, "up")
            run("ip", "-n", node, "addr", "add", f"192.168.{i}.10/24", "dev", eth)
            run("ip", "-n", node, "link", "set", eth, "up")
            run("ip", "-n", node, "route", "add", "default", "via", f"192.168.{i}.1")
            run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            mode = "random" if self.hard and i == 2 else ""
            (self.root / f"nat{i}.nft").write_text(NAT.replace("WAN", wan).replace("LAN", lan)
                                                   .replace("MODE", mode))
            run("ip", "netns", "exec", router, "nft", "-f", str(self.root / f"nat{i}.nft"))
            self.write_resolv_conf(node, "nameserver 10.78.0.1\n")


    def carrier_nat(self, home: str) -> str:
        """A carrier-grade NAT between `home` (the home router) and the internet bridge: its
        public side is 10.78.0.21, the carrier network 172.16.0.0/24. Returns home's WAN."""
        cgnat = f"{home}g"
        self.add_namespace(cgnat)
        br, wan = self.veth(self.ctl, cgnat)
        run("ip", "-n", self.ctl, "link", "set", br, "master", "br0", "up")
        run("ip", "-n", cgnat, "addr", "add", "10.78.0.21/24", "dev", wan)
        run("ip", "-n", cgnat, "link", "set", wan, "up")
        inside, home_wan = self.veth(cgnat, home)
        run("ip", "-n", cgnat, "addr", "add", "172.16.0.1/24", "dev", inside)
        run("ip", "-n", cgnat, "link", "set", inside, "up")
        run("ip", "-n", home, "addr", "add", "172.16.0.2/24", "dev", home_wan)
        run("ip", "-n", home, "link", "set", home_wan, "up")
        run("ip", "-n", home, "route", "add", "default", "via", "172.16.0.1")
        run("ip", "-n", cgnat, "route", "add", "192.168.1.0/24", "via", "172.16.0.2")
        run("ip", "netns", "exec", cgnat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        (self.root / "cgnat.nft").write_text(NAT.replace("WAN", wan).replace("LAN", inside).replace("MODE", ""))
        run("ip", "netns", "exec", cgnat, "nft", "-f", str(self.root / "cgnat.nft"))
        return home_wan

    def build_one_lan(self) -> None:
        """Both nodes on one LAN (a bridge in r1) behind r1's NAT."""
        router = self.routers[0]
        for ns in [self.ctl, router, *self.nodes]:
            self.add_namespace(ns)
        run("ip", "-n", self.ctl, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.ctl, "addr", "add", "10.78.0.1/24", "dev", "br0")
        run("ip", "-n", self.ctl, "link", "set", "br0", "up")
        br, wan = self.veth(self.ctl, router)
        run("ip", "-n", self.ctl, "link", "set", br, "master", "br0", "up")
        run("ip", "-n", router, "addr", "add", "10.78.0.21/24", "dev", wan)
        run("ip", "-n", router, "link", "set", wan, "up")
        run("ip", "-n", router, "link", "add", "lan0", "type", "bridge")
        run("ip", "-n", router, "addr", "add", "192.168.1.1/24", "dev", "lan0")
        run("ip", "-n", router, "link", "set", "lan0", "up")
        for i, node in enumerate(self.nodes, 1):
            port, eth = self.veth(router, node)
            run("ip", "-n", router, "link", "set", port, "master", "lan0", "up")
            run("ip", "-n", node, "addr", "add", f"192.168.1.{9 + i}/24", "dev", eth)
            run("ip", "-n", node, "link", "set", eth, "up")
            run("ip", "-n", node, "route", "add", "default", "via", "192.168.1.1")
            self.write_resolv_conf(node, "nameserver 10.78.0.1\n")
        run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        (self.root / "nat.nft").write_text(NAT.replace("WAN", wan).replace("LAN", "lan0").replace("MODE", ""))
        run("ip", "netns", "exec", router, "nft", "-f", str(self.root / "nat.nft"))


@pytest.fixture(params=["easy", "hard", "same-lan", "double"])
def natlab(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NatLab]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    if not relay_supported():
        pytest.skip("this control server has no embedded relay and STUN (--derp) yet")
    lab = NatLab(tmp_path, request.param)
    try:
        lab.build()
        yield lab
    finally:
        lab.destroy()


def test_two_nats(natlab: NatLab) -> None:
    net = RelayTailnet(natlab)  # type: ignore[arg-type]
    net.start()
    key = net.control("authkey", "create", "--reusable")
    for i in (1, 2):
        net.cli(i, "up", "--login-server", f"http://{CONTROL}", "--authkey", key, "--hostname", f"node{i}")
        natlab.popen(net.ns(i), sys.executable, "-c", WHO_SERVER, f"node{i}", log=natlab.root / f"who{i}.log")
    # Traffic flows at once (through the relay until the NATs are open)...
    wait_until(lambda: ask(net.ns(1), "node2.tailnet", "4").startswith("node2 "), timeout=15,
               what="node1 reaching node2")
    if natlab.hard:
        # r2 gives every destination a new random port, and r1 (like every Linux masquerade)
        # only lets in what answers its own sends: neither side can learn a port the other's NAT
        # will accept, so, as Tailscale's rules say for a hard NAT facing a port-restricted one,
        # the relay carries the traffic, and keeps carrying it.
        wait_until(lambda: path(net, 1).get("type") == "relay", timeout=10, what="the relay path")
        import time
        time.sleep(8)  # probes for a while: no direct path may appear (a check over time)
        assert path(net, 1)["type"] == "relay" and path(net, 2)["type"] == "relay"
        assert ask(net.ns(2), "node1.tailnet", "4").startswith("node1 ")
        return
    if natlab.kind == "same-lan":
        # Both have the NAT's public address too (STUN), but the LAN is private and faster.
        wait_until(lambda: path(net, 1).get("endpoint") == "192.168.1.11:41641"
                   and path(net, 2).get("endpoint") == "192.168.1.10:41641", timeout=15,
                   what="a direct path over the LAN")
        return
    # ...and the path becomes direct between the routers' public addresses.
    wait_until(lambda: path(net, 1).get("type") == "direct" and path(net, 2).get("type") == "direct",
               timeout=20, what="a direct path through both NATs")
    assert path(net, 1)["endpoint"].startswith("10.78.0.22:")
    assert path(net, 2)["endpoint"].startswith("10.78.0.21:")
    assert ask(net.ns(2), "node1.tailnet", "4").startswith("node1 ")
