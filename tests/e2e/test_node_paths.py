"""End to end: paths between multi-homed nodes, endpoints at the control server, and map changes
that must never interrupt traffic. Two node daemons (`--tun`) on the bridged LAN of
test_node_tunnel.py, plus two direct links between them:

    LAN 10.78.0.0/24 (control traffic only: UDP between the nodes is dropped there)
    net A 10.1.0.1 <-> 10.1.0.2   the first-sorted endpoint of each node: node2 drops all of it
    net B 10.2.0.1 <-> 10.2.0.2   the only way WireGuard can go

Before the path layer a peer was only ever sent to its first endpoint (10.1.0.x), so the two
never connected; and every map change put a peer back there.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Iterator

import pytest

from meshnode.control.store import ControlStore
from tests.e2e.test_node_routing import CONTROL, Tailnet, link
from tests.e2e.test_node_tunnel import WHO_SERVER, Lan, ask, run, sh
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]

BLOCK = """
table inet lab {
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "LAN" meta l4proto udp drop
    iifname "NETA" drop
  }
}
"""


def endpoints_at_control(net: Tailnet, name: str) -> tuple[str, ...]:
    store = ControlStore(net.db)
    try:
        return next(n.endpoints for n in store.list_nodes() if n.name == name)
    finally:
        store.close()


def lan_ifname(net: Tailnet, i: int) -> str:
    out = sh(net.ns(i), "ip", "-o", "addr", "show", "to", f"10.78.0.{10 + i}").stdout.split()
    return out[1].split("@")[0]


@pytest.fixture(scope="module")
def tailnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tailnet]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    lan = Lan(tmp_path_factory.mktemp("paths"), 2)
    try:
        lan.build()
        net = Tailnet(lan)
        link(net.ns(1), "10.1.0.1/24", net.ns(2), ("10.1.0.2/24",))
        link(net.ns(1), "10.2.0.1/24", net.ns(2), ("10.2.0.2/24",))
        for i in (1, 2):
            neta = sh(net.ns(i), "ip", "-o", "addr", "show", "to", f"10.1.0.{i}").stdout.split()[1].split("@")[0]
            rules = BLOCK.replace("LAN", lan_ifname(net, i)).replace("NETA", neta if i == 2 else "none")
            (lan.root / f"block{i}.nft").write_text(rules)
            run("ip", "netns", "exec", net.ns(i), "nft", "-f", str(lan.root / f"block{i}.nft"))
        net.start()
        key = net.control("authkey", "create", "--reusable")
        for i in (1, 2):
            net.cli(i, "up", "--login-server", f"http://{CONTROL}", "--authkey", key, "--hostname", f"node{i}")
            lan.popen(net.ns(i), sys.executable, "-c", WHO_SERVER, f"node{i}", log=lan.root / f"who{i}.log")
        net.key = key  # type: ignore[attr-defined]
        yield net
    finally:
        lan.destroy()


def peer(net: Tailnet, i: int) -> dict:
    return net.status(i)["peers"][0]


def test_multihomed_nodes_connect_over_the_address_that_works(tailnet: Tailnet) -> None:
    net = tailnet
    assert endpoints_at_control(net, "node2")[0].startswith("10.1.0.2:")  # first-sorted: dead
    addr2 = net.status(2)["self"]["addresses"][0]
    try:
        wait_until(lambda: ask(net.ns(1), "node2.tailnet", "4").startswith("node2 "), timeout=10,
                   what="node1 reaching node2 over net B")
    except AssertionError:
        print("DEBUG1", json.dumps(net.status(1)["tunnel"]), flush=True)
        print("DEBUG2", json.dumps(net.status(2)["tunnel"]), flush=True)
        raise
    wait_until(lambda: (peer(net, 1).get("path") or {}).get("endpoint") == "10.2.0.2:41641", timeout=10,
               what="node1's path to node2 is direct over net B")
    path = peer(net, 1)["path"]
    assert path["type"] == "direct" and path["relay_region"] is None and path["latency_ms"] < 100
    assert set(path) >= {"type", "endpoint", "relay_region", "latency_ms", "since"}
    text = net.cli(1, "status").stdout
    assert "direct 10.2.0.2:41641" in text, (text, peer(net, 1))
    out = net.cli(1, "ping", "node2", "-c", "1").stdout
    assert f"pong from node2 ({addr2}) via 10.2.0.2:41641 in " in out
    direct = net.cli(1, "ping", "node2", "-c", "5", "--until-direct").stdout.strip().splitlines()
    assert len(direct) == 1 and "via 10.2.0.2:41641" in direct[0]


PROBE = """
import socket, sys, time
ok = bad = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    t = time.monotonic()
    try:
        s = socket.create_connection((sys.argv[1], 8000), 0.5)
        s.settimeout(0.5)
        ok += bool(s.recv(100))
        s.close()
    except OSError:
        bad += 1
    time.sleep(max(0.0, 0.1 - (time.monotonic() - t)))
print(ok, bad)
"""


def test_map_changes_never_interrupt_traffic(tailnet: Tailnet) -> None:
    net = tailnet
    addr2 = net.status(2)["self"]["addresses"][0]
    wait_until(lambda: ask(net.ns(1), "node2.tailnet", "4").startswith("node2 "), timeout=10, what="tunnel up")
    version = net.status(1)["map"]["version"]
    probe = net.lan.popen(net.ns(1), sys.executable, "-c", PROBE, addr2, "10",
                          log=net.lan.root / "probe.out")
    policy = net.lan.root / "policy.json"
    policy.write_text(json.dumps({"tagOwners": {"tag:probe": []},
                                  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}))
    time.sleep(1.5)  # pacing the changes inside the 10 s probe, not synchronisation
    run(sys.executable, "-c", "from magicdns.cli import main; main()", "records", "--db", str(net.db),
        "add", "web", "A", "10.9.9.9")
    time.sleep(1.5)
    net.control("policy", "set", str(policy))
    time.sleep(1.5)
    net.control("nodes", "tag", "node2", "tag:probe")
    probe.wait(30)
    ok, bad = map(int, (net.lan.root / "probe.out").read_text().split())
    assert net.status(1)["map"]["version"] >= version + 3  # the three changes reached node1
    assert bad == 0 and ok >= 50


def test_up_again_keeps_the_endpoints_at_the_control_server(tailnet: Tailnet) -> None:
    net = tailnet
    wait_until(lambda: endpoints_at_control(net, "node1"), timeout=5, what="node1's endpoints reported")
    before = endpoints_at_control(net, "node1")
    net.cli(1, "up", "--login-server", f"http://{CONTROL}", "--authkey", net.key, "--hostname", "node1")  # type: ignore[attr-defined]
    assert endpoints_at_control(net, "node1") == before
    time.sleep(2)  # the endpoint watcher runs every second: nothing it does may erase them
    assert endpoints_at_control(net, "node1") == before
    netcheck = json.loads(net.cli(1, "netcheck", "--json").stdout)
    assert netcheck["endpoints"]["at_control"] == list(before)


def test_an_added_address_is_reported_within_5s_and_a_removed_one_too(tailnet: Tailnet) -> None:
    net = tailnet
    dev = lan_ifname(net, 1)
    sh(net.ns(1), "ip", "addr", "add", "10.78.0.99/24", "dev", dev)
    t = time.monotonic()
    wait_until(lambda: "10.78.0.99:41641" in endpoints_at_control(net, "node1"), timeout=5,
               what="the added address at the control server")
    added = time.monotonic() - t
    sh(net.ns(1), "ip", "addr", "del", "10.78.0.99/24", "dev", dev)
    wait_until(lambda: "10.78.0.99:41641" not in endpoints_at_control(net, "node1"), timeout=5,
               what="the removed address gone from the control server")
    # An interface set down takes its addresses out of the report.
    neta = sh(net.ns(1), "ip", "-o", "addr", "show", "to", "10.1.0.1").stdout.split()[1].split("@")[0]
    sh(net.ns(1), "ip", "link", "set", neta, "down")
    wait_until(lambda: "10.1.0.1:41641" not in endpoints_at_control(net, "node1"), timeout=5,
               what="a downed interface's address gone from the control server")
    sh(net.ns(1), "ip", "link", "set", neta, "up")
    wait_until(lambda: "10.1.0.1:41641" in endpoints_at_control(net, "node1"), timeout=5,
               what="the address back when the interface is up")
    assert added < 5


SINK = """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000))
s.listen()
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while True:
    data = c.recv(65536)
    if not data:
        break
    h.update(data)
    n += len(data)
print(n, h.hexdigest(), flush=True)
"""

SOURCE = """
import hashlib, os, socket, sys, time
c = socket.create_connection((sys.argv[1], 9000), 5)
c.settimeout(60)  # the move stalls the stream for seconds: TCP retransmits, we wait
h, n, end = hashlib.sha256(), 0, time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    chunk = os.urandom(16384)
    c.sendall(chunk)
    h.update(chunk)
    n += len(chunk)
    time.sleep(0.01)
c.shutdown(socket.SHUT_WR)
c.recv(1)
print(n, h.hexdigest(), flush=True)
"""


def test_a_node_that_moves_keeps_its_transfer(tailnet: Tailnet) -> None:
    """node2 leaves net B for a new network (net C, 10.3.0.0/24) while a TCP transfer from node1
    runs through the tunnel: both report and probe their new endpoints, and the transfer
    completes intact."""
    net = tailnet
    addr2 = net.status(2)["self"]["addresses"][0]
    wait_until(lambda: ask(net.ns(1), "node2.tailnet", "4").startswith("node2 "), timeout=10, what="tunnel up")
    sink = net.lan.popen(net.ns(2), sys.executable, "-c", SINK, addr2, log=net.lan.root / "sink.out")
    wait_until(lambda: "9000" in sh(net.ns(2), "ss", "-ltn").stdout, timeout=10, what="sink listening")
    source = net.lan.popen(net.ns(1), sys.executable, "-c", SOURCE, addr2, "14", log=net.lan.root / "source.out")
    time.sleep(3)  # pacing: move in the middle of the transfer
    link(net.ns(1), "10.3.0.1/24", net.ns(2), ("10.3.0.2/24",))
    netb = sh(net.ns(2), "ip", "-o", "addr", "show", "to", "10.2.0.2").stdout.split()[1].split("@")[0]
    sh(net.ns(2), "ip", "link", "set", netb, "down")
    wait_until(lambda: (peer(net, 1).get("path") or {}).get("endpoint") == "10.3.0.2:41641", timeout=15,
               what="node1's path to node2 on the new network")
    assert source.wait(60) == 0 and sink.wait(30) == 0
    sent = (net.lan.root / "source.out").read_text().split()
    got = (net.lan.root / "sink.out").read_text().split()
    assert sent == got and int(sent[0]) > 0
