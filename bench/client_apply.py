"""What one map frame costs a node (run by hand: .venv/bin/python bench/client_apply.py).

Frames come from the real map builder for node 1 of --nodes, sealed by the server's channel as
`_send` does; the node's side is what `ControlClient._stream_once` runs per frame
(`MapAssembler.apply_sealed`: unseal, JSON, apply, the NetMap it yields). Kinds: the first full map,
a filter-only delta (a policy change: a port added), a DNS-only delta (a record added) and a one-peer
patch (an endpoint change), each applied --repeat times. Default shape: the one `bench/scale.sh`
uses, `autogroup:self` over users of --group devices, so each node sees --group - 1 peers;
`--policy all-to-all` gives every node every other node as a peer.

Per kind it prints the whole per-frame cost and its parts (unseal, json.loads, apply). `--profile
KIND` prints where that kind's frames spend their time (cProfile). A delta must cost the node in
proportion to what it carries, not to the size of its map.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import dataclasses
import json
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nacl.public import PrivateKey  # noqa: E402

import scale_fanout  # noqa: E402
from magicdns.records import Record  # noqa: E402
from meshnode.control.client import MapAssembler  # noqa: E402
from meshnode.control.mapbuilder import StreamState, build_snapshot, next_frame  # noqa: E402
from meshnode.control.protocol import Channel  # noqa: E402
from meshnode.control.store import DnsSettings  # noqa: E402
from meshnode.netmap import gc_paused  # noqa: E402
from meshnode.policy import parse_policy  # noqa: E402


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--group", type=int, default=100, help="devices per user (autogroup:self)")
    ap.add_argument("--policy", choices=sorted(scale_fanout.POLICIES), default="autogroup:self")
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--profile", metavar="KIND", help="cProfile the frames of the kind whose name has KIND")
    args = ap.parse_args()
    base, port_added, _ = scale_fanout.POLICIES[args.policy]
    rows = {i: scale_fanout.node(i, args.group) for i in range(1, args.nodes + 1)}
    server_key, machine_key = PrivateKey.generate(), PrivateKey.generate()
    server = Channel(_b64(bytes(server_key)), _b64(bytes(machine_key.public_key)))
    node = Channel(_b64(bytes(machine_key)), _b64(bytes(server_key.public_key)))

    def build(prev, text, version, records=()):  # noqa: ANN001, ANN202
        with gc_paused(args.nodes):
            return build_snapshot(prev, version=version, domain="tailnet", nodes=list(rows.values()),
                                  online=dict.fromkeys(rows, 1), now=100.0, policy_text=text,
                                  policy=parse_policy(text), dns=DnsSettings(), records=records,
                                  tailnet_version=version, epoch="bench")[0]

    def seal(text: str) -> bytes:
        return server.seal_bytes(text.encode())

    # The per-frame function the stream's read loop calls (older trees: its inline equivalent).
    apply_sealed = getattr(MapAssembler, "apply_sealed", None)

    def per_frame(asm: MapAssembler, sealed: bytes):  # noqa: ANN202
        if apply_sealed is not None:
            return apply_sealed(asm, node, sealed)
        with gc_paused(len(sealed) // 256):
            return asm.apply(json.loads(node.open_bytes(sealed)))

    snap = build(None, base, 1)
    state, asm = StreamState(1, patches=True), MapAssembler()
    full = seal(next_frame(snap, state))
    t0 = time.perf_counter()
    nm = per_frame(asm, full)
    print(f"{args.policy}, {args.nodes} nodes, node 1 sees {len(nm.peers)} peers; full map "
          f"{len(full)} bytes: {(time.perf_counter() - t0) * 1e3:.2f} ms")
    records = (Record("wiki.tailnet", "A", "100.64.0.9"),)
    snap2 = build(snap, port_added, 2)
    filter_only = seal(next_frame(snap2, state))
    snap3 = build(snap2, port_added, 3, records)
    dns_only = seal(next_frame(snap3, state))
    rows[5] = dataclasses.replace(rows[5], endpoints=("198.51.100.1:1",))
    patch = seal(next_frame(build(snap3, port_added, 4, records), state))
    print(f"{'kind':18} {'carries':14} {'bytes':>6} {'total':>8} {'unseal':>8} {'json':>8} {'apply':>8}  (us a frame)")
    for name, sealed in (("filter-only delta", filter_only), ("dns-only delta", dns_only),
                         ("one-peer patch", patch)):
        msg = json.loads(node.open_bytes(sealed))
        carried = sorted(set(msg) - {"type", "version", "resume"})
        n = args.repeat
        prof = cProfile.Profile() if args.profile and args.profile in name else None
        # Each part alone, then the whole (the whole is what a node pays; parts may not add up exactly).
        t0 = time.perf_counter()
        for _ in range(n):
            plain = node.open_bytes(sealed)
        t1 = time.perf_counter()
        for _ in range(n):
            json.loads(plain)
        t2 = time.perf_counter()
        for _ in range(n):
            asm.apply(json.loads(plain))
        t3 = time.perf_counter()
        if prof is not None:
            prof.enable()
        t4 = time.perf_counter()
        for _ in range(n):
            per_frame(asm, sealed)
        t5 = time.perf_counter()
        if prof is not None:
            prof.disable()
        us = 1e6 / n
        print(f"{name:18} {','.join(carried):14} {len(sealed):6} {(t5 - t4) * us:8.1f} {(t1 - t0) * us:8.1f} "
              f"{(t2 - t1) * us:8.1f} {(t3 - t2 - (t2 - t1)) * us:8.1f}")
        if prof is not None:
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
