"""CPU per datagram of the batched UDP listener, in-process, for the paths issue 8 compares: an
authoritative answer (the reply memo), a query shed over the in-flight cap, and a forwarded query
that starts a race. Run by hand: `taskset -c 1 .venv/bin/python bench/shed_cost.py [SRC_DIR]`
(SRC_DIR: a checkout of another revision to compare, e.g. `git archive REV magicdns | tar -x -C DIR`).

A real DnsServer on 127.0.0.1 (port 0) forwards to a bound socket that never answers (loopback);
the listener's reader is taken off the loop and `_rounds` is called by hand on a socket that already
holds 64 datagrams, so the figure is the listener's own thread CPU (recvmmsg, Python, sendmmsg),
not the client's, and other load on the machine does not inflate it. Best of several rounds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
import sys
import time

if len(sys.argv) > 1:  # another revision: ahead of this checkout, whose editable install would win
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path.insert(0, sys.argv[1])

import dns.message  # noqa: E402

from magicdns.server import DnsServer, ServerConfig  # noqa: E402
from magicdns.upstream import Upstream  # noqa: E402
from magicdns.view import DnsSettings, DnsView, Host  # noqa: E402

BATCH = 64


def _queries(names: list[str]) -> list[bytes]:
    out = []
    for i, name in enumerate(names):
        q = dns.message.make_query(name, "A", use_edns=0 if i % 2 else False)
        q.id = i & 0xFFFF
        out.append(q.to_wire())
    return out


def _drain(sock: socket.socket) -> int:
    n = 0
    while True:
        try:
            sock.recv(4096)
            n += 1
        except BlockingIOError:
            return n


def measure(listener, client: socket.socket, batches: list[list[bytes]], idle: bool = False) -> float:
    """Best thread-CPU microseconds per datagram over `batches` (each sent, then served at once).
    `idle`: the listener is told before each batch that it has caught up (its reads were small), so
    it forwards rather than sheds."""
    best = float("inf")
    for batch in batches:
        if idle and hasattr(listener, "backlog"):
            listener.backlog.fill = 0
            if hasattr(listener.backlog, "loaded"):  # this loop is busy, but the point is a forward
                listener.backlog.loaded = False
                listener.backlog.next_sample = float("inf")
        for q in batch:
            client.send(q)
        t = time.thread_time_ns()
        listener._on_readable()
        spent = time.thread_time_ns() - t
        _drain(client)
        best = min(best, spent / len(batch) / 1e3)
    return best


async def main() -> None:
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # an upstream that never answers
    hole.bind(("127.0.0.1", 0))
    view = DnsView(peers=tuple(Host(f"n{i}", (ipaddress.ip_address(f"100.64.1.{i}"),)) for i in range(200)),
                   dns=DnsSettings(nameservers=(Upstream("127.0.0.1", hole.getsockname()[1]),)), version=1)
    server = DnsServer(ServerConfig(listen=(("127.0.0.1", 0),), max_inflight=100_000, forward_timeout=30.0))
    await server.start(view)
    listener = server._batch[0]
    asyncio.get_running_loop().remove_reader(listener.fd)  # served by hand below
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    client.connect(("127.0.0.1", server.bound[0][1]))
    client.setblocking(False)
    fresh = iter(range(10**9))
    try:
        local = _queries([f"n{i % 200}.tailnet" for i in range(BATCH)])
        measure(listener, client, [local] * 3)  # warm: slow path, then the memo
        auth = measure(listener, client, [local] * 200)

        def unique(n: int) -> list[list[bytes]]:
            return [_queries([f"x{next(fresh)}.example.com" for _ in range(BATCH)]) for _ in range(n)]

        # A listener that is not behind starts a forward for each (a socket, a timer).
        fwd = measure(listener, client, [b[:16] for b in unique(20)], idle=True)
        server.forwarder.max_inflight = 1  # every further forward is over the cap
        server.config = dataclasses.replace(server.config, max_inflight=1)
        shed = measure(listener, client, unique(200))
        print(f"authoritative answer (reply memo)     {auth:7.2f} us/datagram")
        print(f"shed over the in-flight cap           {shed:7.2f} us/datagram  {shed / auth:5.2f}x")
        print(f"forward started (socket, timer)       {fwd:7.2f} us/datagram  {fwd / auth:5.2f}x")
        import magicdns
        print(f"(magicdns from {magicdns.__path__[0]})")
    finally:
        client.close()
        await server.stop()
        hole.close()


if __name__ == "__main__":
    asyncio.run(main())
