"""Per-node maps from snapshots: full then delta frames, visibility, removal (mapbuilder, sans-I/O)."""

import json

import pytest

from magicdns.records import parse_record
from meshnode.control.client import MapAssembler
from meshnode.control.mapbuilder import NodeGone, StreamState, build_snapshot, next_frame
from meshnode.control.store import DnsSettings, Node
from meshnode.policy import parse_policy


def node(i: int, name: str, user: str = "alice@example.com", tags: tuple[str, ...] = (), **kw) -> Node:
    base = dict(id=i, machine_key=f"m{i}", node_key=f"k{i}", name=name, hostname=name, user=user, tags=tags,
                os="linux", endpoints=(), advertised_routes=(), approved_routes=(), advertises_exit_node=False,
                exit_node_approved=False, ephemeral=False, created=0.0, last_seen=None, expiry=None,
                logged_out=False, offset=i, authkey_id=None)
    base.update(kw)
    return Node(**base)


def snap(prev, nodes, policy_text=None, dns=DnsSettings(), records=(), version=1, online=None):
    policy = parse_policy(policy_text) if policy_text else None
    s, differs = build_snapshot(prev, version=version, domain="tailnet", nodes=nodes, online=online or {},
                                now=100.0, policy_text=policy_text, policy=policy, dns=dns, records=records)
    return s, differs


def test_first_frame_is_full_and_then_deltas_carry_only_changes() -> None:
    nodes = [node(1, "a"), node(2, "b"), node(3, "c")]
    s1, _ = snap(None, nodes)
    st = StreamState(1)
    asm = MapAssembler()
    full = json.loads(next_frame(s1, st))
    assert full["type"] == "full"
    nm = asm.apply(full)
    assert [p.name for p in nm.peers] == ["b", "c"] and nm.self_node.name == "a"
    assert next_frame(s1, st) is None  # nothing new

    s2, differs = snap(s1, [nodes[0], node(2, "web"), nodes[2]], version=2)
    assert differs and s2.changed == {2}
    delta = json.loads(next_frame(s2, st))
    assert delta["type"] == "delta" and [p["name"] for p in delta["peers_changed"]] == ["web"]
    assert "self" not in delta and "dns" not in delta
    nm = asm.apply(delta)
    assert [p.name for p in nm.peers] == ["web", "c"] and nm.version == 2

    s3, _ = snap(s2, [nodes[0], node(2, "web")], version=3)
    delta = json.loads(next_frame(s3, st))
    assert delta.get("peers_removed") == [3]
    assert [p.name for p in asm.apply(delta).peers] == ["web"]


def test_unchanged_snapshot_does_not_differ() -> None:
    nodes = [node(1, "a"), node(2, "b")]
    s1, _ = snap(None, nodes)
    s2, differs = snap(s1, list(nodes))
    assert not differs and s2.compiled is s1.compiled


def test_online_flag_and_dns_changes_are_deltas() -> None:
    nodes = [node(1, "a"), node(2, "b")]
    s1, _ = snap(None, nodes)
    st = StreamState(1)
    asm = MapAssembler()
    asm.apply(json.loads(next_frame(s1, st)))
    s2, _ = snap(s1, nodes, online={2: 1}, dns=DnsSettings(("1.1.1.1",), (("corp.example", ()),), ()),
                 records=[parse_record("x", "A", "10.0.0.1")], version=2)
    nm = asm.apply(json.loads(next_frame(s2, st)))
    assert nm.peers[0].online and nm.dns.nameservers == ("1.1.1.1",)
    assert dict(nm.dns.routes) == {"corp.example": ()} and nm.dns.records[0].name == "x.tailnet"


def test_policy_change_hides_peers_and_sends_filter() -> None:
    nodes = [node(1, "a"), node(2, "b"), node(3, "bob", user="bob@example.com")]
    s1, _ = snap(None, nodes)
    st = StreamState(1)
    asm = MapAssembler()
    asm.apply(json.loads(next_frame(s1, st)))
    policy = '{"acls": [{"action": "accept", "src": ["alice@example.com"], "dst": ["alice@example.com:22"]}]}'
    s2, differs = snap(s1, nodes, policy_text=policy, version=2)
    assert differs
    delta = json.loads(next_frame(s2, st))
    nm = asm.apply(delta)
    assert [p.name for p in nm.peers] == ["b"]
    assert nm.packet_filter and "22" in nm.packet_filter[0]["ports"]
    bob = StreamState(3)
    assert json.loads(next_frame(s2, bob))["netmap"]["peers"] == []


def test_gone_node_ends_its_stream_and_logged_out_nodes_are_not_peers() -> None:
    nodes = [node(1, "a"), node(2, "b", logged_out=True), node(3, "c", expiry=50.0)]
    s1, _ = snap(None, nodes)
    assert set(s1.nodes) == {1}
    with pytest.raises(NodeGone):
        next_frame(s1, StreamState(2))


def test_stream_that_missed_snapshots_catches_up() -> None:
    nodes = [node(1, "a"), node(2, "b"), node(3, "c")]
    s1, _ = snap(None, nodes)
    st = StreamState(1)
    asm = MapAssembler()
    asm.apply(json.loads(next_frame(s1, st)))
    s2, _ = snap(s1, [nodes[0], node(2, "b2"), nodes[2]], version=2)
    s3, _ = snap(s2, [nodes[0], node(2, "b2"), node(3, "c3")], version=3)  # s2 never sent to this stream
    nm = asm.apply(json.loads(next_frame(s3, st)))
    assert [p.name for p in nm.peers] == ["b2", "c3"] and nm.version == 3


def test_stream_too_far_behind_gets_a_full_map() -> None:
    from meshnode.control.mapbuilder import HISTORY
    nodes = [node(1, "a"), node(2, "b")]
    s, _ = snap(None, nodes)
    st = StreamState(1)
    next_frame(s, st)
    for i in range(HISTORY + 1):
        s, _ = snap(s, [nodes[0], node(2, f"b{i}")], version=i + 2)
    frame = json.loads(next_frame(s, st))
    assert frame["type"] == "full" and frame["netmap"]["peers"][0]["name"] == f"b{HISTORY}"


def test_streams_of_one_visibility_class_share_one_reach_set() -> None:
    nodes = [node(i, f"n{i}") for i in range(1, 6)]
    s1, _ = snap(None, nodes)
    states = [StreamState(i) for i in range(1, 6)]
    for st in states:
        next_frame(s1, st)
    assert all(st.reach is states[0].reach for st in states)
    s2, _ = snap(s1, nodes + [node(6, "n6")], version=2)
    frames = [json.loads(next_frame(s2, st)) for st in states]
    assert all([p["name"] for p in f["peers_changed"]] == ["n6"] for f in frames)
    assert all(st.reach is states[0].reach and 6 in st.reach for st in states)


def test_lock_head_signatures_and_flow_switch_travel_in_full_and_delta_frames() -> None:
    nodes = [node(1, "a"), node(2, "b")]
    kw = dict(version=1, domain="tailnet", nodes=nodes, online={}, now=100.0, policy_text=None, policy=None,
              dns=DnsSettings(), records=())
    s1, _ = build_snapshot(None, **kw)
    st, asm = StreamState(1), MapAssembler()
    nm = asm.apply(json.loads(next_frame(s1, st)))
    assert nm.tka_head is None and nm.flow_logs is False and nm.peers[0].key_signature == ""
    # The lock is enabled and b's key signed: the same rows, so only the signature makes b change.
    s2, differs = build_snapshot(s1, **dict(kw, version=2), tka_head="HEAD1", signatures={"k2": "c2ln"},
                                 flow_logs=True)
    assert differs and s2.changed == {2}
    delta = json.loads(next_frame(s2, st))
    assert delta["tka_head"] == "HEAD1" and delta["flow_logs"] is True
    nm = asm.apply(delta)
    assert nm.tka_head == "HEAD1" and nm.flow_logs and nm.peers[0].key_signature == "c2ln"
    # Nothing changed: no frame; the lock turned off: a delta with a null head.
    s3, differs = build_snapshot(s2, **dict(kw, version=3), tka_head="HEAD1", signatures={"k2": "c2ln"},
                                 flow_logs=True)
    assert not differs
    s4, differs = build_snapshot(s3, **dict(kw, version=4), flow_logs=True)
    assert differs
    nm = asm.apply(json.loads(next_frame(s4, st)))
    assert nm.tka_head is None and nm.peers[0].key_signature == ""
    # A new stream gets it all in its full map.
    full = json.loads(next_frame(s2, StreamState(1)))
    assert full["netmap"]["tka_head"] == "HEAD1" and full["netmap"]["flow_logs"] is True
