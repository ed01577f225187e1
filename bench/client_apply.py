"""What one delta costs a node holding a 10,000-peer map (run by hand: .venv/bin/python bench/client_apply.py).

MapAssembler.apply (control/client.py) on frames from the real map builder: the first full map, then
a filter-only delta (a policy change), a DNS-only delta (a record added) and a one-peer patch (an
endpoint change), each applied --repeat times. What matters is that a delta costs the node in
proportion to what it carries, not to the size of its map.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale_fanout  # noqa: E402
from magicdns.records import Record  # noqa: E402
from meshnode.control.client import MapAssembler  # noqa: E402
from meshnode.control.mapbuilder import StreamState, build_snapshot, next_frame  # noqa: E402
from meshnode.control.store import DnsSettings  # noqa: E402
from meshnode.policy import parse_policy  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=50)
    args = ap.parse_args()
    base, port_added, _ = scale_fanout.POLICIES["all-to-all"]
    rows = {i: scale_fanout.node(i, 100) for i in range(1, args.nodes + 1)}

    def build(prev, text, version, records=()):  # noqa: ANN001, ANN202
        return build_snapshot(prev, version=version, domain="tailnet", nodes=list(rows.values()),
                              online=dict.fromkeys(rows, 1), now=100.0, policy_text=text, policy=parse_policy(text),
                              dns=DnsSettings(), records=records, tailnet_version=version, epoch="bench")[0]
    snap = build(None, base, 1)
    state, asm = StreamState(1, patches=True), MapAssembler()
    t0 = time.perf_counter()
    asm.apply(json.loads(next_frame(snap, state)))
    print(f"full map of {args.nodes - 1} peers: {(time.perf_counter() - t0) * 1e3:.1f} ms (json + apply)")
    records = (Record("wiki.tailnet", "A", "100.64.0.9"),)
    snap2 = build(snap, port_added, 2)
    filter_only = json.loads(next_frame(snap2, state))
    snap3 = build(snap2, port_added, 3, records)
    dns_only = json.loads(next_frame(snap3, state))
    rows[5] = dataclasses.replace(rows[5], endpoints=("198.51.100.1:1",))
    patch = json.loads(next_frame(build(snap3, port_added, 4, records), state))
    for name, msg in (("filter-only delta", filter_only), ("dns-only delta", dns_only), ("one-peer patch", patch)):
        carried = sorted(set(msg) - {"type", "version", "resume"})
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            asm.apply(msg)
        print(f"{name:18} {','.join(carried):14} {(time.perf_counter() - t0) / args.repeat * 1e3:.3f} ms a frame")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
