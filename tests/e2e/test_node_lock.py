"""End to end, Tailnet Lock on real tunnels: three node daemons with `--tun` in their own namespaces on
the bridged LAN of test_node_tunnel.py, one control server.

    lock init on node1 (node1 and node2 trusted), node2 signed   both reach each other by name
    node3 registers normally (the control server maps it)          node1 and node2 neither reach it
                                                                   (ping, TCP) nor resolve it (getent)
                                                                   and no rule of their installed packet
                                                                   filter names its addresses
    `meshnode lock sign` of node3 on node2                         node3 is in node1's peers within a
                                                                   second and reachable at once; the
                                                                   filter names its addresses again
    node2 rotates its node key (`up --force-reauth`)               node1 keeps it, reachable by name,
                                                                   with no `lock sign` (rotation signature)
    node3 (not a signer) signing anything                          refused, with the reason
    `meshnode lock disable SECRET` on node1                        the lock is off on every node

The control server's own refusals (forged signature, replayed AUM, chain over the limits) are
driven over the wire in tests/integration/test_tka_control.py.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.test_node_tunnel import MESHNODE, WHO_SERVER, Lan, ask, run, sh
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]


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


def test_lock_keeps_an_unsigned_node_out_until_it_is_signed(lan: Lan) -> None:
    db = lan.root / "control.db"
    lan.popen(lan.ctl, *MESHNODE, "control", "serve", "--listen", "10.78.0.1:8080", "--db", str(db),
              log=lan.root / "control.log")
    key = run(*MESHNODE, "control", "authkey", "create", "--reusable", "--db", str(db)).stdout.strip()
    socks = []
    for i, ns in enumerate(lan.nodes, 1):
        d = lan.root / f"node{i}"
        d.mkdir()
        socks.append(d / "mn.sock")
        lan.popen(ns, *MESHNODE, "daemon", "--state-dir", str(d / "state"), "--socket", str(d / "mn.sock"),
                  "--tun", "mn0", "--resolv-conf", f"/etc/netns/{ns}/resolv.conf", "-v",
                  log=d / "daemon.log")
        lan.popen(ns, sys.executable, "-c", WHO_SERVER, f"node{i}", log=d / "who.log")

    def cli(i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", lan.nodes[i - 1], *MESHNODE, "--socket", str(socks[i - 1]),
                   *args, check=check, timeout=60)

    def status(i: int) -> dict[str, Any]:
        return json.loads(cli(i, "status", "--json").stdout)

    def lock_status(i: int) -> dict[str, Any]:
        return json.loads(cli(i, "lock", "status", "--json").stdout)

    def nodes() -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in json.loads(run(*MESHNODE, "control", "nodes", "ls", "--json", "--db",
                                                     str(db)).stdout)}

    def filter_names(i: int, addr: str) -> bool:
        """Whether a rule of node i's installed packet filter (the applied map's rules, as the
        daemon saved them) has `addr` among its sources or destinations."""
        def saved() -> bool:
            m = status(i)["map"]
            return m["version"] is not None and m["saved_version"] == m["version"]
        wait_until(saved, timeout=10, what=f"node{i}'s map saved")
        doc = json.loads((lan.root / f"node{i}" / "state" / "netmap.json").read_text())["netmap"]
        a = ipaddress.ip_address(addr)
        return any(a.version == n.version and a in n for r in doc["packet_filter"]
                   for n in map(ipaddress.ip_network, r["src"] + r["dst"]))

    for i in (1, 2, 3):
        wait_until(lambda i=i: cli(i, "status", "--json", check=False).returncode == 0, timeout=20, what=f"node{i}'s daemon")
    wait_until(lambda: sh(lan.nodes[0], sys.executable, "-c", "import socket; socket.create_connection("
                          "('10.78.0.1', 8080), 1).close()").returncode == 0, timeout=20, what="control server")
    for i in (1, 2):
        cli(i, "up", "--login-server", "http://10.78.0.1:8080", "--authkey", key, "--hostname", f"node{i}")
    wait_until(lambda: ask(lan.nodes[0], "node2.tailnet").startswith("node2"), timeout=20, what="node1 -> node2")

    # lock init on node1 through its daemon: node1's and node2's lock keys are trusted.
    k1, k2 = lock_status(1)["node_lock_key"], lock_status(2)["node_lock_key"]
    out = cli(1, "lock", "init", "--gen-disablements", "1", k1, k2).stdout
    (secret,) = re.findall(r"disablement-secret:[0-9A-Fa-f]+", out)
    cli(1, "lock", "sign", nodes()["node2"]["node_key"])
    wait_until(lambda: lock_status(2)["enabled"] and lock_status(2)["head"] == lock_status(1)["head"],
               timeout=10, what="node2 following the lock")
    wait_until(lambda: lock_status(1).get("node_key_signed") and lock_status(2).get("node_key_signed"),
               timeout=10, what="node1 and node2 signed")
    assert ask(lan.nodes[0], "node2.tailnet").startswith("node2")

    # node3 joins the ordinary way: the control server puts it in everyone's map, unsigned.
    cli(3, "up", "--login-server", "http://10.78.0.1:8080", "--authkey", key, "--hostname", "node3")
    wait_until(lambda: any(p["name"] == "node3" for p in status(1)["tailnet_lock"]["locked_out"]),
               timeout=10, what="node3 locked out on node1")
    n3 = nodes()["node3"]
    assert n3["locked_out"] and nodes()["node1"]["locked_out"] is None
    assert "locked out" in run(*MESHNODE, "control", "nodes", "ls", "--db", str(db)).stdout
    addr3 = n3["addresses"][0]
    for i in (1, 2):
        ns = lan.nodes[i - 1]
        assert "node3" not in {p["name"] for p in status(i)["peers"]}
        assert sh(ns, "getent", "hosts", "node3.tailnet").returncode != 0
        assert sh(ns, "ping", "-c", "1", "-W", "1", addr3).returncode != 0
        assert not ask(ns, addr3).startswith("node3")
        assert any(p["name"] == "node3" and not p["signed"] for p in lock_status(i)["peers"])
        assert any("locked out" in h and "node3" in h for h in status(i)["health"])
    assert ask(lan.nodes[1], "node1.tailnet").startswith("node1")  # signed nodes keep working
    # ...and no rule of their packet filter names node3 (the `*` rules are split around it), while
    # the signed peer is still named.
    for i in (1, 2):
        for a in n3["addresses"]:
            assert not filter_names(i, a), (i, a)
        assert filter_names(i, nodes()[f"node{3 - i}"]["addresses"][0])

    # A node whose lock key is not trusted cannot sign.
    bad = cli(3, "lock", "sign", n3["node_key"], check=False)
    assert bad.returncode != 0 and "not trusted" in bad.stderr

    # Signing node3 on node2 lets it in everywhere within a second.
    # (Measured with node1's own clock of when it applied the map, since each CLI call here costs
    # a few hundred milliseconds of interpreter start-up.)
    cli(2, "lock", "sign", n3["node_key"])
    signed_at = time.time()
    def with_node3() -> dict[str, Any] | None:
        st = status(1)
        return st if "node3" in {p["name"] for p in st["peers"]} else None

    st = wait_until(with_node3, timeout=5, what="node3 in node1's peers")
    assert st["map"]["received_at"] - signed_at < 1.0
    wait_until(lambda: ask(lan.nodes[0], "node3.tailnet").startswith("node3"), timeout=10, what="node1 -> node3")
    assert sh(lan.nodes[0], "getent", "hosts", "node3.tailnet").returncode == 0
    assert nodes()["node3"]["locked_out"] is None
    wait_until(lambda: all(filter_names(1, a) for a in n3["addresses"]), timeout=5, what="node3 in node1's filter")

    # node2 gets a new node key: it signs it itself with a rotation signature (its lock key was
    # named as its rotation key when node1 signed it), so node1 keeps it without a `lock sign`.
    old_key = nodes()["node2"]["node_key"]
    cli(2, "up", "--force-reauth", "--login-server", "http://10.78.0.1:8080", "--authkey", key, "--hostname", "node2")
    new_key = nodes()["node2"]["node_key"]
    assert new_key != old_key
    wait_until(lambda: any(p["name"] == "node2" and p["node_key"] == new_key and p["signed"]
                           for p in lock_status(1)["peers"]), timeout=10, what="node2's new key signed, on node1")
    assert not status(1)["tailnet_lock"]["locked_out"] and nodes()["node2"]["locked_out"] is None
    wait_until(lambda: ask(lan.nodes[0], "node2.tailnet").startswith("node2"), timeout=10, what="node1 -> rotated node2")
    assert lock_status(2)["node_key_signed"]

    # The disablement secret turns the lock off on every node.
    cli(1, "lock", "disable", secret)
    wait_until(lambda: not any(lock_status(i)["enabled"] for i in (1, 2, 3)), timeout=15, what="lock off everywhere")
    assert ask(lan.nodes[1], "node3.tailnet").startswith("node3")
