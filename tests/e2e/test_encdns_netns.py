"""End to end: a node in its own network namespace serves DoT and DoH at 100.100.100.100 and
[fd7a:115c:a1e0::53] (ports 853 and 443) with a certificate from the control server's tailnet CA;
kdig in that namespace verifies it against the CA that `meshnode cert --ca` prints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.netns import MESHNODE, run
from tests.e2e.test_node_netns import CONTROL_PORT, NodeDaemon, Topology, control_cmd
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]


class Node(NodeDaemon):
    def _api_up(self) -> bool:
        # `meshnode status` exits 1 while logged out (as tailscale's does): ask for JSON and read it.
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited: {(self.dir / 'daemon.log').read_text()[-3000:]}")
        r = self.cli("status", "--json", check=False)
        return r.stdout.strip().startswith("{")


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    if shutil.which("kdig") is None:
        pytest.skip("needs kdig (knot-dnsutils)")
    t = Topology(tmp_path)
    try:
        t.build()
        yield t
    finally:
        t.destroy()


def test_kdig_tls_and_https_to_100_100_100_100_verify_against_the_tailnet_ca(topo: Topology) -> None:
    db = topo.root / "control.db"
    topo.popen(topo.ctl, *MESHNODE, "control", "serve", "--listen", f"0.0.0.0:{CONTROL_PORT}", "--db", str(db),
               log=topo.root / "control.log")
    key = control_cmd(db, "authkey", "create", "--reusable")
    node = Node(topo, 1)
    node.start()
    wait_until(lambda: node.sh("python3", "-c", "import socket; socket.create_connection("
                                f"('10.77.1.1', {CONTROL_PORT}), 1).close()").returncode == 0,
               timeout=20, what="control server reachable")
    node.cli("up", "--login-server", f"http://10.77.1.1:{CONTROL_PORT}", "--authkey", key, "--hostname", "node1")

    def listening() -> bool:
        st = json.loads(node.cli("dns", "status", "--json").stdout)
        enc = (st["resolver"].get("server") or {}).get("encrypted") or {}
        return len(enc.get("listeners") or []) == 4
    wait_until(listening, timeout=30, what="DoT and DoH on both service addresses")

    ca_file = topo.root / "tailnet-ca.pem"
    ca_file.write_text(node.cli("cert", "--ca").stdout)
    me = json.loads(node.cli("status", "--json").stdout)["self"]["addresses"]

    def kdig(server: str, mode: str, ca: Path, host: str = "magicdns.tailnet") -> str:
        r = node.sh("kdig", f"@{server}", mode, f"+tls-ca={ca}", f"+tls-hostname={host}", "+time=3", "+retry=0",
                    "node1.tailnet", "A")
        return r.stdout if r.returncode == 0 else f"FAILED: {r.stdout}{r.stderr}"

    v4 = next(a for a in me if ":" not in a)
    for server in ("100.100.100.100", "fd7a:115c:a1e0::53"):
        for mode in ("+tls", "+https"):
            out = kdig(server, mode, ca_file)
            assert v4 in out and "NOERROR" in out, (server, mode, out)
    # The certificate also carries the addresses themselves: verification by IP works too.
    assert v4 in kdig("100.100.100.100", "+tls", ca_file, host="100.100.100.100")
    other = topo.root / "other-ca.pem"
    from tests.integration.tls_helpers import make_ca
    make_ca("not the tailnet").write(other)
    assert kdig("100.100.100.100", "+tls", other).startswith("FAILED")
    status = node.cli("dns", "status").stdout
    assert "Encrypted DNS: dot 100.100.100.100:853" in status and "magicdns.tailnet" in status, status


def test_a_map_nameserver_given_by_name_is_resolved_through_the_nodes_original_resolver(
        topo: Topology, tmp_path: Path) -> None:
    """`control dns nameservers set tls://dot.e2e.test`: the node looks the name up at its original
    resolver (10.77.1.1:53 in the control namespace, from the namespace's resolv.conf), never at
    100.100.100.100, connects to the DoT server there, verifies it, and forwards through it."""
    from tests.integration.tls_helpers import make_ca, make_leaf, write_pair

    ca = make_ca("e2e upstream CA")
    ca_file = ca.write(tmp_path / "upstream-ca.pem")
    cert, key = write_pair(tmp_path, make_leaf(ca, ("dot.e2e.test",), ()))
    magicdns = [*MESHNODE[:1], "-m", "magicdns.cli", "serve", "--allow", "10.77.0.0/16", "--resolv-conf",
                str(tmp_path / "none")]
    boot_view = tmp_path / "boot.json"
    boot_view.write_text(json.dumps({"domain": "e2e.test", "self": {"name": "boot", "addresses": ["100.64.9.1"]},
                                     "peers": [], "version": 1,
                                     "dns": {"records": [{"name": "dot.e2e.test", "type": "A", "value": "10.77.1.1"}]}}))
    up_view = tmp_path / "up.json"
    up_view.write_text(json.dumps({"domain": "upstream.test", "self": {"name": "ns", "addresses": ["100.64.9.2"]},
                                   "peers": [], "version": 1,
                                   "dns": {"records": [{"name": "www.upstream.test", "type": "A", "value": "192.0.2.10"}]}}))
    topo.popen(topo.ctl, *magicdns, "--listen", "10.77.1.1:53", "--view", str(boot_view),
               "--control-socket", str(tmp_path / "boot.sock"), log=tmp_path / "boot.log")
    topo.popen(topo.ctl, *magicdns, "--listen", "10.77.1.1:5300", "--view", str(up_view), "--dot", "10.77.1.1:853",
               "--tls-cert", str(cert), "--tls-key", str(key), "--control-socket", str(tmp_path / "up.sock"),
               log=tmp_path / "up.log")
    db = topo.root / "control.db"
    topo.popen(topo.ctl, *MESHNODE, "control", "serve", "--listen", f"0.0.0.0:{CONTROL_PORT}", "--db", str(db),
               log=topo.root / "control.log")
    key_text = control_cmd(db, "authkey", "create", "--reusable")
    control_cmd(db, "dns", "nameservers", "set", "tls://dot.e2e.test")
    node = Node(topo, 1)
    # The upstream's CA, as an operator would install it (the node trusts the system store).
    node.proc = topo.popen(
        node.ns, "env", f"SSL_CERT_FILE={ca_file}", *MESHNODE, "daemon", "--state-dir", str(node.dir / "state"),
        "--socket", str(node.sock), "--userspace", "--resolv-conf", str(node.resolv), "-v",
        log=node.dir / "daemon.log")
    wait_until(node._api_up, timeout=20, what="node1's daemon")
    wait_until(lambda: node.sh("python3", "-c", "import socket; socket.create_connection("
                                f"('10.77.1.1', {CONTROL_PORT}), 1).close()").returncode == 0,
               timeout=20, what="control server reachable")
    node.cli("up", "--login-server", f"http://10.77.1.1:{CONTROL_PORT}", "--authkey", key_text, "--hostname", "node1")

    def answered() -> bool:
        status, values = node.dig("www.upstream.test")
        return status == "NOERROR" and values == {"192.0.2.10"}
    wait_until(answered, timeout=30, interval=0.5, what="www.upstream.test through the DoT upstream by name")
    st = json.loads(node.cli("dns", "status", "--json").stdout)
    names = st["resolver"]["server"]["forwarder"]["encrypted_upstreams"]["names"]["names"]
    assert names["dot.e2e.test"]["addresses"] == ["10.77.1.1"], names
    assert "tls://dot.e2e.test" in json.dumps(st["resolver"]["server"]["forwarder"]["upstreams"])
