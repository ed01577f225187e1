"""Per-query cost of the answer engine's paths, in-process (no sockets): a memoised local answer
(the reply memo, and the template path behind it), an NXDOMAIN and a forwarding decision for a name never seen, and a CNAME chased out of our zones
(the slow path, every time). Run by hand: `python bench/engine_paths.py [SRC_DIR]`; SRC_DIR (a
checkout of another revision, e.g. from `git archive REV magicdns | tar -x -C DIR`) compares.
Pin it to one core (`taskset -c 1`) and take the best of several runs: the figures are noisy."""

from __future__ import annotations

import ipaddress
import sys
import time

if len(sys.argv) > 1:
    sys.path.insert(0, sys.argv[1])

import dns.message  # noqa: E402

from magicdns.engine import Engine  # noqa: E402
from magicdns.records import parse_record  # noqa: E402
from magicdns.upstream import Upstream  # noqa: E402
from magicdns.view import DnsSettings, DnsView, Host  # noqa: E402
from magicdns.zone import Zone  # noqa: E402


def best_of(fn, queries: list[bytes], rounds: int = 15, repeat: int = 20) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(repeat):
            for q in queries:
                fn(q)
        best = min(best, (time.perf_counter() - t) / (repeat * len(queries)))
    return best * 1e6


def main() -> None:
    view = DnsView(peers=tuple(Host(f"n{i}", (ipaddress.ip_address(f"100.64.1.{i}"),)) for i in range(200)),
                   dns=DnsSettings(nameservers=(Upstream("127.0.0.1", 5399),),
                                   records=(parse_record("out", "CNAME", "www.example.com."),)))
    engine = Engine(Zone(view))
    local = [dns.message.make_query(f"n{i}.tailnet", "A", use_edns=0 if i % 2 else False).to_wire()
             for i in range(200)]
    for q in local:
        engine.handle(q)
    fresh = iter(range(10**9))
    forwarded = [dns.message.make_query(f"x{next(fresh)}.example.com", "A").to_wire() for _ in range(4000)]
    chased = [dns.message.make_query("out.tailnet", "A").to_wire()]
    print(f"reply memo (query bytes -> reply)  {best_of(engine.handle, local):7.3f} us/query")
    print(f"template path (memo bypassed)      {best_of(engine.answer, local):7.3f} us/query")
    # Each name once (rounds=1): a second sight would be a reply memo hit.
    nx = [dns.message.make_query(f"nx{next(fresh)}.tailnet", "A").to_wire() for _ in range(4000)]
    print(f"NXDOMAIN decision, new name        {best_of(engine.handle, nx, rounds=1, repeat=1):7.3f} us/query")
    print(f"forwarding decision, new name      {best_of(engine.handle, forwarded, rounds=3, repeat=1):7.3f} us/query")
    print(f"chase decision (slow path)         {best_of(engine.handle, chased, repeat=200):7.3f} us/query")


if __name__ == "__main__":
    main()
