"""Port mapping against miniupnpd (run by hand, as root): `python bench/portmap.py [--rounds 5]`.

Builds the namespaces of tests/e2e/portmap_lab.py (LAN, masquerading router with Debian's
miniupnpd, WAN), then per protocol (PCP, NAT-PMP, UPnP) and round: the time from starting a
`PortMapper` to a granted mapping, and the time to delete it (close, waiting for the gateway's
answer where the protocol has one); plus the time a full gateway probe (`probe`: all three at once)
takes. Prints the median and the worst. Every address is inside the namespaces it made, and they are
removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnode.portmap.client import Protocol  # noqa: E402
from meshnode.portmap.runner import Gateway, PortMapper, probe  # noqa: E402
from tests.e2e.netns import in_netns  # noqa: E402
from tests.e2e.portmap_lab import GW_LAN_IP, LAN_IP, NatLab  # noqa: E402


async def one(gw: Gateway, protocol: Protocol) -> tuple[float, float]:
    t0 = time.perf_counter()
    mapper = PortMapper(41641, gateway=lambda: gw, protocol=protocol)
    mapper.start()
    while mapper.mapping is None:
        if time.perf_counter() - t0 > 10:
            raise RuntimeError(f"{protocol.value}: no mapping in 10 s ({mapper.error})")
        await asyncio.sleep(0.001)
    t1 = time.perf_counter()
    await mapper.close()
    return t1 - t0, time.perf_counter() - t1


async def run(rounds: int) -> None:
    gw = Gateway(GW_LAN_IP, LAN_IP)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        found = await probe(gw)
        times.append(time.perf_counter() - t0)
    print(f"probe (PCP+NAT-PMP+UPnP at once, answered: {', '.join(p.value for p in found)}): "
          f"median {statistics.median(times) * 1000:.1f} ms, worst {max(times) * 1000:.1f} ms")
    print(f"{'protocol':10} {'map median':>12} {'map worst':>12} {'delete median':>14}")
    for protocol in (Protocol.PCP, Protocol.PMP, Protocol.UPNP):
        maps, dels = [], []
        for _ in range(rounds):
            m, d = await one(gw, protocol)
            maps.append(m)
            dels.append(d)
        print(f"{protocol.value:10} {statistics.median(maps) * 1000:>10.1f}ms {max(maps) * 1000:>10.1f}ms "
              f"{statistics.median(dels) * 1000:>12.1f}ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    lab = NatLab.create()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            lab.start_miniupnpd(Path(tmp))
            in_netns(lab.lan, lambda: asyncio.run(run(max(1, min(args.rounds, 100)))))
    finally:
        lab.destroy()


if __name__ == "__main__":
    main()
