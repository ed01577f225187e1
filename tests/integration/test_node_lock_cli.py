"""`meshnode lock` through running daemons (userspace, real control server, real MagicDNS): the
commands go through the LocalAPI, and a peer that is not signed is not resolvable."""

from __future__ import annotations

import json
import re

from tests.integration.test_node_cluster import Cluster, cluster  # noqa: F401 (fixture)
from tests.support import wait_until


def test_lock_commands_go_through_the_daemon_and_unsigned_peers_do_not_resolve(cluster: Cluster) -> None:
    alpha, bravo, charlie = cluster.nodes
    key = cluster.authkey()
    for n in (alpha, bravo, charlie):
        n.start()
        n.up(cluster.control, key)
    wait_until(lambda: alpha.resolve("charlie.tailnet")[1] and alpha.resolve("bravo.tailnet")[1], timeout=10,
               what="names before the lock")

    def lock_status(n) -> dict:
        r = n.cli("lock", "status", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    ka, kb = lock_status(alpha)["node_lock_key"], lock_status(bravo)["node_lock_key"]
    # bravo reported its lock key to the control server: alpha's map carries it.
    wait_until(lambda: kb in (alpha.state / "netmap.json").read_text(), timeout=10, what="bravo's lock key in the map")
    r = alpha.cli("lock", "init", "--gen-disablements", "1", ka, kb)
    assert r.returncode == 0, r.stderr
    assert "bravo" in r.stdout and "charlie" not in r.stdout   # `lock init` signed bravo, whose key it trusts
    (secret,) = re.findall(r"disablement-secret:[0-9A-Fa-f]+", r.stdout)
    # Node keys as the control server lists them (alpha no longer shows unsigned peers at all).
    nodes = {n.name: {"node_key": n.node_key} for n in cluster.admin.list_nodes()}
    # The daemon wrote the chain: the files are its, nothing is left queued in its outbox.
    outbox = json.loads((alpha.state / "tka" / "outbox.json").read_text())
    assert outbox["signatures"] == {} and "init_genesis" not in outbox

    # charlie is unsigned: alpha's and bravo's MagicDNS no longer answer for it; bravo still resolves.
    wait_until(lambda: alpha.resolve("charlie.tailnet")[0] == "NXDOMAIN"
               and bravo.resolve("charlie.tailnet")[0] == "NXDOMAIN", timeout=10, what="charlie locked out")
    assert alpha.resolve("bravo.tailnet")[1] and bravo.resolve("alpha.tailnet")[1]
    st = lock_status(alpha)
    assert st["enabled"] and st["node_key_signed"]
    assert {p["name"]: p["signed"] for p in st["peers"]} == {"bravo": True, "charlie": False}
    assert lock_status(bravo)["node_key_signed"]   # bravo's own key, signed by alpha's `lock init`
    human = alpha.cli("status")
    assert "locked out" in human.stdout + human.stderr and "charlie" in human.stdout + human.stderr
    assert "LOCKED OUT" in charlie.cli("lock", "status").stdout  # charlie knows it is locked out

    # An untrusted node cannot sign; a bad argument is a usage error, not a traceback.
    bad = charlie.cli("lock", "sign", nodes["bravo"]["node_key"])
    assert bad.returncode == 1 and "not trusted" in bad.stderr
    bad = alpha.cli("lock", "sign", "nodekey:zz")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr

    # `lock local-disable` on bravo: bravo alone stops enforcing.
    assert bravo.cli("lock", "local-disable").returncode == 0
    wait_until(lambda: bravo.resolve("charlie.tailnet")[1], timeout=10, what="charlie on bravo")
    assert alpha.resolve("charlie.tailnet")[0] == "NXDOMAIN"

    # Signing charlie on alpha: resolvable within a second.
    assert alpha.cli("lock", "sign", nodes["charlie"]["node_key"]).returncode == 0
    wait_until(lambda: alpha.resolve("charlie.tailnet")[1], timeout=1.0, what="charlie signed")

    # A restarted daemon keeps the chain and enforces at once (the saved map is the filtered one).
    alpha.stop()
    alpha.start()
    assert lock_status(alpha)["enabled"]

    # The disablement secret, through bravo's daemon: off everywhere.
    r = bravo.cli("lock", "disable", secret)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: not any(lock_status(n)["enabled"] for n in (alpha, bravo, charlie)), timeout=15,
               what="lock off everywhere")
