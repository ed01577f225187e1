"""End to end, connection logs on real tunnels: two node daemons with `--tun` in their own namespaces
(the LAN of test_node_tunnel.py), a policy that lets node1 reach node2 on TCP 8000 and UDP 9000 only.

    flow logs off by default; `control settings flow-logs on`     `status --json` flow_logs: true
    a 2 MB TCP transfer and a UDP exchange node1 -> node2         node1's records add up to its mn0
                                                                  counters (bytes, each way) within 1%
    node1 -> node2:8001 (blocked by the policy)                   node2 logs it as dropped ("no rule allowed tcp ...")
    the control server is killed, traffic flows, it restarts      the windows buffered meanwhile
                                                                  arrive; nothing is counted twice
    control killed again, node1's daemon exits, both come back    the saved windows (flows-pending.json)
                                                                  arrive from the new run, none twice
and, on another LAN, a subnet router that is also an exit node: records of `subnet` and `exit` kind
on both the client and the router.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.e2e.test_node_tunnel import MESHNODE, WHO_SERVER, Lan, ask, run, sh
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, needs_root]

POLICY = {"tagOwners": {"tag:a": [], "tag:b": []},
          "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["tag:b:8000,9000"]}]}

SERVER = """
import socket, threading
def tcp():
    s = socket.create_server(("0.0.0.0", 8000))
    while True:
        c, _ = s.accept()
        n = 0
        while True:
            d = c.recv(65536)
            if not d: break
            n += len(d)
        c.sendall(str(n).encode()); c.close()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 9000))
    while True:
        d, a = u.recvfrom(2048); u.sendto(d, a)
threading.Thread(target=tcp).start(); threading.Thread(target=udp).start()
"""
CLIENT = """
import socket, sys
host, what, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
addr = socket.getaddrinfo(host, 0, socket.AF_INET)[0][4][0]
if what == "tcp":
    s = socket.create_connection((addr, 8000), 5); s.sendall(b"x" * n); s.shutdown(socket.SHUT_WR)
    print(s.recv(100).decode())
elif what == "udp":
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2); got = 0
    for i in range(n):
        u.sendto(b"u" * 500, (addr, 9000))
        try: got += len(u.recv(2048))
        except socket.timeout: pass
    print(got)
else:
    s = socket.socket(); s.settimeout(1)
    try: s.connect((addr, 8001)); print("connected")
    except OSError: print("blocked")
"""


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


def counters(ns: str) -> tuple[int, int]:
    """(tx_bytes, rx_bytes) of mn0 in `ns`, as the kernel counts them."""
    st = json.loads(sh(ns, "ip", "-s", "-j", "link", "show", "mn0").stdout)[0]["stats64"]
    return st["tx"]["bytes"], st["rx"]["bytes"]


def test_flows_match_interface_counters_and_survive_a_control_restart(lan: Lan) -> None:
    db = lan.root / "control.db"
    serve = [*MESHNODE, "control", "serve", "--listen", "10.78.0.1:8080", "--db", str(db)]
    ctl = lan.popen(lan.ctl, *serve, log=lan.root / "control.log")
    (lan.root / "policy.json").write_text(json.dumps(POLICY))
    run(*MESHNODE, "control", "policy", "set", str(lan.root / "policy.json"), "--db", str(db))
    keys = [run(*MESHNODE, "control", "authkey", "create", "--reusable", "--tags", tag, "--db",
                str(db)).stdout.strip() for tag in ("tag:a", "tag:b")]
    socks, daemons = [], []

    def start_daemon(i: int, ns: str, log_name: str = "daemon.log") -> Any:
        d = lan.root / f"node{i}"
        return lan.popen(ns, *MESHNODE, "daemon", "--state-dir", str(d / "state"), "--socket", str(d / "mn.sock"),
                         "--tun", "mn0", "--resolv-conf", f"/etc/netns/{ns}/resolv.conf", "-v", log=d / log_name)

    for i, ns in enumerate(lan.nodes, 1):
        d = lan.root / f"node{i}"
        d.mkdir()
        socks.append(d / "mn.sock")
        daemons.append(start_daemon(i, ns))
    lan.popen(lan.nodes[1], sys.executable, "-c", SERVER, log=lan.root / "server.log")

    def cli(i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", lan.nodes[i - 1], *MESHNODE, "--socket", str(socks[i - 1]),
                   *args, check=check, timeout=60)

    def client(*args: str) -> str:
        return sh(lan.nodes[0], sys.executable, "-c", CLIENT, "node2.tailnet", *args, timeout=60).stdout.strip()

    def flows(*args: str) -> list[dict[str, Any]]:
        return json.loads(run(*MESHNODE, "control", "flows", "ls", "--json", "--limit", "100000", "--db", str(db),
                              *args).stdout)

    for i in (1, 2):
        wait_until(lambda i=i: cli(i, "status", "--json", check=False).returncode == 0, timeout=20,
                   what=f"node{i}'s daemon")
    wait_until(lambda: sh(lan.nodes[0], sys.executable, "-c", "import socket; socket.create_connection("
                          "('10.78.0.1', 8080), 1).close()").returncode == 0, timeout=20, what="control server")
    for i in (1, 2):
        cli(i, "up", "--login-server", "http://10.78.0.1:8080", "--authkey", keys[i - 1], "--hostname", f"node{i}")
    wait_until(lambda: client("udp", "1") == "500", timeout=20, what="node1 -> node2 UDP")
    assert json.loads(cli(1, "status", "--json").stdout)["flow_logs"] is False
    assert flows() == []

    run(*MESHNODE, "control", "settings", "flow-logs", "on", "--db", str(db))
    wait_until(lambda: all(json.loads(cli(i, "status", "--json").stdout)["flow_logs"] for i in (1, 2)),
               timeout=10, what="flow logs on")
    tx0, rx0 = counters(lan.nodes[0])
    assert client("tcp", str(2_000_000)) == "2000000"
    assert client("udp", "200") == str(200 * 500)
    assert client("blocked", "0") == "blocked"
    tx1, rx1 = counters(lan.nodes[0])

    def sums(node: str) -> tuple[int, int]:
        fs = [f for f in flows("--node", node) if not f["dropped"]]
        return sum(f["tx_bytes"] for f in fs), sum(f["rx_bytes"] for f in fs)

    wait_until(lambda: abs(sums("node1")[0] - (tx1 - tx0)) <= 0.01 * (tx1 - tx0), timeout=20,
               what="node1's TX records")
    wait_until(lambda: abs(sums("node1")[1] - (rx1 - rx0)) <= 0.01 * (rx1 - rx0), timeout=20,
               what="node1's RX records")
    tcp = [f for f in flows("--node", "node1", "--peer", "node2") if f["proto"] == 6 and f["dport"] == 8000]
    # One record per direction of a connection (source and destination as the packets carry them).
    udp = [f for f in flows("--node", "node1", "--peer", "node2") if f["proto"] == 17 and 9000 in (f["dport"], f["sport"])]
    assert sum(f["tx_bytes"] for f in tcp) > 2_000_000 and all(f["kind"] == "tunnel" for f in tcp + udp)
    assert sum(f["tx_packets"] for f in udp) == 200 and sum(f["rx_packets"] for f in udp) == 200
    assert sum(f["tx_bytes"] for f in udp) == 200 * 528  # whole IP packets: 20 + 8 + 500
    wait_until(lambda: any(f["dport"] == 8001 and f["rule"].startswith("no rule allowed tcp ") for f in flows("--node", "node2",
                                                                                              "--dropped")),
               timeout=20, what="the blocked connection logged as dropped on node2")

    # The control server goes away; traffic goes on; the windows wait on the node and arrive once.
    before = sums("node1")
    ctl.send_signal(signal.SIGTERM)
    ctl.wait(timeout=10)
    tx2, rx2 = counters(lan.nodes[0])
    assert client("udp", "100") == str(100 * 500)
    tx3, rx3 = counters(lan.nodes[0])
    wait_until(lambda: json.loads(cli(1, "status", "--json").stdout)["control"]["error"], timeout=20,
               what="node1 noticing the control server is gone")
    ctl2 = lan.popen(lan.ctl, *serve, log=lan.root / "control2.log")
    want_tx, want_rx = before[0] + (tx3 - tx2), before[1] + (rx3 - rx2)
    wait_until(lambda: sums("node1")[0] >= want_tx * 0.99, timeout=30, what="buffered windows uploaded")
    got = sums("node1")
    assert abs(got[0] - want_tx) <= 0.01 * want_tx and abs(got[1] - want_rx) <= 0.01 * want_rx

    # The control server goes away again and node1's daemon exits before it comes back: the windows
    # not yet acknowledged are saved in the state dir and the next run uploads them, none twice.
    wait_until(lambda: json.loads(cli(1, "status", "--json").stdout)["flow_logs"] and not
               json.loads(cli(1, "status", "--json").stdout)["control"]["error"], timeout=20, what="control back")
    before = sums("node1")
    ctl2.send_signal(signal.SIGTERM)
    ctl2.wait(timeout=10)
    wait_until(lambda: json.loads(cli(1, "status", "--json").stdout)["control"]["error"], timeout=20,
               what="node1 noticing the control server is gone again")
    tx4, rx4 = counters(lan.nodes[0])
    assert client("udp", "50") == str(50 * 500)
    tx5, rx5 = counters(lan.nodes[0])
    daemons[0].send_signal(signal.SIGTERM)
    daemons[0].wait(timeout=20)
    pending = lan.root / "node1" / "state" / "flows-pending.json"
    assert pending.exists() and json.loads(pending.read_text())["windows"]
    lan.popen(lan.ctl, *serve, log=lan.root / "control3.log")
    start_daemon(1, lan.nodes[0], "daemon2.log")
    want_tx, want_rx = before[0] + (tx5 - tx4), before[1] + (rx5 - rx4)
    wait_until(lambda: sums("node1")[0] >= want_tx * 0.99 and not pending.exists(), timeout=40,
               what="saved windows uploaded after the daemon restart")
    got = sums("node1")
    assert abs(got[0] - want_tx) <= 0.01 * want_tx and abs(got[1] - want_rx) <= 0.01 * want_rx


def test_subnet_route_and_exit_node_flows_are_logged_with_their_kind(tmp_path: Path) -> None:
    """node2 routes 10.77.0.0/24 (a namespace with no node) and is node1's exit node toward
    198.18.0.10 (another namespace); node1's and node2's records say subnet and exit."""
    from tests.e2e.test_node_routing import add_netns, link

    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    lan = Lan(tmp_path, 2)
    try:
        lan.build()
        db = lan.root / "control.db"
        corp, inet = add_netns(lan, "corp"), add_netns(lan, "inet")
        link(lan.nodes[1], "10.77.0.1/24", corp, ("10.77.0.10/24",))
        link(lan.nodes[1], "198.18.0.1/24", inet, ("198.18.0.10/24",))
        lan.popen(corp, sys.executable, "-c", WHO_SERVER, "corp", log=lan.root / "corp.log")
        lan.popen(inet, sys.executable, "-c", WHO_SERVER, "inet", log=lan.root / "inet.log")
        lan.popen(lan.ctl, *MESHNODE, "control", "serve", "--listen", "10.78.0.1:8080", "--db", str(db),
                  log=lan.root / "control.log")
        socks = []
        for i, ns in enumerate(lan.nodes, 1):
            d = lan.root / f"node{i}"
            d.mkdir()
            socks.append(d / "mn.sock")
            lan.popen(ns, *MESHNODE, "daemon", "--state-dir", str(d / "state"), "--socket", str(d / "mn.sock"),
                      "--tun", "mn0", "--resolv-conf", f"/etc/netns/{ns}/resolv.conf", "-v", log=d / "daemon.log")

        def cli(i: int, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
            return run("ip", "netns", "exec", lan.nodes[i - 1], *MESHNODE, "--socket", str(socks[i - 1]),
                       *args, check=check, timeout=60)

        for i in (1, 2):
            wait_until(lambda i=i: cli(i, "status", "--json", check=False).returncode == 0, timeout=20,
                       what=f"node{i}'s daemon")
        wait_until(lambda: sh(lan.nodes[0], sys.executable, "-c", "import socket; socket.create_connection("
                              "('10.78.0.1', 8080), 1).close()").returncode == 0, timeout=20, what="control")
        key = run(*MESHNODE, "control", "authkey", "create", "--reusable", "--db", str(db)).stdout.strip()
        login = ("--login-server", "http://10.78.0.1:8080", "--authkey", key)
        cli(2, "up", *login, "--hostname", "node2", "--advertise-routes", "10.77.0.0/24",
            "--advertise-exit-node", "true")
        cli(1, "up", *login, "--hostname", "node1", "--accept-routes", "true")
        run(*MESHNODE, "control", "routes", "approve", "node2", "10.77.0.0/24,0.0.0.0/0,::/0", "--db", str(db))
        wait_until(lambda: any(p["name"] == "node2" and p["exit_node"]
                               for p in json.loads(cli(1, "status", "--json").stdout)["peers"]),
                   timeout=10, what="node2 approved")
        cli(1, "set", "--exit-node", "node2")
        run(*MESHNODE, "control", "settings", "flow-logs", "on", "--db", str(db))
        wait_until(lambda: all(json.loads(cli(i, "status", "--json").stdout)["flow_logs"] for i in (1, 2)),
                   timeout=10, what="flow logs on")
        wait_until(lambda: ask(lan.nodes[0], "10.77.0.10") == "corp 10.77.0.1", timeout=15, what="subnet")
        wait_until(lambda: ask(lan.nodes[0], "198.18.0.10") == "inet 198.18.0.1", timeout=15, what="exit")

        def kinds(node: str) -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            for f in json.loads(run(*MESHNODE, "control", "flows", "ls", "--json", "--node", node, "--db",
                                    str(db)).stdout):
                for addr in (f["src"], f["dst"]):
                    if addr in ("10.77.0.10", "198.18.0.10"):
                        out.setdefault(addr, set()).add(f["kind"])
            return out

        want = {"10.77.0.10": {"subnet"}, "198.18.0.10": {"exit"}}
        wait_until(lambda: kinds("node1") == want, timeout=20, what="node1's subnet and exit records")
        wait_until(lambda: kinds("node2") == want, timeout=20, what="node2's subnet and exit records")
        recs = json.loads(run(*MESHNODE, "control", "flows", "ls", "--json", "--node", "node1", "--peer", "node2",
                              "--db", str(db)).stdout)
        assert any(f["dst"] == "198.18.0.10" and f["dport"] == 8000 and f["tx_packets"] > 0 for f in recs)
    finally:
        lan.destroy()
