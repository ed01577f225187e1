"""End to end: one long TCP transfer through the tunnel survives a direct -> relay -> direct switch.

Two node daemons on the bridged LAN of test_node_tunnel.py, the control server with its embedded
relay (`--derp`, region 999). The nodes go direct; a paced bulk sender in node1's namespace streams
random bytes over one TCP connection to a receiver in node2's, through the tunnel. Mid-transfer,
nftables in both node namespaces drops UDP between the nodes: the path must fall back to the relay
within 7 s and the transfer must keep moving there (bytes that arrive while UDP is dropped can only
have come through the relay). Then UDP is let through again: the path goes direct again and the
transfer keeps moving. At the end the receiver's byte count and SHA-256 equal the sender's, and the
sender saw no reset. `status --json` peers[].path is checked at each step, so the test cannot pass
without the switch having happened.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.test_node_relay import RelayTailnet, block, path, relay_supported
from tests.e2e.test_node_routing import CONTROL, Tailnet
from tests.e2e.test_node_tunnel import Lan
from tests.support import needs_root, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.root, needs_root]

PORT = 5001
RATE = 3 << 20          # bytes per second the sender aims at: enough to keep windows full, gentle on a busy box
FALLBACK_BOUND = 7.0    # the bound: direct path dead -> relay
DIRECT_BOUND = 15.0     # relay -> direct again once UDP passes (test_node_relay.py's bound)

# Prints "WALLTIME TOTAL" every 0.2 s while bytes arrive, then "final N SHA256" and answers the
# sender with "N SHA256" at its EOF.
RECEIVER = r"""
import hashlib, socket, sys, time
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
s.settimeout(60)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(60)
h, n, last = hashlib.sha256(), 0, 0.0
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    h.update(b)
    n += len(b)
    if time.time() - last >= 0.2:
        last = time.time()
        print(f"{last:.3f} {n}", flush=True)
print(f"{time.time():.3f} {n}", flush=True)
print("final", n, h.hexdigest(), flush=True)
c.sendall(f"{n} {h.hexdigest()}".encode())
c.close()
"""

# Sends random bytes at about RATE until STOPFILE exists (or MAXSECONDS pass), then half-closes and
# checks the receiver's count and digest against its own. Exit 0 only if they match.
SENDER = r"""
import hashlib, os, socket, sys, time
dst, port, rate, stop, most = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
c = socket.create_connection((dst, port), timeout=10)
c.settimeout(60)   # a stall longer than this is a failure, not a wait
h, n, t0 = hashlib.sha256(), 0, time.monotonic()
while not os.path.exists(stop) and time.monotonic() - t0 < most:
    chunk = os.urandom(1 << 15)
    c.sendall(chunk)
    h.update(chunk)
    n += len(chunk)
    ahead = n / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(ahead)
c.shutdown(socket.SHUT_WR)
reply = b""
while True:
    b = c.recv(200)
    if not b:
        break
    reply += b
print("sent", n, h.hexdigest(), flush=True)
print("got", reply.decode(), flush=True)
sys.exit(0 if reply.decode().split() == [str(n), h.hexdigest()] else 1)
"""


def received(log: Path) -> int:
    """Bytes the receiver has counted so far."""
    n = 0
    for line in log.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0][0].isdigit():
            n = int(parts[1])
    return n


def stalls(log: Path, since: float) -> list[tuple[float, float]]:
    """(start, seconds) of each pause longer than 0.5 s in the receiver's progress after `since`."""
    times = [float(x.split()[0]) for x in log.read_text().splitlines()
             if len(x.split()) == 2 and x[0].isdigit()]
    times = [t for t in times if t >= since]
    return [(a, b - a) for a, b in zip(times, times[1:]) if b - a > 0.5]


def both(net: Tailnet, kind: str) -> bool:
    return path(net, 1).get("type") == kind and path(net, 2).get("type") == kind


@pytest.fixture
def relay_net(tmp_path: Path) -> Iterator[Tailnet]:
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    if not relay_supported():
        pytest.skip("this control server has no embedded relay (--derp)")
    lan = Lan(tmp_path, 2)
    try:
        lan.build()
        yield RelayTailnet(lan)
    finally:
        lan.destroy()


def test_transfer_survives_direct_relay_direct(relay_net: Tailnet) -> None:
    net = relay_net
    root = net.lan.root
    net.start()
    key = net.control("authkey", "create", "--reusable")
    for i in (1, 2):
        net.cli(i, "up", "--login-server", f"http://{CONTROL}", "--authkey", key, "--hostname", f"node{i}")
    addr2 = net.status(2)["self"]["addresses"][0]
    wait_until(lambda: both(net, "direct"), timeout=20, what="both nodes on a direct path")
    assert path(net, 1)["endpoint"] == "10.78.0.12:41641"

    rlog, slog, stop = root / "receiver.log", root / "sender.log", root / "stop"
    receiver = net.lan.popen(net.ns(2), sys.executable, "-c", RECEIVER, str(PORT), log=rlog)
    wait_until(lambda: "ready" in rlog.read_text(), timeout=10, what="the receiver")
    sender = net.lan.popen(net.ns(1), sys.executable, "-c", SENDER, addr2, str(PORT), str(RATE), str(stop),
                           "100", log=slog)
    wait_until(lambda: received(rlog) >= 2 * RATE, timeout=20, what="the transfer running on the direct path")
    assert both(net, "direct")

    # UDP between the nodes dropped: fallback to the relay, and the transfer keeps moving there.
    blocked_at = time.time()
    at_block = received(rlog)
    block(net, True)
    wait_until(lambda: both(net, "relay"), timeout=FALLBACK_BOUND + 5, what="both nodes falling back to the relay")
    fell = {i: path(net, i)["since"] - blocked_at for i in (1, 2)}
    assert max(fell.values()) <= FALLBACK_BOUND, f"fell back after {fell}"
    on_relay = received(rlog)
    wait_until(lambda: received(rlog) >= on_relay + RATE, timeout=20,
               what="the transfer moving through the relay")
    resumed = time.time()
    assert both(net, "relay"), "left the relay while UDP was still dropped"
    assert received(rlog) > at_block
    relay_counters = net.status(1)["tunnel"]["paths"]
    assert relay_counters["relay_bytes_sent"] > RATE, relay_counters

    # UDP passes again: direct again, and the transfer keeps moving there too.
    unblocked_at = time.time()
    block(net, False)
    wait_until(lambda: both(net, "direct"), timeout=DIRECT_BOUND + 5, what="both nodes direct again")
    direct_again = max(path(net, i)["since"] for i in (1, 2)) - unblocked_at
    assert direct_again <= DIRECT_BOUND, f"direct again after {direct_again:.1f}s"
    assert path(net, 1)["endpoint"] == "10.78.0.12:41641"
    relayed_then = net.status(1)["tunnel"]["paths"]["relay_bytes_sent"]
    on_direct = received(rlog)
    wait_until(lambda: received(rlog) >= on_direct + RATE, timeout=20,
               what="the transfer moving on the direct path again")
    assert both(net, "direct")
    # Bulk data left the relay: only a trickle (disco, stragglers) went there since.
    assert net.status(1)["tunnel"]["paths"]["relay_bytes_sent"] - relayed_then < RATE

    stop.touch()
    assert sender.wait(60) == 0, slog.read_text()
    assert receiver.wait(10) == 0, rlog.read_text()
    sent = slog.read_text().split("sent", 1)[1].split()[:2]
    final = rlog.read_text().split("final", 1)[1].split()[:2]
    assert sent == final, (sent, final)
    assert int(final[0]) > 4 * RATE
    paused = stalls(rlog, blocked_at - 1)
    # The outage TCP sees is the fallback time; its retransmission timer, doubling from ~0.2 s,
    # next fires at 0.2 * (2**k - 1) s, so a 7 s outage can hold the stream until ~12.6 s.
    assert max((d for _, d in paused), default=0.0) < 13.0, paused
    print(f"transfer: {int(final[0]) >> 20} MiB intact; fell back to the relay after "
          f"{max(fell.values()):.1f}s; {RATE >> 20} MiB more had crossed the relay {resumed - blocked_at:.1f}s "
          f"after the block; direct again after {direct_again:.1f}s; pauses (s after the block, length): "
          + ", ".join(f"{a - blocked_at:+.1f}/{d:.1f}s" for a, d in paused))
