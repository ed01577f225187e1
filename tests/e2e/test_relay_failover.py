"""End to end: relay failover under traffic. Two node daemons whose direct UDP is blocked (nftables in
each node namespace) reach each other only through relay region 900, two meshed standalone
`meshnode derp serve` processes (900a first in the map, 900b second) that admit the control
server's nodes. While a prober in node1's namespace opens a new TCP connection, sends an ICMP echo
and exchanges a line on one long-lived TCP connection every 100 ms:

- 900a, the server both nodes use, is killed with -9: traffic resumes through 900b within 5 s
  (the DERP client moves at once on the broken connection; measured gaps are printed);
- 900a comes back: nothing breaks (no failed probe), its mesh link is back;
- 900b is killed with -9: the nodes move back to 900a, again within 5 s.
The long-lived connection is never reset and every line it carried was echoed in order.

    ctl namespace: bridge 10.78.0.1/24; control server :8080 (--derp-map), relays :8081 and :8082
    node namespace i: 10.78.0.1<i>/24, meshnode daemon --tun mn0
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.test_node_relay import BLOCK, block
from tests.e2e.test_node_routing import CONTROL, Tailnet
from tests.e2e.test_node_tunnel import MESHNODE, WHO_SERVER, Lan, run
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.root, needs_root]

FAILOVER_BOUND = 5.0   # seconds from kill -9 to traffic flowing again through the other server
# A hung server is only noticed by silence: the DERP client pings after 2 s without a frame and gives
# up at 4.5 s (derp/client.py), then connects to the next server.
HUNG_BOUND = 7.0
# The long-lived connection's lost segments wait for TCP's retransmission timer, which doubles from
# ~0.2 s during the outage: after a 4.5 s outage the next retry may be ~6 s in.
HUNG_ECHO_BOUND = 13.0
RELAYS = {"900a": 8081, "900b": 8082}
STUN = {"900a": 3478, "900b": 3479}

# One line per probe round: "WALLTIME TCP ICMP ECHO", each 1 (answered within 0.5 s) or 0;
# ECHO is -1 once the long-lived connection broke (reset or closed): it is never retried.
PROBER = r"""
import socket, sys, time
from tests.e2e.netns import icmp_ping
dst, until = sys.argv[1], float(sys.argv[2])
echo = socket.create_connection((dst, 8001), timeout=5)
seq, buf, broken = 0, b"", False
while time.time() < until:
    t = time.time()
    tcp = 0
    try:
        c = socket.create_connection((dst, 8000), timeout=0.5)
        c.settimeout(0.5)
        tcp = int(c.recv(200).startswith(b"node2 "))
        c.close()
    except OSError:
        pass
    try:
        icmp_ping(dst, 1, 0.5)
        icmp = 1
    except (TimeoutError, OSError):
        icmp = 0
    ok = 0
    if not broken:
        seq += 1
        try:
            echo.sendall(b"%d\n" % seq)
            echo.settimeout(0.5)
            want = b"%d\n" % seq
            while not buf.endswith(want):
                more = echo.recv(4096)
                if not more:
                    raise ConnectionError("closed")
                buf += more
            # every line echoed, in order, none lost or repeated
            assert buf.split() == [b"%d" % i for i in range(1, seq + 1)], buf[-200:]
            ok = 1
        except socket.timeout:
            pass  # the echo comes later, when TCP retransmits through the new server
        except (OSError, ConnectionError, AssertionError) as exc:
            print("echo broken:", repr(exc), flush=True)
            broken = True
    print(f"{t:.3f} {tcp} {icmp} {-1 if broken else ok}", flush=True)
    time.sleep(max(0.0, 0.1 - (time.time() - t)))
print("done", seq, flush=True)
"""

ECHO_SERVER = """
import socket
s = socket.create_server(("0.0.0.0", 8001))
c, _ = s.accept()
while True:
    b = c.recv(4096)
    if not b:
        break
    c.sendall(b)
"""


class Rounds:
    """The prober's log: (time, tcp, icmp, echo) rounds."""

    def __init__(self, log: Path) -> None:
        self.log = log

    def read(self) -> list[tuple[float, int, int, int]]:
        rows = []
        for line in self.log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[0][0].isdigit():
                rows.append((float(parts[0]), int(parts[1]), int(parts[2]), int(parts[3])))
        return rows

    def all_ok_after(self, t: float, rounds: int = 3, cols: tuple[int, ...] = (1, 2, 3)) -> float | None:
        """The start of the first of `rounds` consecutive rounds begun after `t` whose probes `cols`
        (1 new TCP connection, 2 ICMP, 3 the long-lived connection) were all answered."""
        rows = [r for r in self.read() if r[0] > t]
        for i in range(len(rows) - rounds + 1):
            if all(r[c] == 1 for r in rows[i:i + rounds] for c in cols):
                return rows[i][0]
        return None

    def failures_between(self, a: float, b: float) -> list[tuple[float, int, int, int]]:
        return [r for r in self.read() if a <= r[0] <= b and not r[1] == r[2] == r[3] == 1]


class FailoverTailnet(Tailnet):
    relays: dict[str, subprocess.Popen[bytes]]

    def start_relay(self, name: str) -> None:
        port = RELAYS[name]
        other = [f"http://10.78.0.1:{p}/derp" for n, p in RELAYS.items() if n != name]
        self.relays[name] = self.lan.popen(
            self.lan.ctl, *MESHNODE, "derp", "serve", "--listen", f"10.78.0.1:{port}", "--stun-port",
            str(STUN[name]), "--mesh-with", ",".join(other), "--mesh-key-file", str(self.lan.root / "mesh.key"),
            "--control-db", str(self.db), log=self.lan.root / f"derp{name}.log")
        wait_until(lambda: self.relay_metrics(name) is not None, timeout=20, what=f"relay {name} listening")

    def kill_relay(self, name: str) -> float:
        proc = self.relays[name]
        # `ip netns exec` execs the command: this pid is the relay itself, killed without a goodbye.
        at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return at

    def relay_metrics(self, name: str) -> dict[str, float] | None:
        r = run("ip", "netns", "exec", self.lan.ctl, sys.executable, "-c",
                "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
                f"'http://10.78.0.1:{RELAYS[name]}/metrics', timeout=2).read().decode())", check=False)
        if r.returncode != 0:
            return None
        return {x.rsplit(" ", 1)[0]: float(x.rsplit(" ", 1)[1]) for x in r.stdout.splitlines()
                if x and not x.startswith("#")}

    def relayed(self, name: str) -> float:
        m = self.relay_metrics(name)
        return m["meshnode_derp_packets_relayed_total"] if m else -1.0


def path(net: Tailnet, i: int) -> dict:
    peers = net.status(i)["peers"]
    return (peers[0].get("path") or {}) if peers else {}


@pytest.fixture
def fnet(tmp_path: Path) -> Iterator[FailoverTailnet]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    lan = Lan(tmp_path, 2)
    net = FailoverTailnet(lan)
    net.relays = {}
    try:
        lan.build()
        yield net
    finally:
        for proc in net.relays.values():  # a frozen relay would sit out SIGTERM
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
        lan.destroy()


def bring_up(net: FailoverTailnet) -> str:
    """Control server, both relays, both nodes on 900a with UDP between them dropped: node2's address."""
    root = net.lan.root
    run(*MESHNODE, "derp", "meshkey", str(root / "mesh.key"))
    (root / "derpmap.json").write_text(json.dumps({"Regions": {"900": {
        "RegionID": 900, "RegionCode": "r900", "RegionName": "Two servers",
        "Nodes": [{"Name": n, "RegionID": 900, "HostName": "10.78.0.1", "DERPPort": p, "STUNPort": STUN[n],
                   "HTTPOnly": True} for n, p in RELAYS.items()]}}}))
    block(net, True)
    assert "udp drop" in BLOCK
    net.lan.popen(net.lan.ctl, *MESHNODE, "control", "serve", "--listen", CONTROL, "--db", str(net.db),
                  "--derp-map", str(root / "derpmap.json"), log=root / "control.log")
    for i in (1, 2):
        net.dir(i).mkdir()
        net.start_daemon(i)
    for i in (1, 2):
        net.wait_daemon(i)
    wait_until(lambda: net.sh(1, sys.executable, "-c", "import socket; socket.create_connection("
                              "('10.78.0.1', 8080), 1).close()").returncode == 0, timeout=20, what="control")
    for name in RELAYS:
        net.start_relay(name)
    key = net.control("authkey", "create", "--reusable")
    for i in (1, 2):
        net.cli(i, "up", "--login-server", f"http://{CONTROL}", "--authkey", key, "--hostname", f"node{i}")
    addr2 = net.status(2)["self"]["addresses"][0]
    net.lan.popen(net.ns(2), sys.executable, "-c", WHO_SERVER, "node2", log=root / "who2.log")
    net.lan.popen(net.ns(2), sys.executable, "-c", ECHO_SERVER, log=root / "echo2.log")
    wait_until(lambda: net.sh(1, sys.executable, "-c", "import socket; c = socket.create_connection("
                              f"('{addr2}', 8000), 1); c.settimeout(1); assert c.recv(99)").returncode == 0,
               timeout=20, what="node1 reaching node2 through the relay")
    for i in (1, 2):
        p = path(net, i)
        assert p["type"] == "relay" and p["relay_region"] == 900, p

    # Both nodes are on 900a (first in the map): their packets are relayed there, not on 900b.
    before = {n: net.relayed(n) for n in RELAYS}
    wait_until(lambda: net.sh(1, sys.executable, "tests/e2e/netns.py", "ping", addr2, "3", "1").returncode == 0,
               timeout=10, what="ICMP through the relay")
    assert net.relayed("900a") > before["900a"] and net.relayed("900b") == before["900b"]

    return addr2


def test_killed_relay_is_replaced_by_the_other_server_of_the_region(fnet: FailoverTailnet) -> None:
    net = fnet
    root = net.lan.root
    addr2 = bring_up(net)
    before = {n: net.relayed(n) for n in RELAYS}
    rounds = Rounds(root / "prober.log")
    prober = net.lan.popen(net.ns(1), sys.executable, "-c", PROBER, addr2, str(time.time() + 50), log=rounds.log)
    started = time.time()
    good = wait_until(lambda: rounds.all_ok_after(started, 5), timeout=10, what="the prober's first good rounds")

    # 900a dies: both nodes move to 900b and meet there.
    killed_a = net.kill_relay("900a")
    back = wait_until(lambda: rounds.all_ok_after(killed_a), timeout=FAILOVER_BOUND + 5,
                      what="traffic through 900b after kill -9 of 900a")
    gap_a = back - killed_a
    assert gap_a < FAILOVER_BOUND, f"traffic resumed {gap_a:.2f}s after 900a died"
    assert not rounds.failures_between(good, killed_a), "failed probes before the kill"
    assert net.relayed("900b") > before["900b"]
    for i in (1, 2):
        assert path(net, i)["type"] == "relay"

    # 900a comes back: it meshes with 900b again and nothing breaks.
    restarted = time.time()
    net.start_relay("900a")
    wait_until(lambda: (net.relay_metrics("900a") or {}).get("meshnode_derp_mesh_known_keys", 0) >= 2,
               timeout=10, what="900a learning the nodes on 900b through the mesh")
    calm_until = time.time() + 3
    wait_until(lambda: rounds.all_ok_after(calm_until, 1), timeout=10, what="rounds after 900a's return")
    assert not rounds.failures_between(restarted, calm_until), "900a's return broke traffic"

    # 900b dies: the nodes go back to the returned 900a.
    relayed_a = net.relayed("900a")
    killed_b = net.kill_relay("900b")
    back = wait_until(lambda: rounds.all_ok_after(killed_b), timeout=FAILOVER_BOUND + 5,
                      what="traffic through the returned 900a after kill -9 of 900b")
    gap_b = back - killed_b
    assert gap_b < FAILOVER_BOUND, f"traffic resumed {gap_b:.2f}s after 900b died"
    assert net.relayed("900a") > relayed_a

    # The long-lived connection survived both kills, every line echoed in order.
    os.kill(prober.pid, signal.SIGTERM)
    prober.wait(10)
    rows = rounds.read()
    assert all(r[3] != -1 for r in rows), "the long-lived TCP connection broke"
    assert "echo broken" not in rounds.log.read_text()
    lost = {k: sum(1 for r in rows if r[k] == 0) for k in (1, 2, 3)}
    print(f"failover: 900a killed -> traffic back in {gap_a:.2f}s; 900b killed -> back in {gap_b:.2f}s; "
          f"unanswered rounds of {len(rows)}: tcp {lost[1]}, icmp {lost[2]}, echo {lost[3]}")


def test_hung_relay_is_left_for_the_other_server_and_may_wake_up(fnet: FailoverTailnet) -> None:
    """900a freezes (SIGSTOP: its kernel still holds the connections open, nothing is answered, as when
    a host hangs): the nodes' DERP clients find it silent despite their pings and move to 900b within
    HUNG_BOUND. When 900a wakes up (SIGCONT) with its stale connections, nothing breaks."""
    net = fnet
    addr2 = bring_up(net)
    rounds = Rounds(net.lan.root / "prober.log")
    prober = net.lan.popen(net.ns(1), sys.executable, "-c", PROBER, addr2, str(time.time() + 40), log=rounds.log)
    started = time.time()
    wait_until(lambda: rounds.all_ok_after(started, 5), timeout=10, what="the prober's first good rounds")

    frozen = time.time()
    os.kill(net.relays["900a"].pid, signal.SIGSTOP)
    back = wait_until(lambda: rounds.all_ok_after(frozen, cols=(1, 2)), timeout=HUNG_BOUND + 5,
                      what="new connections and ICMP through 900b after 900a froze")
    gap = back - frozen
    assert gap < HUNG_BOUND, f"traffic resumed {gap:.2f}s after 900a froze"
    echo_back = wait_until(lambda: rounds.all_ok_after(frozen), timeout=HUNG_ECHO_BOUND + 5,
                           what="the long-lived connection moving again")
    echo_gap = echo_back - frozen
    assert echo_gap < HUNG_ECHO_BOUND, f"the long-lived connection resumed {echo_gap:.2f}s after 900a froze"
    for i in (1, 2):
        assert path(net, i)["type"] == "relay"

    relayed_b = net.relayed("900b")
    woke = time.time()
    os.kill(net.relays["900a"].pid, signal.SIGCONT)
    wait_until(lambda: net.relay_metrics("900a") is not None, timeout=10, what="900a answering again")
    calm_until = time.time() + 3
    wait_until(lambda: rounds.all_ok_after(calm_until, 1), timeout=10, what="rounds after 900a woke up")
    assert not rounds.failures_between(woke, calm_until), "900a waking up broke traffic"
    assert net.relayed("900b") > relayed_b, "the nodes left 900b for the stale 900a"

    os.kill(prober.pid, signal.SIGTERM)
    prober.wait(10)
    rows = rounds.read()
    assert all(r[3] != -1 for r in rows), "the long-lived TCP connection broke"
    lost = {k: sum(1 for r in rows if r[k] == 0) for k in (1, 2, 3)}
    print(f"hung relay: 900a frozen -> new connections and ICMP back in {gap:.2f}s, the long-lived "
          f"connection in {echo_gap:.2f}s; unanswered rounds of {len(rows)}: "
          f"tcp {lost[1]}, icmp {lost[2]}, echo {lost[3]}")
