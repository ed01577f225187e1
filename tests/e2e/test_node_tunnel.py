"""End to end over the tunnel: three node daemons with `--tun`, each in its own namespace, on one
bridged LAN with the control server. Names resolve through MagicDNS and traffic to them flows
through the WireGuard tunnels the daemons build from their network maps.

    ctl namespace: bridge 10.78.0.1/24, meshnode control serve on 10.78.0.1:8080
    node namespace i: veth 10.78.0.1<i>/24 on the bridge; meshnode daemon --tun mn0
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.netns import MESHNODE, Lab, run
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]




class Lan(Lab):
    """A control namespace with a bridge, and node namespaces plugged into it."""

    def __init__(self, root: Path, count: int) -> None:
        tag = f"mnt{os.getpid() % 10000}{int(time.monotonic() * 1000) % 1000}"
        self.root = root
        self.ctl = f"{tag}c"
        self.nodes = [f"{tag}n{i}" for i in range(1, count + 1)]
        super().__init__()

    def build(self) -> None:
        for ns in [self.ctl, *self.nodes]:
            self.add_namespace(ns)
        run("ip", "-n", self.ctl, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.ctl, "addr", "add", "10.78.0.1/24", "dev", "br0")
        run("ip", "-n", self.ctl, "link", "set", "br0", "up")
        for i, ns in enumerate(self.nodes, 1):
            a, b = f"{ns}a"[-15:], f"{ns}b"[-15:]
            run("ip", "link", "add", a, "netns", self.ctl, "type", "veth", "peer", "name", b, "netns", ns)
            run("ip", "-n", self.ctl, "link", "set", a, "master", "br0", "up")
            run("ip", "-n", ns, "addr", "add", f"10.78.0.{10 + i}/24", "dev", b)
            run("ip", "-n", ns, "link", "set", b, "up")
            self.write_resolv_conf(ns, "nameserver 10.78.0.1\n")


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    t = Lan(tmp_path, 3)
    try:
        t.build()
        yield t
    finally:
        t.destroy()


def sh(ns: str, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return run("ip", "netns", "exec", ns, *cmd, check=False, timeout=timeout)


# A TCP server that tells each client its name and the address the client came from.
WHO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 8000))
s.listen()
while True:
    c, addr = s.accept()
    c.sendall(f"{sys.argv[1]} {addr[0].removeprefix('::ffff:')}".encode())
    c.close()
"""


def ask(ns: str, host: str, family: str = "") -> str:
    """Connect to `host`:8000 from `ns` by name (glibc, so MagicDNS) and return the server's reply."""
    fam = {"": "0", "4": "socket.AF_INET", "6": "socket.AF_INET6"}[family]
    code = ("import socket; ai = socket.getaddrinfo(%r, 8000, %s, socket.SOCK_STREAM)[0]; "
            "s = socket.socket(ai[0], socket.SOCK_STREAM); s.settimeout(2); s.connect(ai[4]); "
            "print(s.recv(200).decode())" % (host, fam))
    r = sh(ns, sys.executable, "-c", code)
    return r.stdout.strip() if r.returncode == 0 else ""


def test_names_resolve_and_traffic_flows_through_the_tunnels(lan: Lan) -> None:
    db = lan.root / "control.db"
    control = lan.popen(lan.ctl, *MESHNODE, "control", "serve", "--listen", "10.78.0.1:8080", "--db", str(db),
                        log=lan.root / "control.log")
    key_a = run(*MESHNODE, "control", "authkey", "create", "--reusable", "--tags", "tag:a", "--db", str(db)).stdout.strip()
    key_b = run(*MESHNODE, "control", "authkey", "create", "--reusable", "--tags", "tag:b", "--db", str(db)).stdout.strip()

    socks = []
    daemons = []

    def start_daemon(i: int) -> subprocess.Popen[bytes]:
        ns, d = lan.nodes[i - 1], lan.root / f"node{i}"
        return lan.popen(ns, *MESHNODE, "daemon", "--state-dir", str(d / "state"), "--socket", str(d / "mn.sock"),
                         "--tun", "mn0", "--resolv-conf", f"/etc/netns/{ns}/resolv.conf", "-v",
                         log=d / "daemon.log")

    for i, ns in enumerate(lan.nodes, 1):
        (lan.root / f"node{i}").mkdir()
        socks.append(lan.root / f"node{i}" / "mn.sock")
        daemons.append(start_daemon(i))

    def cli(i: int, *args: str) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", lan.nodes[i - 1], *MESHNODE, "--socket", str(socks[i - 1]), *args,
                   timeout=60)

    for i in (1, 2, 3):
        wait_until(lambda i=i: sh(lan.nodes[i - 1], *MESHNODE, "--socket", str(socks[i - 1]), "status", "--json").returncode == 0,
                   timeout=20, what=f"node{i}'s daemon")
    wait_until(lambda: sh(lan.nodes[0], "python3", "-c", "import socket; socket.create_connection("
                          "('10.78.0.1', 8080), 1).close()").returncode == 0, timeout=20, what="control server")
    for i, key in ((1, key_a), (2, key_a), (3, key_b)):
        cli(i, "up", "--login-server", "http://10.78.0.1:8080", "--authkey", key, "--hostname", f"node{i}")

    addr = {i: json.loads(cli(i, "status", "--json").stdout)["self"]["addresses"] for i in (1, 2, 3)}
    for i, ns in enumerate(lan.nodes, 1):
        lan.popen(ns, sys.executable, "-c", WHO_SERVER, f"node{i}", log=lan.root / f"who{i}.log")
    # The tunnel interface carries the node's own addresses and the DNS service address.
    shown = sh(lan.nodes[0], "ip", "addr", "show", "dev", "mn0").stdout
    assert addr[1][0] in shown and "100.100.100.100" in shown

    # TCP by name: MagicDNS answers, the kernel routes the peer's address into mn0, WireGuard
    # carries it; the server sees the client's own tailnet address (never 100.100.100.100).
    for src, dst in ((1, 2), (2, 1), (1, 3), (3, 2)):
        want = f"node{dst} {addr[src][0]}"
        wait_until(lambda s=src, d=dst, w=want: ask(lan.nodes[s - 1], f"node{d}.tailnet", "4") == w,
                   timeout=15, what=f"node{src} reaching node{dst}.tailnet over the tunnel")
    assert ask(lan.nodes[0], "node2", "6") == f"node2 {addr[1][1]}"  # IPv6, short name
    # It really went through the tunnel: node1 has a handshake with a peer.
    st = json.loads(cli(1, "status", "--json").stdout)
    assert st["tunnel"]["running"] and any(p["last_handshake"] for p in st["tunnel"]["peers"])
    node2 = next(p for p in st["peers"] if p["name"] == "node2")
    assert node2["tunnel"]["endpoint"] == "10.78.0.12:41641" and node2["tunnel"]["rx_bytes"] > 0
    assert "active; direct 10.78.0.12:41641" in cli(1, "status").stdout
    out = cli(1, "ping", "-c", "2", "node2").stdout
    assert out.count(f"pong from node2 ({addr[2][0]}) via 10.78.0.12:41641 in") == 2

    # Policy: tag:a reaches only tag:a. node3 leaves node1's map: no name, no peer, no route.
    policy = lan.root / "policy.json"
    policy.write_text(json.dumps({"tagOwners": {"tag:a": [], "tag:b": []},
                                  "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["tag:a:*"]}]}))
    run(*MESHNODE, "control", "policy", "set", str(policy), "--db", str(db))
    wait_until(lambda: addr[3][0] not in sh(lan.nodes[0], "ip", "route", "show", "dev", "mn0").stdout,
               timeout=5, what="node3's route gone from node1")
    assert sh(lan.nodes[0], "getent", "hosts", "node3.tailnet").returncode != 0
    assert ask(lan.nodes[0], addr[3][0]) == ""  # not even by address: node3 is no longer a peer
    r = run("ip", "netns", "exec", lan.nodes[0], *MESHNODE, "--socket", str(socks[0]), "ping", "node3",
            check=False)
    assert r.returncode == 1 and "no peer 'node3'" in r.stderr
    assert ask(lan.nodes[0], "node2.tailnet", "4") == f"node2 {addr[1][0]}"

    # `down` takes the tunnel away with the names.
    cli(1, "down")
    assert "mn0" not in sh(lan.nodes[0], "ip", "link").stdout
    cli(1, "up")
    wait_until(lambda: ask(lan.nodes[0], "node2.tailnet", "4") == f"node2 {addr[1][0]}", timeout=15,
               what="node1 back on the tunnel after up")

    # With the control server gone, a node killed and restarted rebuilds its tunnels from the map
    # it saved: names and traffic work again without the control server.
    wait_until(lambda: (m := json.loads(cli(1, "status", "--json").stdout)["map"])["saved_version"]
               == m["version"], timeout=5, what="node1's map on disk")
    control.kill()
    control.wait(5)
    daemons[0].kill()
    daemons[0].wait(5)
    daemons[0] = start_daemon(1)
    wait_until(lambda: sh(lan.nodes[0], *MESHNODE, "--socket", str(socks[0]), "status", "--json").returncode == 0,
               timeout=20, what="node1 restarted")
    wait_until(lambda: ask(lan.nodes[0], "node2.tailnet", "4") == f"node2 {addr[1][0]}", timeout=15,
               what="node1 reaching node2 from its saved map")
