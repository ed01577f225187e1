"""End to end: a control server and three node daemons, each in its own network namespace, with the
system resolver of each namespace (its /etc/netns/NAME/resolv.conf, managed by the daemon) pointed
at 100.100.100.100. `getent hosts` and `dig` go through glibc / the resolv.conf, as any program would.

Topology (all created here, all deleted in the finalizer, even on failure):

    ctl namespace: meshnode control serve on 0.0.0.0:8080
      veth 10.77.<i>.1/24  <---->  10.77.<i>.2/24 veth in node namespace i (i = 1, 2, 3)
    node namespace i: meshnode daemon --userspace (100.100.100.100 + fd7a:115c:a1e0::53 placed locally)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from meshnode.node.resolvconf import is_ours, parse_resolv_conf
from tests.e2e.netns import MESHNODE, Lab, run
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]

CONTROL_PORT = 8080



class Topology(Lab):
    """Namespaces, veths, /etc/netns files and processes; `destroy` removes all of it."""

    def __init__(self, root: Path) -> None:
        tag = f"mnn{os.getpid() % 10000}{int(time.monotonic() * 1000) % 1000}"
        self.root = root
        self.ctl = f"{tag}c"
        self.nodes = [f"{tag}n{i}" for i in (1, 2, 3)]
        super().__init__()

    def build(self) -> None:
        for ns in [self.ctl, *self.nodes]:
            self.add_namespace(ns)
        for i, ns in enumerate(self.nodes, 1):
            a, b = f"{ns}a"[-15:], f"{ns}b"[-15:]
            run("ip", "link", "add", a, "netns", self.ctl, "type", "veth", "peer", "name", b, "netns", ns)
            run("ip", "-n", self.ctl, "addr", "add", f"10.77.{i}.1/24", "dev", a)
            run("ip", "-n", ns, "addr", "add", f"10.77.{i}.2/24", "dev", b)
            run("ip", "-n", self.ctl, "link", "set", a, "up")
            run("ip", "-n", ns, "link", "set", b, "up")
            self.write_resolv_conf(ns, self.original_resolv(i))

    @staticmethod
    def original_resolv(i: int) -> str:
        # The namespace's "upstream" resolver: an address inside our own topology, never outside.
        return f"# namespace {i}'s own resolver\nnameserver 10.77.{i}.1\nsearch e2e.test\n"


class NodeDaemon:
    def __init__(self, topo: Topology, index: int) -> None:
        self.topo = topo
        self.index = index
        self.ns = topo.nodes[index - 1]
        self.name = f"node{index}"
        self.dir = topo.root / self.name
        self.dir.mkdir(exist_ok=True)
        self.sock = self.dir / "mn.sock"
        self.resolv = Path("/etc/netns") / self.ns / "resolv.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = self.topo.popen(
            self.ns, *MESHNODE, "daemon", "--state-dir", str(self.dir / "state"), "--socket", str(self.sock),
            "--userspace", "--resolv-conf", str(self.resolv), "-v", log=self.dir / "daemon.log")
        wait_until(self._api_up, timeout=20, what=f"{self.name}'s daemon")

    def _api_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited: {(self.dir / 'daemon.log').read_text()[-3000:]}")
        return self.cli("status", "--json", check=False).returncode == 0

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.ns, *MESHNODE, "--socket", str(self.sock), *args, check=check,
                   timeout=60)

    def sh(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.ns, *cmd, check=False, timeout=30)

    def getent(self, name: str, db: str = "hosts") -> set[str]:
        """Addresses glibc's resolver returns for `name` inside this namespace (empty: not found)."""
        r = self.sh("getent", db, name)
        return {line.split()[0] for line in r.stdout.splitlines() if line.strip()}

    def dig(self, name: str, qtype: str = "A") -> tuple[str, set[str]]:
        """(status, answer values) from dig, which reads the namespace's resolv.conf for its server."""
        r = self.sh("dig", "+tries=1", "+time=2", "+noall", "+comments", "+answer", name, qtype)
        found = re.search(r"status: ([A-Z]+)", r.stdout)
        values = {line.split()[-1] for line in r.stdout.splitlines()
                  if line and not line.startswith(";") and line.split()[3:4] == [qtype]}
        return (found.group(1) if found else f"no reply: {r.stdout}{r.stderr}"), values

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    if shutil.which("dig") is None or shutil.which("getent") is None:
        pytest.skip("needs dig and getent")
    t = Topology(tmp_path)
    try:
        t.build()
        yield t
    finally:
        t.destroy()


def control_cmd(db: Path, *args: str) -> str:
    return run(*MESHNODE, "control", *args, "--db", str(db)).stdout.strip()


def test_three_namespaces_resolve_each_other_through_the_system_resolver(topo: Topology) -> None:
    db = topo.root / "control.db"
    control_log = topo.root / "control.log"
    ctl = topo.popen(topo.ctl, *MESHNODE, "control", "serve", "--listen", f"0.0.0.0:{CONTROL_PORT}",
                     "--db", str(db), log=control_log)
    key_a = control_cmd(db, "authkey", "create", "--reusable", "--tags", "tag:a")
    key_b = control_cmd(db, "authkey", "create", "--reusable", "--tags", "tag:b")

    nodes = [NodeDaemon(topo, i) for i in (1, 2, 3)]
    for node in nodes:
        node.start()
    # The control server is reachable from each namespace over its own veth.
    for node in nodes:
        wait_until(lambda n=node: n.sh("python3", "-c", "import socket; socket.create_connection("
                                       f"('10.77.{n.index}.1', {CONTROL_PORT}), 1).close()").returncode == 0,
                   timeout=20, what=f"control server reachable from {node.name}")
    assert ctl.poll() is None, control_log.read_text()
    for node, key in zip(nodes, (key_a, key_a, key_b)):
        node.cli("up", "--login-server", f"http://10.77.{node.index}.1:{CONTROL_PORT}", "--authkey", key,
                 "--hostname", node.name)
        text = node.resolv.read_text()
        assert is_ours(text)
        assert parse_resolv_conf(text).nameservers == ("100.100.100.100", "fd7a:115c:a1e0::53")

    addrs = {n.name: json.loads(n.cli("status", "--json").stdout)["self"]["addresses"] for n in nodes}

    # Every namespace resolves every node through glibc (FQDN and short name via the search
    # domain) and through dig reading the namespace's resolv.conf.
    for node in nodes:
        for peer in nodes:
            want = set(addrs[peer.name])
            wait_until(lambda n=node, p=peer, w=want: n.getent(f"{p.name}.tailnet") and
                       n.getent(f"{p.name}.tailnet") <= w, timeout=5,
                       what=f"{node.name}: getent hosts {peer.name}.tailnet")
            v4 = {a for a in want if ":" not in a}
            assert node.getent(f"{peer.name}.tailnet", "ahostsv4") == v4
            assert node.getent(peer.name, "ahostsv4") == v4  # short name, search domain
            assert node.dig(f"{peer.name}.tailnet") == ("NOERROR", v4)
            assert node.dig(f"{peer.name}.tailnet", "AAAA")[1] == {a for a in want if ":" in a}

    # Policy: tag:a reaches only tag:a. node3 (tag:b) no longer resolves on node1/node2, and
    # node3 sees no one else.
    policy = topo.root / "policy.json"
    policy.write_text(json.dumps({"tagOwners": {"tag:a": [], "tag:b": []},
                                  "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["tag:a:*"]}]}))
    control_cmd(db, "policy", "set", str(policy))
    for node in nodes[:2]:
        wait_until(lambda n=node: not n.getent("node3.tailnet"), timeout=5,
                   what=f"node3 hidden from {node.name}")
        assert node.dig("node3.tailnet")[0] == "NXDOMAIN"
        assert node.getent("node2.tailnet", "ahostsv4")  # the visible peer still resolves
    wait_until(lambda: not nodes[2].getent("node1.tailnet"), timeout=5, what="node1 hidden from node3")
    assert nodes[2].getent("node3.tailnet", "ahostsv4") == {a for a in addrs["node3"] if ":" not in a}

    # kill -9, then a restart: resolv.conf ends up correct (ours, with the true original backed up)
    # and names resolve again, from the saved map.
    node2 = nodes[1]
    wait_until(lambda: (m := json.loads(node2.cli("status", "--json").stdout)["map"])["saved_version"]
               == m["version"], timeout=5, what="node2's map on disk")
    node2.kill9()
    assert is_ours(node2.resolv.read_text())
    node2.start()
    assert is_ours(node2.resolv.read_text())
    assert (node2.dir / "state" / "resolv.pre-meshnode.conf").read_text() == topo.original_resolv(2)
    assert node2.getent("node1.tailnet", "ahostsv4") == {a for a in addrs["node1"] if ":" not in a}

    # `down` puts the namespace's own resolv.conf back; names stop resolving there.
    node2.cli("down")
    assert node2.resolv.read_text() == topo.original_resolv(2)
    assert not node2.getent("node1.tailnet")
    node2.cli("up")
    assert is_ours(node2.resolv.read_text())

    # Stopping a daemon (SIGTERM) restores too, and removes the service addresses.
    node3 = nodes[2]
    assert node3.proc is not None
    node3.proc.send_signal(signal.SIGTERM)
    node3.proc.wait(15)
    assert node3.resolv.read_text() == topo.original_resolv(3)
    assert "100.100.100.100" not in node3.sh("ip", "addr", "show", "dev", "lo").stdout
