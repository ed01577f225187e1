"""What one change costs the map builder at N nodes (run by hand: .venv/bin/python bench/scale_fanout.py).

In-process, no network: N nodes, one open stream per node (StreamState), under an all-to-all policy
and under autogroup:self (users of --group nodes). For each change it times the snapshot build (with
the policy compile), the frames of every stream the server would wake (`next_frame`: reach set,
filter rules, JSON), sealing them as the server does (one NaCl box per frame), and counts the bytes.
Changes:
- endpoints of 1 and of 100 nodes, a rename (per-peer patches; `--objects` also without patches);
- a policy change that alters every node's packet filter but not who sees whom (a port added);
- a policy change that alters visibility for one group (two users' nodes now see each other);
- a DNS record added (the same `dns` text for every node);
- a node registered (membership: the policy is compiled again over one more node).
The point is the shape: an endpoint change must not recompile the policy or recompute any reach
set (cost ~ N streams x changed nodes they see, not N^2), and a change that concerns every node must
cost each stream a few microseconds, not a walk over its peers. `--profile WHAT` prints where the
frames of that change spend their time (cProfile); `--streams` stands for the streams of one replica
(a third of the nodes with three replicas).
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

from nacl.public import PrivateKey  # noqa: E402

from magicdns.records import Record  # noqa: E402
from meshnode.control.mapbuilder import StreamState, build_snapshot, concerned, fast_forward, next_frame  # noqa: E402
from meshnode.control.protocol import Channel, frame  # noqa: E402
from meshnode.control.store import DnsSettings, Node  # noqa: E402
from meshnode.netmap import gc_paused  # noqa: E402
from meshnode.policy import parse_policy  # noqa: E402


def _policy(dst: str, ports: str, ops: bool = False) -> str:
    acls = [{"action": "accept", "src": ["autogroup:member" if dst != "*" else "*"], "dst": [f"{dst}:{ports}"]}]
    doc: dict = {"acls": acls}
    if ops:   # two users' nodes (2 x --group) may reach each other on every port
        doc["groups"] = {"group:ops": ["u0@example.com", "u1@example.com"]}
        acls.append({"action": "accept", "src": ["group:ops"], "dst": ["group:ops:*"]})
    return json.dumps(doc)


POLICIES = {   # name -> (base, one port added, a group that now sees each other)
    "autogroup:self": (_policy("autogroup:self", "22,80"), _policy("autogroup:self", "22,80,443"),
                       _policy("autogroup:self", "22,80,443", ops=True)),
    "all-to-all": (_policy("*", "22,80"), _policy("*", "22,80,443"), _policy("*", "22,80,443", ops=True)),
}


def node(i: int, group: int, users: int = 0) -> Node:
    """Node i; its user is i // group, or with `users`, i mod users (devices registered in turn, as
    bench/scale.sh's simulated nodes do: no user's addresses are contiguous)."""
    return Node(id=i, machine_key=f"m{i}", node_key=f"k{i:040d}", name=f"n{i}", hostname=f"n{i}",
                user=f"u{i % users if users else i // group}@example.com", tags=(), os="linux", endpoints=(f"192.0.2.{i % 250}:41641",),
                advertised_routes=(), approved_routes=(), advertises_exit_node=False, exit_node_approved=False,
                ephemeral=False, created=0.0, last_seen=None, expiry=None, logged_out=False, offset=i,
                authkey_id=None, disco_key=f"d{i}")


def _channel() -> Channel:
    a, b = PrivateKey.generate(), PrivateKey.generate()
    return Channel(base64.b64encode(bytes(a)).decode(), base64.b64encode(bytes(b.public_key)).decode())


def run(n: int, group: int, policies: tuple[str, str, str], patches: bool, streams: int,
        profile: str | None, interleave: bool = False) -> list[tuple[str, str]]:
    base, port_added, ops = policies
    pol = {"text": base, "parsed": parse_policy(base)}
    users = max(1, n // group) if interleave else 0
    rows = {i: node(i, group, users) for i in range(1, n + 1)}
    online = dict.fromkeys(rows, 1)
    records: list[Record] = []
    tv = [0]
    chan = _channel()

    def build(prev):  # noqa: ANN001, ANN202
        tv[0] += 1
        with gc_paused(n):   # as the server builds it
            return build_snapshot(prev, version=tv[0], domain="tailnet", nodes=list(rows.values()), online=online,
                                  now=100.0, policy_text=pol["text"], policy=pol["parsed"], dns=DnsSettings(),
                                  records=tuple(records), tailnet_version=tv[0], epoch="bench")[0]
    snap = build(None)
    # One replica's streams: every (n // streams)-th node.
    step = max(1, round(n / streams))
    states = [StreamState(i, patches=patches, sets=patches) for i in list(rows)[::step]]
    for st in states:
        next_frame(snap, st)

    def set_field(ids, field):  # noqa: ANN001, ANN202
        def apply() -> None:
            for i in ids:
                value = (f"198.51.100.{i % 250}:1",) if field == "endpoints" else f"renamed{i}"
                rows[i] = dataclasses.replace(rows[i], **{field: value})
        return apply

    def set_policy(text):  # noqa: ANN001, ANN202
        def apply() -> None:
            pol["text"], pol["parsed"] = text, parse_policy(text)
        return apply

    def add_node() -> None:
        rows[n + 1] = node(n + 1, group, users)
        online[n + 1] = 1

    def add_record() -> None:
        records.append(Record(f"wiki{len(records)}.tailnet", "A", "100.64.0.9"))

    changes = [("1 endpoint change", set_field([7], "endpoints")),
               ("100 endpoint changes", set_field(range(1, n, n // 100), "endpoints")),
               ("1 rename", set_field([9], "name"))]
    if patches:
        changes += [("policy: port added", set_policy(port_added)), ("policy: group sees", set_policy(ops)),
                    ("dns record added", add_record), ("1 node registered", add_node)]
    out = []
    for what, apply in changes:
        apply()
        t0 = time.perf_counter()
        new = build(snap)
        t1 = time.perf_counter()
        prof = cProfile.Profile() if profile and profile in what else None
        if prof is not None:
            prof.enable()
        texts: list[str] = []
        woken = 0
        nodes = concerned(snap, new)   # the server's wake-up rule: only these streams run
        for st in states:
            if nodes is not None and st.node_id not in nodes and fast_forward(snap, new, st):
                continue
            woken += 1
            text = next_frame(new, st)
            if text is not None:
                texts.append(text)
        t2 = time.perf_counter()
        if prof is not None:
            prof.disable()
        nbytes = 0
        for text in texts:   # as `_send` does it: encode, seal to the node's key, length-prefix
            nbytes += len(frame(chan.seal_bytes(text.encode())))
        t3 = time.perf_counter()
        same = new.compiled is snap.compiled and new.reach is snap.reach
        per = (t2 - t1) / woken * 1e6 if woken else 0.0
        out.append((what, f"build {(t1 - t0) * 1e3:4.0f} ms (policy reused: {str(same):5}), {woken:5} of "
                          f"{len(states)} streams woken: frames {(t2 - t1) * 1e3:5.0f} ms ({per:4.0f} us each), "
                          f"seal {(t3 - t2) * 1e3:4.0f} ms, {len(texts):5} frames, {nbytes / 1024:6.0f} KiB"))
        if prof is not None:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        snap = new
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--group", type=int, default=100, help="nodes per user")
    ap.add_argument("--streams", type=int, default=0, help="streams on this replica (default: one per node)")
    ap.add_argument("--objects", action="store_true", help="also without per-peer patches")
    ap.add_argument("--policy", choices=sorted(POLICIES), action="append", help="(default: both)")
    ap.add_argument("--profile", metavar="WHAT", help="cProfile the frames of the change whose name has WHAT")
    ap.add_argument("--interleave", action="store_true",
                    help="users' devices registered in turn (as bench/scale.sh), not one user's in a row")
    args = ap.parse_args()
    streams = args.streams or args.nodes
    print(f"map builder fan-out, {args.nodes} nodes, {streams} streams")
    for label in args.policy or list(POLICIES):
        for patches in (True, False) if args.objects else (True,):
            for what, line in run(args.nodes, args.group, POLICIES[label], patches, streams, args.profile,
                                 args.interleave):
                print(f"{label:15} {'patches' if patches else 'objects':8} {what:21} {line}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
