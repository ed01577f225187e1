"""Helper of bench/dns_forward.sh: the latency forwarding adds, one query at a time, interleaved.

    fwd_pingpong.py --direct PORT --via NAME=PORT [--via NAME=PORT ...] [-n N] [--zone up.test]
                    [--pid NAME=PID ...] [--cpu-queries M]

For each of N rounds it sends one cache-miss query (a name never asked before, answered NXDOMAIN by
the upstream's zone) straight to the upstream, then one through each forwarder, and one cache-hit
query (n1..n99 of the zone) the same way; each waits for its reply before the next is sent. Because
the paths alternate query by query, a busy machine slows them all alike, and the median of the
per-path latencies minus the direct one is what forwarding adds. Everything goes to 127.0.0.1;
every wait is bounded (1 s, a lost reply is counted, not retried).

With `--pid NAME=PID` (a forwarder's process), M more cache-miss queries are then sent to that
forwarder alone and its CPU time (every thread's, from /proc/PID/task/*/schedstat, so other load on
the machine does not count) is divided by M: the CPU a forwarded cache miss costs, including any
work done after the reply went out.
"""

from __future__ import annotations

import argparse
import glob
import random
import socket
import statistics
import struct
import time


def _query(name: str, qid: int) -> bytes:
    wire = b"".join(bytes((len(label),)) + label.encode() for label in name.split(".")) + b"\x00"
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + wire + b"\x00\x01\x00\x01"


def _ask(sock: socket.socket, port: int, wire: bytes) -> float | None:
    t0 = time.perf_counter()
    sock.sendto(wire, ("127.0.0.1", port))
    deadline = t0 + 1.0
    while True:
        sock.settimeout(max(0.001, deadline - time.perf_counter()))
        try:
            data = sock.recv(4096)
        except socket.timeout:
            return None
        if data[:2] == wire[:2]:
            return time.perf_counter() - t0


def _cpu_ns(pid: int) -> int:
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):  # a thread that ended meanwhile
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--direct", type=int, required=True)
    ap.add_argument("--via", action="append", required=True, help="NAME=PORT of a forwarder")
    ap.add_argument("--pid", action="append", default=[], help="NAME=PID of a forwarder, for its CPU per miss")
    ap.add_argument("-n", type=int, default=3000)
    ap.add_argument("--cpu-queries", type=int, default=2000)
    ap.add_argument("--zone", default="up.test")
    args = ap.parse_args()
    paths = {"direct": args.direct}
    for item in args.via:
        name, _, port = item.partition("=")
        paths[name] = int(port)
    pids = {name: int(pid) for name, _, pid in (item.partition("=") for item in args.pid)}
    rnd = random.Random()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    times: dict[tuple[str, str], list[float]] = {(p, k): [] for p in paths for k in ("miss", "hit")}
    lost = dict.fromkeys(times, 0)
    # Warm the cache-hit names on every forwarder.
    for name in paths:
        for i in range(1, 100):
            _ask(sock, paths[name], _query(f"n{i}.{args.zone}", rnd.getrandbits(16)))
    order = list(paths)
    for _ in range(args.n):
        rnd.shuffle(order)
        for kind in ("miss", "hit"):
            for name in order:
                qname = (f"r{rnd.getrandbits(48):x}.rnd.{args.zone}" if kind == "miss"
                         else f"n{rnd.randrange(1, 100)}.{args.zone}")
                took = _ask(sock, paths[name], _query(qname, rnd.getrandbits(16)))
                if took is None:
                    lost[(name, kind)] += 1
                else:
                    times[(name, kind)].append(took)
    print(f"{'path':16} {'kind':5} {'median us':>10} {'p90 us':>8} {'added us':>9} {'lost':>5}")
    for kind in ("miss", "hit"):
        base = statistics.median(times[("direct", kind)])
        for name in paths:
            vals = sorted(times[(name, kind)])
            med = statistics.median(vals)
            p90 = vals[int(len(vals) * 0.9)]
            print(f"{name:16} {kind:5} {med * 1e6:10.0f} {p90 * 1e6:8.0f} {(med - base) * 1e6:9.0f} "
                  f"{lost[(name, kind)]:5}")
    for name, pid in pids.items():
        before = _cpu_ns(pid)
        answered = 0
        for _ in range(args.cpu_queries):
            qname = f"c{rnd.getrandbits(48):x}.rnd.{args.zone}"
            answered += _ask(sock, paths[name], _query(qname, rnd.getrandbits(16))) is not None
        # Work the forwarder does after a reply has gone out (closing, refilling) is counted too:
        # give it a moment to finish before the second reading.
        time.sleep(0.2)
        used = _cpu_ns(pid) - before
        print(f"{name:16} CPU per cache miss: {used / 1000 / max(1, answered):.1f} us "
              f"({answered} of {args.cpu_queries} answered, every thread's time)")


if __name__ == "__main__":
    main()
