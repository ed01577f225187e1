"""Resuming a map stream from the version a node holds, and per-peer patches (mapbuilder, sans-I/O).

The reference for "right" is always a fresh full map of the same snapshot: a node that resumed (or
applied patches) must hold exactly that, field for field.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from meshnode.control.client import MapAssembler
from meshnode.control.mapbuilder import (NodeGone, ResumeToken, Snapshot, StreamState, build_snapshot, concerned,
                                         fast_forward, next_frame, resumable, resume_frame)
from meshnode.control.store import Change, DnsSettings, Node
from meshnode.netmap import NetMapError
from meshnode.policy import parse_policy

EPOCH = "e0e0e0e0"
# Two users who see only their own devices: visibility is not everything-to-everything, so a
# resume has peers to leave out and peers to remove.
POLICY = json.dumps({"acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["alice@example.com:*"]},
                              {"action": "accept", "src": ["bob@example.com"], "dst": ["bob@example.com:*"]}]})


def deliver(prev: Snapshot, snap: Snapshot, streams: dict[int, tuple[StreamState, MapAssembler]]) -> int:
    """Bring every stream from `prev` to `snap` as the server does (streams a change does not concern
    are fast-forwarded; a node gone ends its stream), applying each frame to its node's assembler.
    Returns how many streams were fast-forwarded."""
    nodes = concerned(prev, snap)
    skipped = 0
    for nid, (state, asm) in list(streams.items()):
        if nodes is not None and nid not in nodes and fast_forward(prev, snap, state):
            skipped += 1
            continue
        try:
            frame = next_frame(snap, state)
        except NodeGone:
            del streams[nid]
            continue
        if frame is not None:
            asm.apply(json.loads(frame))
    return skipped

def node(i: int, name: str, user: str = "alice@example.com", **kw) -> Node:
    base = dict(id=i, machine_key=f"m{i}", node_key=f"k{i}", name=name, hostname=name, user=user, tags=(),
                os="linux", endpoints=(), advertised_routes=(), approved_routes=(), advertises_exit_node=False,
                exit_node_approved=False, ephemeral=False, created=0.0, last_seen=None, expiry=None,
                logged_out=False, offset=i, authkey_id=None)
    base.update(kw)
    return Node(**base)


def build(prev: Snapshot | None, nodes: dict[int, Node], tv: int, online: set[int] = frozenset(),
          policy_text: str | None = POLICY, now: float = 100.0) -> Snapshot:
    policy = parse_policy(policy_text) if policy_text else None
    snap, _ = build_snapshot(prev, version=tv, domain="tailnet", nodes=list(nodes.values()),
                             online=dict.fromkeys(online, 1), now=now, policy_text=policy_text, policy=policy,
                             dns=DnsSettings(), records=(), tailnet_version=tv, epoch=EPOCH)
    return snap


def full_map(snap: Snapshot, nid: int):  # noqa: ANN201
    return MapAssembler().apply(json.loads(next_frame(snap, StreamState(nid))))


def change(v: int, action: str, *ids: int) -> Change:
    return Change(v, 0.0, ((action, "node:x"),), tuple(ids))


def test_resume_sends_only_the_changed_peers_and_ends_at_the_full_map() -> None:
    rows = {i: node(i, f"n{i}") for i in range(1, 6)}
    rows[5] = node(5, "bobs", user="bob@example.com")
    s1 = build(None, rows, 10, online={2, 3})
    asm = MapAssembler()
    asm.apply(json.loads(next_frame(s1, StreamState(1))))
    assert asm.resume == f"{EPOCH}.1.10"

    # While node 1 is away: a rename, new endpoints, a deletion, a new alice node, a new bob node,
    # and node 2 goes offline (presence is not in the change log).
    rows[2] = dataclasses.replace(rows[2], name="web")
    rows[3] = dataclasses.replace(rows[3], endpoints=("192.0.2.1:41641",))
    del rows[4]
    rows[6] = node(6, "n6")
    rows[7] = node(7, "bob2", user="bob@example.com")
    log = [change(11, "node.rename", 2), change(12, "node.endpoints", 3), change(13, "node.delete", 4),
           change(14, "node.register", 6), change(15, "node.register", 7)]
    s2 = build(s1, rows, 15, online={3})

    token = ResumeToken.parse(asm.resume)
    nodes = resumable(s2, token, 1, log)
    assert nodes == {2, 3, 4, 6, 7}
    frame = json.loads(resume_frame(s2, StreamState(1), nodes))
    assert frame["type"] == "delta"
    assert [p["id"] for p in frame["peers_changed"]] == [2, 3, 6]   # bob's node 7 is not sent at all
    assert frame["peers_removed"] == [4, 7]                        # harmless for ids it never held
    assert frame["peers_present"] == [2, 3, 6] and frame["peers_online"] == [3]
    assert asm.apply(frame) == full_map(s2, 1)
    assert asm.resume == f"{EPOCH}.1.15"


def test_a_resumed_stream_goes_on_with_ordinary_deltas() -> None:
    rows = {i: node(i, f"n{i}") for i in range(1, 4)}
    s1 = build(None, rows, 1)
    asm = MapAssembler()
    asm.apply(json.loads(next_frame(s1, StreamState(1))))
    rows[2] = dataclasses.replace(rows[2], name="two")
    s2 = build(s1, rows, 2)
    st_ = StreamState(1, patches=True)
    asm.apply(json.loads(resume_frame(s2, st_, resumable(s2, ResumeToken.parse(asm.resume), 1,
                                                          [change(2, "node.rename", 2)]))))
    rows[3] = dataclasses.replace(rows[3], endpoints=("192.0.2.3:1",))
    s3 = build(s2, rows, 3)
    frame = json.loads(next_frame(s3, st_))
    assert frame["peers_patch"] == [{"id": 3, "endpoints": ["192.0.2.3:1"]}]
    assert asm.apply(frame) == full_map(s3, 1)


@pytest.mark.parametrize("why, token, log", [
    ("another tailnet", "ffff.1.10", [change(11, "node.rename", 2)]),
    ("another node's map", f"{EPOCH}.2.10", [change(11, "node.rename", 2)]),
    ("a version from the future", f"{EPOCH}.1.99", []),
    ("a hole in the log", f"{EPOCH}.1.10", [change(12, "node.rename", 2)]),
    ("a log that stops short of the snapshot", f"{EPOCH}.1.10", [change(11, "node.rename", 2)][:0]),
    ("a policy change", f"{EPOCH}.1.10", [change(11, "policy.set")]),
    ("a write that named nothing", f"{EPOCH}.1.10", [Change(11, 0.0, (("tailnet", ""),))]),
    ("a domain change", f"{EPOCH}.1.10", [change(11, "dns.domain")]),
    ("its own tags changed", f"{EPOCH}.1.10", [change(11, "node.tags", 1)]),
    ("it logged in again", f"{EPOCH}.1.10", [change(11, "node.login", 1)]),
])
def test_unknowable_gaps_get_a_full_map(why: str, token: str, log: list[Change]) -> None:
    rows = {i: node(i, f"n{i}") for i in range(1, 4)}
    s = build(None, rows, 11)
    parsed = ResumeToken.parse(token)
    assert parsed is not None
    assert resumable(s, parsed, 1, log) is None, why


@pytest.mark.parametrize("text", [None, 7, "", "x", "e.1", "e.1.2.3", "e.one.2", "e.1.-2", "e." + "1" * 200 + ".2",
                                  ["e", 1, 2]])
def test_malformed_tokens_are_no_tokens(text: object) -> None:
    assert ResumeToken.parse(text) is None


def test_a_peer_gone_without_a_log_entry_is_dropped_on_resume() -> None:
    # Key expiry takes a node out of every map when its time passes: no write, no change-log entry.
    rows = {1: node(1, "a"), 2: node(2, "b", expiry=150.0), 3: node(3, "c")}
    s1 = build(None, rows, 5, now=100.0)
    asm = MapAssembler()
    asm.apply(json.loads(next_frame(s1, StreamState(1))))
    s2 = build(s1, rows, 5, now=200.0)
    frame = json.loads(resume_frame(s2, StreamState(1), resumable(s2, ResumeToken.parse(asm.resume), 1, [])))
    assert frame["peers_changed"] == [] and frame["peers_present"] == [3]
    assert asm.apply(frame) == full_map(s2, 1)


def test_a_resume_naming_a_peer_the_node_lacks_is_refused() -> None:
    rows = {1: node(1, "a"), 2: node(2, "b")}
    s1 = build(None, rows, 1)
    asm = MapAssembler()
    asm.apply(json.loads(next_frame(s1, StreamState(1))))
    rows[3] = node(3, "c")
    s2 = build(s1, rows, 2)
    # A wrong server-side judgement (node 3's registration left out) must not yield a wrong map.
    frame = json.loads(resume_frame(s2, StreamState(1), frozenset()))
    with pytest.raises(NetMapError):
        asm.apply(frame)


def _patch_setup(**changes):  # noqa: ANN003, ANN202
    rows = {1: node(1, "a"), 2: node(2, "b", endpoints=("192.0.2.2:1",), disco_key="d1", home_region=1)}
    s1 = build(None, rows, 1, online={2})
    state = StreamState(1, patches=True)
    asm = MapAssembler()
    asm.apply(json.loads(next_frame(s1, state)))
    online = {2} if changes.pop("online", True) else set()
    rows[2] = dataclasses.replace(rows[2], **changes)
    s2 = build(s1, rows, 2, online=online)
    return s1, s2, state, asm


@pytest.mark.parametrize("changes, patch", [
    (dict(endpoints=("192.0.2.2:2", "[2001:db8::2]:2")), {"endpoints": ["192.0.2.2:2", "[2001:db8::2]:2"]}),
    (dict(endpoints=()), {"endpoints": None}),
    (dict(online=False, last_seen=150.0), {"online": False, "last_seen": 150.0}),
    (dict(home_region=7), {"home_region": 7}),
    (dict(name="bee"), {"name": "bee"}),
    (dict(node_key="k2-new", disco_key="d2"), {"node_key": "k2-new", "disco_key": "d2"}),
])
def test_small_changes_go_as_patches_of_only_those_fields(changes: dict, patch: dict) -> None:
    _s1, s2, state, asm = _patch_setup(**changes)
    frame = json.loads(next_frame(s2, state))
    assert "peers_changed" not in frame
    assert frame["peers_patch"] == [{"id": 2, **patch}]
    assert asm.apply(frame) == full_map(s2, 1)


def test_other_changes_and_old_clients_get_the_whole_peer() -> None:
    # A tag is not a patch field (it changes what the peer may do, and the policy).
    _s1, s2, state, asm = _patch_setup(os="plan9")
    frame = json.loads(next_frame(s2, state))
    assert "peers_patch" not in frame and [p["id"] for p in frame["peers_changed"]] == [2]
    assert asm.apply(frame) == full_map(s2, 1)
    # A node that did not say it understands patches gets whole objects, as before.
    s1, s2, _state, asm = _patch_setup(endpoints=("192.0.2.9:9",))
    old_client = StreamState(1)
    next_frame(s1, old_client)
    frame = json.loads(next_frame(s2, old_client))
    assert "peers_patch" not in frame and frame["peers_changed"][0]["endpoints"] == ["192.0.2.9:9"]


def test_a_stream_two_snapshots_behind_gets_whole_peers_not_patches() -> None:
    s1, s2, state, asm = _patch_setup(endpoints=("192.0.2.2:2",))
    rows = dict(s2.rows)
    rows[2] = dataclasses.replace(rows[2], endpoints=("192.0.2.2:3",))
    s3 = build(s2, rows, 3, online={2})
    frame = json.loads(next_frame(s3, state))   # state is still at s1
    assert "peers_patch" not in frame
    assert asm.apply(frame) == full_map(s3, 1)


# A random history of node-scoped writes and presence changes: resuming from any earlier point lands
# exactly on the full map, and patch-carrying deltas keep a live stream on it too.
OPS = st.lists(st.tuples(st.sampled_from(["rename", "endpoints", "delete", "add", "online", "region", "key"]),
                         st.integers(1, 8), st.integers(0, 3)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, start=st.integers(0, 11), users=st.lists(st.booleans(), min_size=8, max_size=8))
def test_resume_from_any_point_equals_the_full_map(ops: list, start: int, users: list[bool]) -> None:
    rows = {i: node(i, f"n{i}", user="bob@example.com" if users[i - 1] and i != 1 else "alice@example.com")
            for i in range(1, 7)}
    online: set[int] = {2, 3}
    tv = 1
    snaps = [build(None, rows, tv, online)]
    log: list[Change] = []
    live = StreamState(1, patches=True)
    live_asm = MapAssembler()
    live_asm.apply(json.loads(next_frame(snaps[0], live)))
    next_id = 7
    for kind, target, arg in ops:
        if target == 1 and kind in ("delete", "add"):
            continue
        if kind == "add":
            target, next_id = next_id, next_id + 1
            rows[target] = node(target, f"new{target}", user="bob@example.com" if arg % 2 else "alice@example.com")
        elif target not in rows:
            continue
        elif kind == "delete":
            del rows[target]
        elif kind == "online":
            online ^= {target}
        else:
            field = {"rename": ("name", f"r{target}x{arg}"), "endpoints": ("endpoints", tuple(f"192.0.2.{arg}:1"
                     for _ in range(arg))), "region": ("home_region", arg or None),
                     "key": ("node_key", f"k{target}v{arg}")}[kind]
            rows[target] = dataclasses.replace(rows[target], **{field[0]: field[1]})
        if kind != "online":
            tv += 1
            log.append(change(tv, f"node.{'register' if kind == 'add' else 'seen'}", target))
        snaps.append(build(snaps[-1], rows, tv, online))
        frame = next_frame(snaps[-1], live)
        if frame is not None:
            live_asm.apply(json.loads(frame))
    last = snaps[-1]
    assert live_asm.apply({"type": "delta", "version": last.version}) == full_map(last, 1)
    held = snaps[min(start, len(snaps) - 1)]
    asm = MapAssembler()
    asm.apply(json.loads(next_frame(held, StreamState(1))))
    token = ResumeToken.parse(asm.resume)
    nodes = resumable(last, token, 1, [c for c in log if c.version > token.version])
    assert nodes is not None
    assert asm.apply(json.loads(resume_frame(last, StreamState(1), nodes))) == full_map(last, 1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, users=st.lists(st.booleans(), min_size=8, max_size=8))
def test_waking_only_concerned_streams_keeps_every_stream_right(ops: list, users: list[bool]) -> None:
    """The server's wake-up rule (concerned / fast_forward) over a random history: every live
    stream, woken or skipped, ends holding exactly the full map of the last snapshot."""
    rows = {i: node(i, f"n{i}", user="bob@example.com" if users[i - 1] else "alice@example.com")
            for i in range(1, 7)}
    online: set[int] = {2, 3}
    snap = build(None, rows, 1, online)
    streams = {i: (StreamState(i, patches=True), MapAssembler()) for i in rows}
    for state, asm in streams.values():
        asm.apply(json.loads(next_frame(snap, state)))
    skipped = 0
    for step, (kind, target, arg) in enumerate(ops):
        if kind == "add" or target not in rows:
            continue
        if kind == "delete":
            del rows[target]
        elif kind == "online":
            online ^= {target}
        else:
            field = {"rename": ("name", f"r{target}x{step}"), "endpoints": ("endpoints", (f"192.0.2.{arg}:{step}",)),
                     "region": ("home_region", arg + 1), "key": ("node_key", f"k{target}v{step}")}[kind]
            rows[target] = dataclasses.replace(rows[target], **{field[0]: field[1]})
        prev, snap = snap, build(snap, rows, step + 2, online)
        skipped += deliver(prev, snap, streams)
    for nid, (state, asm) in streams.items():
        assert asm.apply({"type": "delta", "version": snap.version}) == full_map(snap, nid)


def test_an_endpoint_change_concerns_only_the_nodes_that_see_it() -> None:
    rows = {1: node(1, "a"), 2: node(2, "b"), 3: node(3, "c", user="bob@example.com"),
            4: node(4, "d", user="bob@example.com")}
    s1 = build(None, rows, 1)
    rows[3] = dataclasses.replace(rows[3], endpoints=("192.0.2.3:9",))
    s2 = build(s1, rows, 2)
    assert concerned(s1, s2) == {3, 4}
    rows[5] = node(5, "e")                          # a new node: membership changed, everyone
    assert concerned(s2, build(s2, rows, 3)) is None
    assert concerned(s1, build(s1, rows, 4, policy_text=None)) is None   # another policy
    waiting = StreamState(1)                        # no first map yet: never skipped
    assert not fast_forward(s1, s2, waiting)
