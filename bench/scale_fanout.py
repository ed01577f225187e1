"""What one change costs the map builder at N nodes (run by hand: .venv/bin/python bench/scale_fanout.py).

In-process, no network: N nodes, one open stream per node (StreamState), under an allow-all policy
and under autogroup:self (users of --group nodes). For an endpoint change of 1 and of 100 nodes, and
for a rename, it times the snapshot build and the frames of every stream (`next_frame`), and counts
the bytes sent, with and without per-peer patches. The point is the shape: an endpoint change must
not recompile the policy or recompute any reach set (cost ~ N streams x changed nodes they see, not N^2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnode.control.mapbuilder import StreamState, build_snapshot, concerned, fast_forward, next_frame  # noqa: E402
from meshnode.control.store import DnsSettings, Node  # noqa: E402
from meshnode.policy import parse_policy  # noqa: E402

ALLOW_ALL = None
SELF = json.dumps({"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]})


def node(i: int, group: int) -> Node:
    return Node(id=i, machine_key=f"m{i}", node_key=f"k{i:040d}", name=f"n{i}", hostname=f"n{i}",
                user=f"u{i // group}@example.com", tags=(), os="linux", endpoints=(f"192.0.2.{i % 250}:41641",),
                advertised_routes=(), approved_routes=(), advertises_exit_node=False, exit_node_approved=False,
                ephemeral=False, created=0.0, last_seen=None, expiry=None, logged_out=False, offset=i,
                authkey_id=None, disco_key=f"d{i}")


def run(n: int, group: int, policy_text: str | None, patches: bool) -> list[tuple[str, str]]:
    policy = parse_policy(policy_text) if policy_text else None
    rows = {i: node(i, group) for i in range(1, n + 1)}
    online = dict.fromkeys(rows, 1)
    tv = [0]

    def build(prev):  # noqa: ANN001, ANN202
        tv[0] += 1
        return build_snapshot(prev, version=tv[0], domain="tailnet", nodes=list(rows.values()), online=online,
                              now=100.0, policy_text=policy_text, policy=policy, dns=DnsSettings(), records=(),
                              tailnet_version=tv[0], epoch="bench")[0]
    snap = build(None)
    states = [StreamState(i, patches=patches) for i in rows]
    for st in states:
        next_frame(snap, st)
    out = []
    for what, ids, field in (("1 endpoint change", [7], "endpoints"), ("100 endpoint changes", range(1, n, n // 100),
                                                                         "endpoints"),
                             ("1 rename", [9], "name")):
        for i in ids:
            value = (f"198.51.100.{i % 250}:1",) if field == "endpoints" else f"renamed{i}"
            rows[i] = dataclasses.replace(rows[i], **{field: value})
        t0 = time.perf_counter()
        new = build(snap)
        t1 = time.perf_counter()
        sent = nbytes = woken = 0
        nodes = concerned(snap, new)   # the server's wake-up rule: only these streams run
        for st in states:
            if nodes is not None and st.node_id not in nodes and fast_forward(snap, new, st):
                continue
            woken += 1
            text = next_frame(new, st)
            if text is not None:
                sent += 1
                nbytes += len(text)
        t2 = time.perf_counter()
        same = new.compiled is snap.compiled and new.reach is snap.reach
        out.append((what, f"build {(t1 - t0) * 1e3:.0f} ms (policy/reach reused: {same}), {woken} of {n} streams woken"
                          f" {(t2 - t1) * 1e3:.0f} ms, {sent} frames, {nbytes / 1024:.0f} KiB"))
        snap = new
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--group", type=int, default=100)
    args = ap.parse_args()
    print(f"map builder fan-out, {args.nodes} nodes, one stream each")
    for label, pol in (("autogroup:self", SELF), ("allow-all", ALLOW_ALL)):
        for patches in (True, False):
            for what, line in run(args.nodes, args.group, pol, patches):
                print(f"{label:15} {'patches' if patches else 'objects':8} {what:21} {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
