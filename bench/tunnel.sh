#!/bin/sh
# Tunnel benchmark (run by hand, as root): iperf3 TCP throughput, ping latency and CPU seconds per
# gigabyte across the bare veth, a wireguard-go tunnel and a meshnode tunnel between the same two
# network namespaces, measured in the same run, printed as a table with ratios to wireguard-go.
# Traffic stays inside the namespaces this script creates (and deletes, even on failure).
#   bench/tunnel.sh [SECONDS]        (default 5 s per iperf3 run)
#   MODES="tso" bench/tunnel.sh    (meshnode offload modes to measure; default: gro tso none)
#   HOOKS="filter flowlog" bench/tunnel.sh   (also meshnode gro with the daemon's packet filter hooks,
#                                    and with connection-log counting on top: the cost of flow logs)
set -eu
cd "$(dirname "$0")/.."
exec .venv/bin/python - "${1:-5}" <<'PY'
import json, os, signal, subprocess, sys, statistics
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the finally: namespaces go away
sys.path.insert(0, os.getcwd())
from pathlib import Path
import tempfile
from meshnode.wg.crypto import clamp, encode_key, public_key
from tests.e2e.netns import NetnsPair
from tests.support import wait_until

SECONDS = int(sys.argv[1])
# meshnode's TUN offload modes (MESHNODE_WG_OFFLOAD): gro = coalesced GSO writes (the default),
# tso = TSO reads as well, none = one packet per syscall.
MODES = os.environ.get("MODES", "gro tso none").split()
HOOKS = os.environ.get("HOOKS", "").split()
# A device like `meshnode wg`'s (offload gro) with the daemon's inbound filter and outbound tap
# (an allow-all rule, so every packet takes the rule path), or the same plus flow counting
# (meshnode/node/flowlog.py counting_hooks) with a harvest every 5 s as the daemon does.
HOOKED = """
import signal, sys, threading, time
from meshnode.wg.cli import resolve_peers
from meshnode.wg.config import load_config
from meshnode.wg.device import create_device
from meshnode.policy import PacketFilter
from meshnode.policy.rules import rules_from_json
from meshnode.node.flowlog import FlowCounter, counting_hooks
cfg = load_config(sys.argv[1])
dev = create_device(cfg.private_key, sys.argv[2], addresses=cfg.addresses, listen_port=cfg.listen_port,
                    mtu=cfg.mtu, peers=resolve_peers(cfg, sys.argv[1]), offload="gro")
pf = PacketFilter(rules_from_json([{"src": ["0.0.0.0/0"], "dst": ["0.0.0.0/0"], "ports": "*", "protos": [1, 6, 17]}]))
if sys.argv[3] == "filter":
    clock = time.monotonic
    dev.set_packet_filter(lambda p, k, now: pf.check(p, now), lambda p, k, now: pf.note_outbound(p, now))
else:
    counter = FlowCounter()
    dev.set_packet_filter(*counting_hooks(pf, counter))
    def harvest():
        while True:
            time.sleep(5)
            counter.harvest()
    threading.Thread(target=harvest, daemon=True).start()
print("listening", file=sys.stderr, flush=True)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
while not stop.wait(0.5):
    pass
dev.close()
"""
TICK = os.sysconf("SC_CLK_TCK")
MESHNODE = "import sys; from meshnode.cli import main; sys.argv[0] = 'meshnode'; main()"


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
    return total / TICK


def iperf(pair, server_ip, pids):
    server = pair.a.popen("iperf3", "-s", "-1", "-B", server_ip, stdout=subprocess.DEVNULL)
    wait_until(lambda: ":5201" in pair.a.run("ss", "-Hltn").stdout, timeout=10, what="iperf3 -s")
    before = cpu_seconds(pids)
    out = pair.b.run("iperf3", "-c", server_ip, "-t", str(SECONDS), "-J",
                     timeout=SECONDS + 30).stdout
    cpu = cpu_seconds(pids) - before
    server.wait(timeout=10)
    end = json.loads(out)["end"]["sum_received"]
    gbytes = end["bytes"] / 1e9
    return end["bits_per_second"] / 1e9, (cpu / gbytes if pids else None)


def latency(pair, dst):
    rtts = pair.b.ping(dst, count=50, timeout=1.0)
    if rtts is None:
        raise RuntimeError(f"ping {dst} failed")
    return statistics.median(rtts) * 1e3


def keys():
    k = clamp(os.urandom(32))
    return k, public_key(k)


def run_wireguard_go(pair, tmp, ka, kb):
    procs = []
    for ns, own, peer, ip, peer_ip, ep in ((pair.a, ka, kb, "10.210.0.1", "10.210.0.2", pair.b_addr),
                                           (pair.b, kb, ka, "10.210.0.2", "10.210.0.1", pair.a_addr)):
        ifname = f"g{ns.name}"[:15]
        p = ns.popen("wireguard-go", "-f", ifname, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
        wait_until(lambda: Path(f"/var/run/wireguard/{ifname}.sock").exists(), timeout=10)
        conf = tmp / f"{ifname}.conf"
        conf.write_text(f"[Interface]\nPrivateKey={encode_key(own[0])}\nListenPort=51821\n"
                        f"[Peer]\nPublicKey={encode_key(peer[1])}\nAllowedIPs={peer_ip}/32\n"
                        f"Endpoint={ep}:51821\n")
        ns.run("wg", "setconf", ifname, str(conf))
        ns.run("ip", "addr", "add", f"{ip}/24", "dev", ifname)
        ns.run("ip", "link", "set", ifname, "mtu", "1280", "up")
        procs.append(p)
    return procs


def run_meshnode(pair, tmp, ka, kb, offload="tso", hooks=None):
    procs = []
    for ns, own, peer, ip, peer_ip, ep in ((pair.a, ka, kb, "10.211.0.1", "10.211.0.2", pair.b_addr),
                                           (pair.b, kb, ka, "10.211.0.2", "10.211.0.1", pair.a_addr)):
        ifname = f"m{ns.name}"[:15]
        conf = tmp / f"{ifname}.conf"
        conf.write_text(f"[Interface]\nPrivateKey={encode_key(own[0])}\nAddress={ip}/24\n"
                        f"ListenPort=51822\n[Peer]\nPublicKey={encode_key(peer[1])}\n"
                        f"AllowedIPs={peer_ip}/32\nEndpoint={ep}:51822\n")
        log = tmp / f"{ifname}.log"
        cmd = ([sys.executable, "-c", HOOKED, str(conf), ifname, hooks] if hooks else
               [sys.executable, "-c", MESHNODE, "wg", "--config", str(conf), "--tun", ifname])
        p = ns.popen(*cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                     env={**os.environ, "MESHNODE_WG_OFFLOAD": offload})
        wait_until(lambda: b"listening" in log.read_bytes(), timeout=15, what="meshnode wg")
        procs.append(p)
    return procs


def main():
    pair = NetnsPair.create("bt", subnet="10.209.0")
    rows = []
    try:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            wait_until(lambda: pair.b.ping(pair.a_addr) is not None, timeout=10, what="veth")
            gbps, _ = iperf(pair, pair.a_addr, [])
            rows.append(("bare veth", gbps, latency(pair, pair.a_addr), None))
            variants = [("wireguard-go", run_wireguard_go, "10.210.0.1")]
            for mode in MODES:
                variants.append((f"meshnode {mode}",
                                 lambda *a, mode=mode: run_meshnode(*a, offload=mode),
                                 "10.211.0.1"))
            for hooks in HOOKS:
                variants.append((f"meshnode {hooks}",
                                 lambda *a, hooks=hooks: run_meshnode(*a, offload="gro", hooks=hooks),
                                 "10.211.0.1"))
            for name, start, ip in variants:
                procs = start(pair, tmp, keys(), keys())
                wait_until(lambda: pair.b.ping(ip) is not None, timeout=15, what=name)
                gbps, cpu = iperf(pair, ip, [p.pid for p in procs])
                rows.append((name, gbps, latency(pair, ip), cpu))
                for p in procs:
                    p.terminate()
                    p.wait(timeout=10)
    finally:
        pair.destroy()
    ref = rows[1]
    print(f"\niperf3 TCP, one stream, {SECONDS} s; ping: median of 50; CPU: both tunnel "
          f"processes, seconds per GB carried; {os.cpu_count()} CPUs")
    print(f"{'path':<16}{'Gbit/s':>8}{'x wg-go':>9}{'ping ms':>9}{'x wg-go':>9}"
          f"{'CPU s/GB':>10}{'x wg-go':>9}")
    for name, gbps, ms, cpu in rows:
        c = f"{cpu:10.2f}{cpu / ref[3]:9.2f}" if cpu is not None else f"{'-':>10}{'-':>9}"
        print(f"{name:<16}{gbps:8.2f}{gbps / ref[1]:9.2f}{ms:9.3f}{ms / ref[2]:9.2f}{c}")


main()
PY
