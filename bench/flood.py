"""A cheap flood of DNS queries at a fixed rate, for bench/dns_overload.sh (run by hand, not a test).

dnsperf spends about as much CPU per query as the server does (~6 us on this machine), and at
20,000 flooding queries a second that comes out of the core it shares with the authoritative
dnsperf. This sends prebuilt queries with sendmmsg (16 a call, paced to the rate) and reads the
replies with recvmmsg, so the flood costs its core little more than the kernel's own work; that
work still dominates (over loopback the receive path runs in the sender's context): 9-13% of the
core at 20,000 qps, a little below dnsperf.

    flood.py HOST PORT NAMES_FILE QPS SECONDS     (NAMES_FILE: "name type" lines, as dnsperf's -d)

Prints what was sent and answered in dnsperf's words. Every run is bounded by SECONDS.
"""

from __future__ import annotations

import collections
import ctypes
import socket
import struct
import sys
import time
from pathlib import Path

import dns.rdatatype

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from magicdns.udpbatch import _Iovec, _Mmsghdr  # noqa: E402  (the listener's own recvmmsg/sendmmsg layout)

SEND = 16  # queries a sendmmsg
RECV = 64
RBUF = 1024  # a shed SERVFAIL or a small answer: a larger reply is cut, its rcode still read


_libc = ctypes.CDLL(None, use_errno=True)
MSG_DONTWAIT = 0x40


def main() -> None:
    host, port, names_file, qps, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), \
        float(sys.argv[5])
    # Built by hand, not with dnspython: 60,000 queries in a fraction of a second, so the client is
    # not still busy on the authoritative client's core when the measured window starts.
    wires = []
    for i, line in enumerate(open(names_file)):
        parts = line.split()
        if not parts:
            continue
        qname = b"".join(bytes((len(label),)) + label.encode() for label in parts[0].rstrip(".").split(".")) + b"\0"
        qtype = dns.rdatatype.from_text(parts[1] if len(parts) > 1 else "A")
        wires.append(struct.pack("!HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1))
    n = len(wires) - len(wires) % SEND
    wires = wires[:n]
    blob = ctypes.create_string_buffer(b"".join(wires))
    base = ctypes.addressof(blob)
    iov = (_Iovec * n)()
    msgs = (_Mmsghdr * n)()
    off = 0
    for i, w in enumerate(wires):
        iov[i].base, iov[i].len = base + off, len(w)
        msgs[i].hdr.iov, msgs[i].hdr.iovlen = ctypes.addressof(iov[i]), 1
        off += len(w)
    rbuf = ctypes.create_string_buffer(RECV * RBUF)
    riov = (_Iovec * RECV)()
    rmsgs = (_Mmsghdr * RECV)()
    for i in range(RECV):
        riov[i].base, riov[i].len = ctypes.addressof(rbuf) + i * RBUF, RBUF
        rmsgs[i].hdr.iov, rmsgs[i].hdr.iovlen = ctypes.addressof(riov[i]), 1
    rview = memoryview(rbuf).cast("B")

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect((host, port))
    sock.setblocking(False)
    fd = sock.fileno()
    rcodes: collections.Counter[int] = collections.Counter()
    sent = received = 0
    interval = SEND / qps
    start = time.monotonic()
    end = start + seconds
    next_send = start
    k = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if now >= next_send:
            got = _libc.sendmmsg(fd, ctypes.byref(msgs, k * ctypes.sizeof(_Mmsghdr)), SEND, 0)
            if got > 0:
                sent += got
            k = (k + SEND) % n
            next_send += interval
            if next_send < now - 0.1:  # descheduled for long: do not burst to catch up
                next_send = now
        while True:
            count = _libc.recvmmsg(fd, rmsgs, RECV, MSG_DONTWAIT, None)
            if count <= 0:
                break
            received += count
            for i in range(count):
                rcodes[rview[i * RBUF + 3] & 0x0F] += 1
        pause = next_send - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    deadline = time.monotonic() + 0.5  # late replies
    while time.monotonic() < deadline and received < sent:
        count = _libc.recvmmsg(fd, rmsgs, RECV, MSG_DONTWAIT, None)
        if count <= 0:
            time.sleep(0.01)
            continue
        received += count
        for i in range(count):
            rcodes[rview[i * RBUF + 3] & 0x0F] += 1
    elapsed = time.monotonic() - start
    # dnsperf's wording, so dns_overload.sh reads either client's output the same way
    names = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
    print(f"  Queries sent:         {sent}")
    print(f"  Queries completed:    {received}")
    print(f"  Queries per second:   {sent / elapsed:.6f}")
    print("  Response codes:       " + ", ".join(f"{names.get(r, r)} {n}" for r, n in sorted(rcodes.items())))


if __name__ == "__main__":
    main()
