"""End to end: subnet routers, split DNS through a subnet router, and exit nodes, with node daemons
running `--tun` in namespaces on the bridged LAN of test_node_tunnel.py, plus namespaces that run
no node at all (a corporate subnet, a stand-in for the internet). Every address is inside the test's
namespaces.

    ctl:   bridge 10.78.0.1/24, control server
    node i (10.78.0.1<i>): meshnode daemon --tun mn0
    corp:  10.77.0.10 (TCP server) and 10.77.0.53 (dnsmasq: corp.example), linked to the subnet
           router only, with no default route: replies only find their way back masqueraded.
    inet:  198.18.0.10 (TCP server), the "internet": linked to the exit node (198.18.0.1) and to
           ctl (10.79.0.0/30), which routes the LAN there too, so the server's view of the client
           address tells which path a connection took.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.test_node_tunnel import MESHNODE, WHO_SERVER, Lan, ask, run, sh
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]

CONTROL = "10.78.0.1:8080"
_links = itertools.count()


class Tailnet:
    """A `Lan`, its control server and one daemon per node namespace."""

    def __init__(self, lan: Lan) -> None:
        self.lan = lan
        self.db = lan.root / "control.db"
        self.daemons: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, listen: str = CONTROL) -> None:
        """The control server on `listen`, then every node's daemon."""
        self.lan.popen(self.lan.ctl, *MESHNODE, "control", "serve", "--listen", listen, "--db", str(self.db),
                       log=self.lan.root / "control.log")
        for i in range(1, len(self.lan.nodes) + 1):
            self.dir(i).mkdir()
            self.start_daemon(i)
        for i in range(1, len(self.lan.nodes) + 1):
            self.wait_daemon(i)
        wait_until(lambda: self.sh(1, sys.executable, "-c", "import socket; socket.create_connection("
                                   "('10.78.0.1', 8080), 1).close()").returncode == 0,
                   timeout=20, what="control server")

    def start_daemon(self, i: int) -> None:
        d, ns = self.dir(i), self.ns(i)
        self.daemons[i] = self.lan.popen(ns, *MESHNODE, "daemon", "--state-dir", str(d / "state"), "--socket",
                                         str(d / "mn.sock"), "--tun", "mn0", "--resolv-conf",
                                         f"/etc/netns/{ns}/resolv.conf", "-v", log=d / "daemon.log")

    def wait_daemon(self, i: int) -> None:
        wait_until(lambda: self.cli(i, "status", "--json", check=False).returncode == 0, timeout=20,
                   what=f"node{i}'s daemon")

    def dir(self, i: int) -> Path:
        return self.lan.root / f"node{i}"

    def ns(self, i: int) -> str:
        return self.lan.nodes[i - 1]

    def control(self, *args: str) -> str:
        return run(*MESHNODE, "control", *args, "--db", str(self.db)).stdout.strip()

    def cli(self, i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.ns(i), *MESHNODE, "--socket", str(self.dir(i) / "mn.sock"),
                   *args, check=check, timeout=60)

    def status(self, i: int) -> dict:
        return json.loads(self.cli(i, "status", "--json").stdout)

    def sh(self, i: int, *cmd: str) -> subprocess.CompletedProcess[str]:
        return sh(self.ns(i), *cmd)

    def route_dev(self, i: int, dst: str, *extra: str) -> str:
        """The interface the kernel of node `i` picks for `dst` ("" if unroutable)."""
        words = self.sh(i, "ip", "route", "get", dst, *extra).stdout.split()
        return words[words.index("dev") + 1] if "dev" in words else ""


def add_netns(lan: Lan, name: str) -> str:
    ns = f"{lan.ctl[:-1]}{name}"
    run("ip", "netns", "add", ns)
    lan.namespaces.append(ns)  # Lan.destroy deletes it (and its veth ends)
    run("ip", "-n", ns, "link", "set", "lo", "up")
    return ns


def link(a_ns: str, a_addr: str, b_ns: str, b_addrs: tuple[str, ...]) -> None:
    """A veth pair between two namespaces, with addresses (CIDR) on each end."""
    k = next(_links)
    a, b = f"{a_ns}v{k}"[-15:], f"{b_ns}w{k}"[-15:]
    run("ip", "link", "add", a, "netns", a_ns, "type", "veth", "peer", "name", b, "netns", b_ns)
    run("ip", "-n", a_ns, "addr", "add", a_addr, "dev", a)
    for addr in b_addrs:
        run("ip", "-n", b_ns, "addr", "add", addr, "dev", b)
    run("ip", "-n", a_ns, "link", "set", a, "up")
    run("ip", "-n", b_ns, "link", "set", b, "up")


def nft_tables(net: Tailnet, i: int) -> str:
    return net.sh(i, "nft", "list", "tables").stdout


def forwarding(net: Tailnet, i: int) -> str:
    return net.sh(i, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip()


@pytest.fixture
def lan4(tmp_path: Path) -> Iterator[Lan]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    lan = Lan(tmp_path, 4)
    try:
        lan.build()
        yield lan
    finally:
        lan.destroy()


def test_subnet_router_and_split_dns_through_it(lan4: Lan) -> None:
    """node2 routes 10.77.0.0/24 (a namespace running no node); node1 accepts routes, node4 not."""
    net = Tailnet(lan4)
    corp = add_netns(lan4, "corp")
    link(net.ns(2), "10.77.0.1/24", corp, ("10.77.0.10/24", "10.77.0.53/24"))
    lan4.popen(corp, sys.executable, "-c", WHO_SERVER, "corp", log=lan4.root / "corp.log")
    lan4.popen(corp, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
               "--bind-interfaces", "--listen-address=10.77.0.53", "--pid-file=",
               "--address=/corp.example/10.77.0.10", log=lan4.root / "dnsmasq.log")
    net.start()
    key = net.control("authkey", "create", "--reusable")
    login = ("--login-server", f"http://{CONTROL}", "--authkey", key)
    net.cli(2, "up", *login, "--hostname", "node2", "--advertise-routes", "10.77.0.0/24")
    net.cli(1, "up", *login, "--hostname", "node1", "--accept-routes", "true")
    net.cli(3, "up", *login, "--hostname", "node3")
    net.cli(4, "up", *login, "--hostname", "node4")
    net.control("dns", "routes", "add", "corp.example", "10.77.0.53")
    wait_until(lambda: sh(corp, sys.executable, "-c", "import socket; socket.create_connection("
                          "('10.77.0.10', 8000), 1)").returncode == 0, timeout=10, what="the corp TCP server")

    # Advertised but not approved: nobody routes there, node2 forwards nothing.
    assert net.route_dev(1, "10.77.0.10") != "mn0"
    assert "meshnode" not in nft_tables(net, 2)
    assert ask(net.ns(1), "10.77.0.10") == ""

    net.control("routes", "approve", "node2", "10.77.0.0/24")
    # node1 (--accept-routes) reaches the host behind node2, which sees node2's address: masqueraded.
    wait_until(lambda: ask(net.ns(1), "10.77.0.10") == "corp 10.77.0.1", timeout=15,
               what="node1 reaching 10.77.0.10 through the subnet router")
    assert net.route_dev(1, "10.77.0.10") == "mn0"
    assert forwarding(net, 2) == "1"
    assert "table inet meshnode" in nft_tables(net, 2)
    # node4 (no --accept-routes) has no route into the tunnel for it, and gets nothing there.
    assert net.route_dev(4, "10.77.0.10") != "mn0"
    assert ask(net.ns(4), "10.77.0.10") == ""
    assert any(p["name"] == "node2" and p["approved_routes"] == ["10.77.0.0/24"] for p in net.status(1)["peers"])

    # Split DNS: corp.example goes to 10.77.0.53, reachable only through node2's tunnel.
    wait_until(lambda: net.sh(1, "getent", "hosts", "host.corp.example").stdout.split()[:1] == ["10.77.0.10"],
               timeout=15, what="host.corp.example resolved by node1 through MagicDNS")
    dig = net.sh(1, "dig", "+short", "+time=2", "+tries=1", "@100.100.100.100", "host.corp.example").stdout
    assert dig.split() == ["10.77.0.10"]
    assert ask(net.ns(1), "host.corp.example") == "corp 10.77.0.1"
    # node4's resolver has the same route, but no path to 10.77.0.53: no answer.
    assert net.sh(4, "getent", "hosts", "host.corp.example").returncode != 0

    # down removes node2's table and forwarding; up puts them back (idempotent on restart).
    net.cli(2, "down")
    assert "meshnode" not in nft_tables(net, 2)
    assert forwarding(net, 2) == "0"
    net.cli(2, "up")
    wait_until(lambda: ask(net.ns(1), "10.77.0.10") == "corp 10.77.0.1", timeout=15,
               what="node1 reaching 10.77.0.10 again after node2's down/up")
    assert nft_tables(net, 2).count("meshnode") == 1
    # A daemon killed outright leaves its table behind; the restarted one replaces it (one table,
    # working masquerade) from its saved map and prefs.
    net.daemons[2].kill()
    net.daemons[2].wait(5)
    assert "table inet meshnode" in nft_tables(net, 2)
    net.start_daemon(2)
    net.wait_daemon(2)
    wait_until(lambda: ask(net.ns(1), "10.77.0.10") == "corp 10.77.0.1", timeout=15,
               what="node1 reaching 10.77.0.10 again after node2 was killed and restarted")
    assert nft_tables(net, 2).count("meshnode") == 1
    assert forwarding(net, 2) == "1"

    # Unapproving the route takes it away from node1, and node2 stops forwarding.
    net.control("routes", "approve", "node2", "")
    wait_until(lambda: net.route_dev(1, "10.77.0.10") != "mn0", timeout=10, what="node1's route gone")
    wait_until(lambda: "meshnode" not in nft_tables(net, 2), timeout=10, what="node2's table gone")
    assert forwarding(net, 2) == "0"  # as before the first run, though that run was killed
    assert ask(net.ns(1), "10.77.0.10") == ""


def test_exit_node(tmp_path: Path) -> None:
    """node1 sends its internet traffic through node2; its control connection and WireGuard's own
    UDP stay outside the tunnel even though both use node1's default route."""
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    lan = Lan(tmp_path, 3)
    try:
        lan.build()
        _exit_node(lan)
    finally:
        lan.destroy()


def _exit_node(lan: Lan) -> None:
    net = Tailnet(lan)
    ctl = lan.ctl
    # ctl is the LAN's router: the control server also answers on 10.80.0.1, reachable from node1
    # only through its default route; the exit node (node2) sits on another subnet of the bridge
    # (10.78.1.0/24), so node1 reaches its WireGuard endpoint through the default route as well.
    for cmd in (("addr", "add", "10.78.1.1/24", "dev", "br0"), ("addr", "add", "10.80.0.1/32", "dev", "lo")):
        run("ip", "-n", ctl, *cmd)
    for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0", "net.ipv4.conf.br0.send_redirects=0"):
        run("ip", "netns", "exec", ctl, "sysctl", "-qw", key)
    veth2 = f"{net.ns(2)}b"[-15:]
    run("ip", "-n", net.ns(2), "addr", "flush", "dev", veth2)
    run("ip", "-n", net.ns(2), "addr", "add", "10.78.1.12/24", "dev", veth2)
    run("ip", "-n", net.ns(2), "route", "add", "10.78.0.0/24", "via", "10.78.1.1")
    for i in (1, 3):
        run("ip", "-n", net.ns(i), "route", "add", "default", "via", "10.78.0.1")
    inet = add_netns(lan, "inet")
    link(net.ns(2), "198.18.0.1/24", inet, ("198.18.0.10/24",))
    link(ctl, "10.79.0.1/30", inet, ("10.79.0.2/30",))
    run("ip", "-n", inet, "route", "add", "10.78.0.0/16", "via", "10.79.0.1")
    run("ip", "-n", ctl, "route", "add", "198.18.0.0/24", "via", "10.79.0.2")
    lan.popen(inet, sys.executable, "-c", WHO_SERVER, "inet", log=lan.root / "inet.log")

    net.start(listen="0.0.0.0:8080")
    key = net.control("authkey", "create", "--reusable")
    net.cli(2, "up", "--login-server", "http://10.78.1.1:8080", "--authkey", key, "--hostname", "node2",
            "--advertise-exit-node", "true")
    for i in (1, 3):
        net.cli(i, "up", "--login-server", "http://10.80.0.1:8080", "--authkey", key, "--hostname", f"node{i}")
    # Without an exit node, node1 reaches the internet directly (through ctl).
    wait_until(lambda: ask(net.ns(1), "198.18.0.10") == "inet 10.78.0.11", timeout=10, what="direct path")
    # The exit node cannot reach the control server's 10.80.0.1: a control connection of node1
    # that fell into the tunnel would die there.
    assert net.sh(2, "ip", "route", "get", "10.80.0.1").returncode != 0

    r = net.cli(1, "set", "--exit-node", "node2", check=False)
    assert r.returncode != 0 and "not an approved exit node" in r.stderr
    net.control("routes", "approve", "node2", "0.0.0.0/0,::/0")
    wait_until(lambda: any(p["name"] == "node2" and p["exit_node"] for p in net.status(1)["peers"]),
               timeout=10, what="node2 approved as exit node in node1's map")
    net.cli(1, "set", "--exit-node", "node2")
    wait_until(lambda: ask(net.ns(1), "198.18.0.10") == "inet 198.18.0.1", timeout=15,
               what="node1 reaching the internet through node2 (masqueraded there)")
    assert forwarding(net, 2) == "1" and "table inet meshnode" in nft_tables(net, 2)
    assert net.route_dev(1, "198.18.0.10") == "mn0"
    assert net.route_dev(1, "10.80.0.1") != "mn0"                 # the control server
    assert net.route_dev(1, "10.78.1.12") == "mn0"                # node2's endpoint, unmarked...
    assert net.route_dev(1, "10.78.1.12", "mark", "0x80000") != "mn0"  # ...but WireGuard's UDP is marked
    # The local network is blocked while an exit node is in use (it goes into the tunnel, as with
    # Tailscale), all but WireGuard's own UDP and the control server; --exit-node-allow-lan-access
    # lets it be reached directly again.
    assert net.route_dev(1, "10.78.0.13") == "mn0"
    assert net.route_dev(1, "10.78.0.13", "mark", "0x80000") != "mn0"
    net.cli(1, "set", "--exit-node-allow-lan-access")
    wait_until(lambda: net.route_dev(1, "10.78.0.13") != "mn0", timeout=10, what="LAN access allowed")
    assert ask(net.ns(1), "198.18.0.10") == "inet 198.18.0.1"   # still through the exit node

    # The control connection works: a map change still arrives (the stream restarted with `up`).
    before = net.status(1)["map"]["version"]
    net.control("dns", "search-domains", "set", "example.test")
    wait_until(lambda: net.status(1)["map"]["version"] > before, timeout=10,
               what="a map change reaching node1 while it uses the exit node")
    # The tunnels stay up: to the exit node itself and to another peer.
    for peer in ("node2", "node3"):
        assert "pong from" in net.cli(1, "ping", "-c", "2", peer).stdout
    assert ask(net.ns(1), "198.18.0.10") == "inet 198.18.0.1"
    # A node that did not choose the exit node keeps going direct.
    assert ask(net.ns(3), "198.18.0.10") == "inet 10.78.0.13"

    # Clearing the exit node restores direct routing, and leaves no rule behind.
    net.cli(1, "set", "--exit-node", "")
    wait_until(lambda: ask(net.ns(1), "198.18.0.10") == "inet 10.78.0.11", timeout=10,
               what="node1 going direct again")
    assert "lookup 52" not in net.sh(1, "ip", "rule").stdout
    assert net.sh(1, "ip", "route", "show", "table", "52").stdout.strip() == ""
    net.cli(1, "set", "--exit-node", "node2")
    wait_until(lambda: ask(net.ns(1), "198.18.0.10") == "inet 198.18.0.1", timeout=15,
               what="node1 through node2 again")

    # The exit node leaving the tailnet blocks node1's internet traffic rather than leaking it
    # around the exit node the user chose, and status says why. node2, refused by the control
    # server, goes down: its forwarding and table go with it.
    net.control("nodes", "rm", "node2")
    wait_until(lambda: any("not an approved exit node" in h for h in net.status(1)["health"]), timeout=10,
               what="node1's health reporting the missing exit node")
    assert ask(net.ns(1), "198.18.0.10") == ""
    wait_until(lambda: "meshnode" not in nft_tables(net, 2), timeout=10, what="node2's table gone")
    assert forwarding(net, 2) == "0"
    net.cli(1, "set", "--exit-node", "")
    wait_until(lambda: ask(net.ns(1), "198.18.0.10") == "inet 10.78.0.11", timeout=10,
               what="node1 going direct once more")
