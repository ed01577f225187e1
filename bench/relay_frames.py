"""DERP relay throughput on loopback (run by hand): `python bench/relay_frames.py [--seconds 5]`.

Starts `meshnode derp serve --admit-any` as a subprocess (optionally pinned with --cpu), then for each
packet size a sender process blasts SendPacket frames at the relay through one connection while a
receiver process counts the RecvPacket bytes it gets through its own connection. Both ends speak the
protocol by hand (login through meshnode.derp.session, then raw frames) so that the relay, not a
Python client, is the bottleneck. Reports delivered packets/s, payload Mbit/s, the relay's drops and
its CPU seconds per GB relayed (from /proc/PID/stat). Everything stays on 127.0.0.1; every run is
bounded by --seconds.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnode.derp.frames import SendPacket  # noqa: E402
from meshnode.derp.session import ClientSession, LoggedIn, public_key  # noqa: E402

BIN = Path(sys.executable).parent
HZ = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def login(port: int, priv: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(b"GET /derp HTTP/1.1\r\nHost: bench\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += s.recv(4096)
    rest = buf.split(b"\r\n\r\n", 1)[1]
    session = ClientSession(priv)
    while True:
        events = session.receive(rest)
        s.sendall(session.take_output())
        if any(isinstance(e, LoggedIn) for e in events):
            return s
        rest = s.recv(4096)


def receiver(port: int, priv: bytes, seconds: float, ready: mp.Event, out: mp.Queue) -> None:
    s = login(port, priv)
    ready.set()
    s.settimeout(0.5)
    total = 0
    t_first = t_last = None
    deadline = time.monotonic() + seconds + 3
    while time.monotonic() < deadline:
        try:
            n = len(s.recv(1 << 20))
        except socket.timeout:
            if t_first is not None:
                break
            continue
        if not n:
            break
        now = time.monotonic()
        t_first = t_first or now
        t_last = now
        total += n
    out.put((total, (t_last or 0) - (t_first or 0)))


def sender(port: int, priv: bytes, dst: bytes, size: int, seconds: float, out: mp.Queue) -> None:
    s = login(port, priv)
    frame = SendPacket(dst, os.urandom(size)).encode()
    batch = frame * max(1, (256 << 10) // len(frame))
    per_batch = len(batch) // len(frame)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        s.sendall(batch)
        sent += per_batch
    out.put(sent)
    time.sleep(0.5)
    s.close()


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def run(size: int, port: int, pid: int, seconds: float) -> dict[str, float]:
    a_priv, b_priv = os.urandom(32), os.urandom(32)
    out: mp.Queue = mp.Queue()
    ready = mp.Event()
    recv = mp.Process(target=receiver, args=(port, b_priv, seconds, ready, out))
    recv.start()
    ready.wait(10)
    drops0, bytes0 = metric(port, "meshnode_derp_drops_total"), metric(port, "meshnode_derp_bytes_relayed_total")
    cpu0 = cpu_seconds(pid)
    send = mp.Process(target=sender, args=(port, a_priv, public_key(b_priv), size, seconds, out))
    send.start()
    send.join(seconds + 15)
    recv.join(seconds + 15)
    results = [out.get(timeout=5), out.get(timeout=5)]
    sent = next(r for r in results if isinstance(r, int))
    received_bytes, span = next(r for r in results if isinstance(r, tuple))
    cpu = cpu_seconds(pid) - cpu0
    packets = received_bytes // (5 + 32 + size)
    relayed = metric(port, "meshnode_derp_bytes_relayed_total") - bytes0
    return {"size": size, "sent": sent, "delivered": packets, "pps": packets / span if span else 0,
            "mbit": packets * size * 8 / span / 1e6 if span else 0,
            "drops": metric(port, "meshnode_derp_drops_total") - drops0,
            "cpu_per_gb": cpu / (relayed / 1e9) if relayed else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--sizes", default="100,1280,1400,8000")
    ap.add_argument("--cpu", default="", help="taskset CPU list for the relay, e.g. 0")
    ap.add_argument("--attach", default="", help="PORT:PID of a relay already running (e.g. under a profiler)")
    args = ap.parse_args()
    if args.attach:
        port, pid = map(int, args.attach.split(":"))
        report([run(int(s), port, pid, args.seconds) for s in args.sizes.split(",")])
        return
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        cmd = [str(BIN / "meshnode"), "derp", "serve", "--listen", "127.0.0.1:0", "--stun-port", "-1",
               "--admit-any", "--ready-file", str(ready)]
        if args.cpu:
            cmd = ["taskset", "-c", args.cpu] + cmd
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    sys.exit("the relay did not start")
                time.sleep(0.05)
            port = int(ready.read_text().split()[0])
            rows = [run(int(s), port, proc.pid, args.seconds) for s in args.sizes.split(",")]
        finally:
            proc.terminate()
            proc.wait(10)
    report(rows)


def report(rows: list[dict[str, float]]) -> None:
    print(f"{'size':>6} {'sent':>10} {'delivered':>10} {'packets/s':>10} {'Mbit/s':>8} {'drops':>9} {'CPU s/GB':>9}")
    for r in rows:
        print(f"{r['size']:>6} {r['sent']:>10} {r['delivered']:>10} {r['pps']:>10.0f} {r['mbit']:>8.1f} "
              f"{r['drops']:>9.0f} {r['cpu_per_gb']:>9.2f}")


if __name__ == "__main__":
    main()
