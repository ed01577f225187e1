"""Helper of bench/dns_forward.sh: the latency forwarding adds, one query at a time, interleaved.

    fwd_pingpong.py --direct PORT --via NAME=PORT [--via NAME=PORT ...] [-n N] [--zone up.test]

For each of N rounds it sends one cache-miss query (a name never asked before, answered NXDOMAIN by
the upstream's zone) straight to the upstream, then one through each forwarder, and one cache-hit
query (n1..n99 of the zone) the same way; each waits for its reply before the next is sent. Because
the paths alternate query by query, a busy machine slows them all alike, and the median of the
per-path latencies minus the direct one is what forwarding adds. Everything goes to 127.0.0.1;
every wait is bounded (1 s, a lost reply is counted, not retried).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--direct", type=int, required=True)
    ap.add_argument("--via", action="append", required=True, help="NAME=PORT of a forwarder")
    ap.add_argument("-n", type=int, default=3000)
    ap.add_argument("--zone", default="up.test")
    args = ap.parse_args()
    paths = {"direct": args.direct}
    for item in args.via:
        name, _, port = item.partition("=")
        paths[name] = int(port)
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


if __name__ == "__main__":
    main()
