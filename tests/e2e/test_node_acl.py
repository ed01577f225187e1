"""End to end, the ACL packet filter on the tunnel: two node daemons with `--tun` in their own
namespaces on the bridged LAN of test_node_tunnel.py, under a policy that lets node1 (tag:a) reach
node2 (tag:b) on TCP port 8000 but not 8001, and node2 reach node1 on 9000 only.

    node1 -> node2.tailnet:8000   connects (and node2's replies pass node1's filter as replies)
    node1 -> node2.tailnet:8001   no SYN-ACK: node2 drops the SYN and counts it
    node2 -> node1.tailnet:9000   connects: node1's replies pass node2's filter, which has no rule
                                  for them, because node2's send path tracked the connection
    policy set opening 8001       node1 connects within seconds, no restart

and, on the same LAN, `meshnode netcheck` with a tunnel (port, endpoints, direct handshake).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.test_node_tunnel import MESHNODE, Lan, run, sh
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]

# Answers every connection on each port given with "NAME PORT".
PORTS_SERVER = """
import socket, sys, threading
def serve(port):
    s = socket.create_server(("0.0.0.0", port), reuse_port=False)
    while True:
        c, _ = s.accept()
        c.sendall(f"{sys.argv[1]} {port}".encode())
        c.close()
threads = [threading.Thread(target=serve, args=(int(p),)) for p in sys.argv[2:]]
for t in threads: t.start()
"""
# Prints the server's answer, or "timeout"/"refused" (exit 0 either way: the outcome is the data).
CONNECT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
addr = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4]
s = socket.socket(); s.settimeout(float(sys.argv[3]))
try:
    s.connect(addr); print(s.recv(200).decode())
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
"""

POLICY = {"tagOwners": {"tag:a": [], "tag:b": []},
          "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["tag:b:8000"]},
                   {"action": "accept", "src": ["tag:b"], "dst": ["tag:a:9000"]}]}


@pytest.fixture
def lan(tmp_path: Path) -> Iterator[Lan]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    t = Lan(tmp_path, 2)
    try:
        t.build()
        yield t
    finally:
        t.destroy()


def connect(ns: str, host: str, port: int, timeout: float = 2.0) -> str:
    """From `ns`, connect by name (glibc, so MagicDNS) to `host`:`port`; the outcome as text."""
    r = sh(ns, sys.executable, "-c", CONNECT, host, str(port), str(timeout), timeout=timeout + 20)
    return r.stdout.strip() if r.returncode == 0 else f"error: {r.stderr.strip()[-200:]}"


def set_policy(db: Path, path: Path, policy: dict[str, Any]) -> None:
    path.write_text(json.dumps(policy))
    run(*MESHNODE, "control", "policy", "set", str(path), "--db", str(db))


def test_acl_allows_one_port_drops_another_and_passes_replies(lan: Lan) -> None:
    db = lan.root / "control.db"
    lan.popen(lan.ctl, *MESHNODE, "control", "serve", "--listen", "10.78.0.1:8080", "--db", str(db),
              log=lan.root / "control.log")
    set_policy(db, lan.root / "policy.json", POLICY)
    keys = [run(*MESHNODE, "control", "authkey", "create", "--reusable", "--tags", tag, "--db",
                str(db)).stdout.strip() for tag in ("tag:a", "tag:b")]
    socks = []
    for i, ns in enumerate(lan.nodes, 1):
        d = lan.root / f"node{i}"
        d.mkdir()
        socks.append(d / "mn.sock")
        lan.popen(ns, *MESHNODE, "daemon", "--state-dir", str(d / "state"), "--socket", str(d / "mn.sock"),
                  "--tun", "mn0", "--resolv-conf", f"/etc/netns/{ns}/resolv.conf", "-v",
                  log=d / "daemon.log")

    def cli(i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", lan.nodes[i - 1], *MESHNODE, "--socket", str(socks[i - 1]),
                   *args, check=check, timeout=60)

    def filter_status(i: int) -> dict[str, Any]:
        return json.loads(cli(i, "status", "--json").stdout)["tunnel"]["filter"]

    for i in (1, 2):
        wait_until(lambda i=i: cli(i, "status", "--json", check=False).returncode == 0, timeout=20,
                   what=f"node{i}'s daemon")
    wait_until(lambda: sh(lan.nodes[0], sys.executable, "-c", "import socket; socket.create_connection("
                          "('10.78.0.1', 8080), 1).close()").returncode == 0, timeout=20, what="control server")
    for i in (1, 2):
        cli(i, "up", "--login-server", "http://10.78.0.1:8080", "--authkey", keys[i - 1],
            "--hostname", f"node{i}")
    lan.popen(lan.nodes[0], sys.executable, "-c", PORTS_SERVER, "node1", "9000", log=lan.root / "srv1.log")
    lan.popen(lan.nodes[1], sys.executable, "-c", PORTS_SERVER, "node2", "8000", "8001",
              log=lan.root / "srv2.log")

    # The allowed port, by name, through the tunnel (the first try also waits for the servers).
    wait_until(lambda: connect(lan.nodes[0], "node2.tailnet", 8000) == "node2 8000", timeout=20,
               what="node1 reaching node2.tailnet:8000")
    f1, f2 = filter_status(1), filter_status(2)
    assert f2["rules"] >= 1 and f2["accepted"]["rule"] >= 1
    # node1's only rule is for port 9000: node2's answers from 8000 passed as replies.
    assert f1["accepted"]["reply"] >= 1

    # The other port: node2 drops the SYN (no answer at all, not even a reset) and counts it.
    before = f2["dropped"]["not_allowed"]
    assert connect(lan.nodes[0], "node2.tailnet", 8001) == "timeout"
    after = filter_status(2)["dropped"]["not_allowed"]
    assert after > before
    assert "# Packet filter:" in cli(2, "status").stdout

    # node2's own connection to node1: no rule of node2's covers node1's replies (they come from
    # port 9000 to an ephemeral port); they pass because node2's send path tracked the connection.
    replies_before = filter_status(2)["accepted"]["reply"]
    assert connect(lan.nodes[1], "node1.tailnet", 9000) == "node1 9000"
    assert filter_status(2)["accepted"]["reply"] > replies_before
    # ... and node1 keeps node2 out everywhere else.
    assert connect(lan.nodes[1], "node1.tailnet", 9001, timeout=1.0) == "timeout"

    # netcheck with a tunnel (on this LAN, to save another one's setup): the WireGuard port, the
    # endpoints the control server holds for us, and the direct handshake with node2.
    wait_until(lambda: "10.78.0.11:41641" in json.loads(cli(1, "netcheck", "--json").stdout)
               ["endpoints"]["at_control"], timeout=10, what="node1's endpoint at the control server")
    report = json.loads(cli(1, "netcheck", "--json").stdout)
    assert report["mode"] == "tunnel" and report["udp_port"] == 41641 and report["interface"] == "mn0"
    assert report["endpoints"]["local"] == ["10.78.0.11:41641"] and report["control"]["reachable"]
    (peer,) = report["peers"]
    assert peer["fqdn"] == "node2.tailnet" and peer["handshake"] is True
    assert peer["path"] == "direct" and peer["endpoint"] == "10.78.0.12:41641"
    human = cli(1, "netcheck").stdout
    assert "UDP: port 41641 on mn0" in human and "node2.tailnet  direct 10.78.0.12:41641, handshake" in human

    # A policy change opening 8001 takes effect without a restart, within a couple of seconds.
    version = json.loads(cli(2, "status", "--json").stdout)["map"]["version"]
    opened = json.loads(json.dumps(POLICY))
    opened["acls"][0]["dst"] = ["tag:b:8000,8001"]
    set_policy(db, lan.root / "policy2.json", opened)
    start = time.monotonic()
    wait_until(lambda: filter_status(2)["map_version"] > version, timeout=10,
               what="node2's new packet filter")
    wait_until(lambda: connect(lan.nodes[0], "node2.tailnet", 8001, timeout=1.0) == "node2 8001",
               timeout=10, what="node1 reaching node2.tailnet:8001 after the policy change")
    assert time.monotonic() - start < 5
    assert connect(lan.nodes[0], "node2.tailnet", 8000) == "node2 8000"
    assert filter_status(2)["error"] is None
