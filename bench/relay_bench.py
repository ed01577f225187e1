"""Relay benchmark (run by hand, as root, through `bench/relay.sh`): in one run on the same namespaces,

- `meshnode up` to the first packet answered through the relay (UDP between the nodes dropped);
- iperf3 TCP throughput and ping latency through our tunnel over the relay, over a direct path, and
  through a Debian `wireguard-go` pair between the same two node namespaces (the reference);
- CPU seconds per GB carried: the relay server's, and the two tunnel processes' (from /proc/PID/stat).

The relay is a standalone `meshnode derp serve` (region 900, admitting the control database's nodes),
so its CPU is its own. Traffic stays inside the namespaces made here (the LAN of
tests/e2e/test_node_tunnel.py: 10.78.0.0/24), which are deleted at the end, even on failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshnode.wg.crypto import clamp, encode_key, public_key  # noqa: E402
from tests.e2e.netns import MESHNODE, run  # noqa: E402
from tests.e2e.test_node_relay import BLOCK  # noqa: E402
from tests.e2e.test_node_routing import CONTROL, Tailnet  # noqa: E402
from tests.e2e.test_node_tunnel import Lan  # noqa: E402
from tests.support import wait_until  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
RELAY_PORT = 8443

# In node1's namespace: an ICMP echo to argv[1] every 20 ms (errors ignored: there is no route
# before `up`) until one is answered; prints the wall time of that first answer. Bounded by argv[2] s.
FIRST_PACKET = r"""
import os, socket, struct, sys, time
sys.path.insert(0, os.getcwd())
from tests.e2e.netns import _checksum
dst, until = sys.argv[1], time.time() + float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(0.02)
ident, seq = os.getpid() & 0xFFFF, 0
print("ready", flush=True)
while time.time() < until:
    seq = (seq + 1) & 0xFFFF
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
    try:
        s.sendto(struct.pack("!BBHHH", 8, 0, _checksum(head + b"x" * 16), ident, seq) + b"x" * 16, (dst, 0))
    except OSError:
        pass
    t = time.time() + 0.02
    while time.time() < t:
        try:
            r, (src, _) = s.recvfrom(2048)
        except (socket.timeout, OSError):
            break
        ihl = (r[0] & 15) * 4
        if src == dst and r[ihl] == 0 and struct.unpack("!H", r[ihl + 4:ihl + 6])[0] == ident:
            print(f"first {time.time():.4f}", flush=True)
            sys.exit(0)
sys.exit(1)
"""


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
    return total / TICK


def block(net: Tailnet, on: bool) -> None:
    for i in (1, 2):
        run("ip", "netns", "exec", net.ns(i), "nft", "delete", "table", "inet", "lab", check=False)
        if on:
            (net.lan.root / "block.nft").write_text(BLOCK)
            run("ip", "netns", "exec", net.ns(i), "nft", "-f", str(net.lan.root / "block.nft"))


def path(net: Tailnet, i: int) -> dict:
    peers = net.status(i)["peers"]
    return (peers[0].get("path") or {}) if peers else {}


def iperf(net: Tailnet, server_ip: str, seconds: int, cpu_pids: dict[str, list[int]]) -> dict:
    """One iperf3 TCP stream node1 -> node2's `server_ip`: Mbit/s and CPU s/GB per process group."""
    ns1, ns2 = net.ns(1), net.ns(2)
    server = net.lan.popen(ns2, "iperf3", "-s", "-1", "-B", server_ip, log=net.lan.root / "iperf3-s.log")
    wait_until(lambda: ":5201" in run("ip", "netns", "exec", ns2, "ss", "-Hltn").stdout, timeout=10,
               what="iperf3 -s")
    before = {k: cpu_seconds(p) for k, p in cpu_pids.items()}
    out = run("ip", "netns", "exec", ns1, "iperf3", "-c", server_ip, "-t", str(seconds), "-J",
              timeout=seconds + 30).stdout
    after = {k: cpu_seconds(p) for k, p in cpu_pids.items()}
    server.wait(timeout=10)
    end = json.loads(out)["end"]["sum_received"]
    gb = end["bytes"] / 1e9
    return {"mbps": end["bits_per_second"] / 1e6,
            **{f"cpu_{k}": (after[k] - before[k]) / gb for k in cpu_pids}}


def ping_ms(net: Tailnet, dst: str, count: int = 50) -> float:
    out = run("ip", "netns", "exec", net.ns(1), sys.executable, "tests/e2e/netns.py", "ping", dst, str(count),
              "1.0", timeout=count * 2 + 10).stdout
    return statistics.median(float(x) for x in out.split()) * 1e3


def run_wireguard_go(net: Tailnet) -> list[int]:
    """A wireguard-go pair on the nodes' LAN addresses, tunnel 10.210.0.1 (node1) <-> 10.210.0.2."""
    k = [clamp(os.urandom(32)) for _ in (1, 2)]
    pids = []
    for i in (1, 2):
        # /var/run/wireguard is shared by every namespace: one name per side.
        ns, ifname = net.ns(i), f"wgref{i}"
        p = net.lan.popen(ns, "wireguard-go", "-f", ifname, log=net.lan.root / f"wg-go{i}.log")
        wait_until(lambda: run("ip", "netns", "exec", ns, "wg", "show", ifname, check=False).returncode == 0,
                   timeout=10, what="wireguard-go")
        conf = net.lan.root / f"wg{i}.conf"
        conf.write_text(f"[Interface]\nPrivateKey={encode_key(k[i - 1])}\nListenPort=51821\n"
                        f"[Peer]\nPublicKey={encode_key(public_key(k[2 - i]))}\n"
                        f"AllowedIPs=10.210.0.{3 - i}/32\nEndpoint=10.78.0.{13 - i}:51821\n")
        run("ip", "netns", "exec", ns, "wg", "setconf", ifname, str(conf))
        run("ip", "-n", ns, "addr", "add", f"10.210.0.{i}/24", "dev", ifname)
        run("ip", "-n", ns, "link", "set", ifname, "mtu", "1280", "up")
        pids.append(p.pid)
    return pids


def main(seconds: int) -> None:
    load = os.getloadavg()
    root = Path(tempfile.mkdtemp(prefix="relaybench"))
    lan = Lan(root, 2)
    net = Tailnet(lan)
    rows: list[tuple[str, dict, float]] = []
    try:
        lan.build()
        (root / "derpmap.json").write_text(json.dumps({"Regions": {"900": {
            "RegionID": 900, "RegionCode": "bench", "RegionName": "Bench", "Nodes": [{
                "Name": "900a", "RegionID": 900, "HostName": "10.78.0.1", "DERPPort": RELAY_PORT,
                "STUNPort": 3478, "HTTPOnly": True}]}}}))
        block(net, True)
        lan.popen(lan.ctl, *MESHNODE, "control", "serve", "--listen", CONTROL, "--db", str(net.db),
                  "--derp-map", str(root / "derpmap.json"), log=root / "control.log")
        relay = lan.popen(lan.ctl, *MESHNODE, "derp", "serve", "--listen", f"10.78.0.1:{RELAY_PORT}",
                          "--control-db", str(net.db), log=root / "relay.log")
        for i in (1, 2):
            net.dir(i).mkdir()
            net.start_daemon(i)
        for i in (1, 2):
            net.wait_daemon(i)
        wait_until(lambda: net.sh(1, sys.executable, "-c", "import socket; socket.create_connection("
                                  "('10.78.0.1', 8080), 1).close(); socket.create_connection("
                                  f"('10.78.0.1', {RELAY_PORT}), 1).close()").returncode == 0,
                   timeout=30, what="control server and relay")
        key = net.control("authkey", "create", "--reusable")
        net.cli(2, "up", "--login-server", f"http://{CONTROL}", "--authkey", key, "--hostname", "node2")
        addr2 = net.status(2)["self"]["addresses"][0]

        # `up` to the first answered packet, UDP between the nodes dropped: the relay's answer.
        first = subprocess.Popen(["ip", "netns", "exec", net.ns(1), sys.executable, "-c", FIRST_PACKET, addr2,
                                  "40"], stdout=subprocess.PIPE, text=True, start_new_session=True)
        lan.procs.append(first)  # type: ignore[arg-type]
        assert first.stdout is not None and first.stdout.readline().strip() == "ready"
        t0 = time.time()
        net.cli(1, "up", "--login-server", f"http://{CONTROL}", "--authkey", key, "--hostname", "node1")
        up_returned = time.time() - t0
        line = first.stdout.readline().split()
        first.wait(45)
        if line[:1] != ["first"]:
            raise RuntimeError("no packet crossed the relay within 40 s of `up`")
        up_to_first = float(line[1]) - t0
        p = path(net, 1)
        if p.get("type") != "relay":
            raise RuntimeError(f"expected the relay path, got {p}")

        daemons = [net.daemons[1].pid, net.daemons[2].pid]
        cpu = {"relay": [relay.pid], "tunnel": daemons}
        r = iperf(net, addr2, seconds, cpu)
        if path(net, 1).get("type") != "relay":
            raise RuntimeError("left the relay during the iperf3 run")
        rows.append(("meshnode relay", r, ping_ms(net, addr2)))

        block(net, False)
        wait_until(lambda: path(net, 1).get("type") == "direct" and path(net, 2).get("type") == "direct",
                   timeout=30, what="a direct path once UDP passes")
        r = iperf(net, addr2, seconds, {"tunnel": daemons})
        if path(net, 1).get("type") != "direct":
            raise RuntimeError("left the direct path during the iperf3 run")
        rows.append(("meshnode direct", r, ping_ms(net, addr2)))

        wg = run_wireguard_go(net)
        wait_until(lambda: run("ip", "netns", "exec", net.ns(1), sys.executable, "tests/e2e/netns.py", "ping",
                               "10.210.0.2", "1", "1", check=False).returncode == 0, timeout=15, what="wireguard-go")
        rows.append(("wireguard-go", iperf(net, "10.210.0.2", seconds, {"tunnel": wg}), ping_ms(net, "10.210.0.2")))
    finally:
        lan.destroy()
        if os.environ.get("KEEP"):
            print(f"logs kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)

    ref = rows[-1]
    print(f"\niperf3 TCP node1 -> node2, one stream, {seconds} s each; ping: median of 50 ICMP echoes; "
          f"CPU: seconds per GB carried; {os.cpu_count()} CPUs, load average {load[0]:.1f} at the start")
    print(f"{'path':<17}{'Mbit/s':>8}{'x wg-go':>9}{'ping ms':>9}{'x wg-go':>9}"
          f"{'tunnels CPU s/GB':>18}{'x wg-go':>9}{'relay CPU s/GB':>16}")
    for name, r, ms in rows:
        relay_cpu = f"{r['cpu_relay']:16.2f}" if "cpu_relay" in r else f"{'-':>16}"
        print(f"{name:<17}{r['mbps']:8.1f}{r['mbps'] / ref[1]['mbps']:9.2f}{ms:9.3f}{ms / ref[2]:9.2f}"
              f"{r['cpu_tunnel']:18.2f}{r['cpu_tunnel'] / ref[1]['cpu_tunnel']:9.2f}{relay_cpu}")
    relay_ms, direct_ms = rows[0][2], rows[1][2]
    print(f"\nthe relay adds {relay_ms - direct_ms:.3f} ms at the median ({relay_ms:.3f} vs {direct_ms:.3f} direct)")
    print(f"`meshnode up` to the first packet answered through the relay: {up_to_first:.2f} s "
          f"(the `up` command itself returned after {up_returned:.2f} s)")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally: namespaces go away
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
