"""Prefix sets in map frames (mapbuilder `FilterTexts.of(..., sets=True)`, `MapAssembler._expand`).

A node that says `"prefix_sets": true` gets each long source or destination list of its packet
filter once, as a named set, and rules that name it. What it assembles must be exactly what a node
given every list inline assembles, through every kind of policy change, a stream that fell behind, a
resume and a set that comes back after it was dropped; and a frame that names a set the node never
got is refused, never guessed.
"""

import dataclasses
import json

import pytest

from meshnode.control.client import MapAssembler
from meshnode.control.mapbuilder import (SET_MIN, ResumeToken, StreamState, build_snapshot, next_frame, resumable,
                                         resume_frame)
from meshnode.control.store import Change, DnsSettings
from meshnode.netmap import NetMapError
from meshnode.policy import parse_policy
from tests.unit.test_control_mapbuilder import node

USERS = ("alice@example.com", "bob@example.com", "carol@example.com")
# Devices of the three users interleaved (as they register over time): no list collapses to a CIDR.
ROWS = {i: node(i, f"n{i}", user=USERS[i % 3]) for i in range(1, 31)}

SELF = {"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}
SELF_PORT = {"acls": SELF["acls"] + [{"action": "accept", "src": ["autogroup:member"],
                                      "dst": ["autogroup:self:4242"]}]}
GROUP = {"groups": {"group:ab": [USERS[0], USERS[1]]},
         "acls": [{"action": "accept", "src": ["group:ab"], "dst": [f"{USERS[1]}:22,443"]}]}
SHORT = {"acls": [{"action": "accept", "src": ["100.64.0.0/29"], "dst": ["autogroup:self:*"]}]}
NONE = {"acls": []}


def build(prev, policy, version, rows=ROWS):  # noqa: ANN001, ANN201
    text = json.dumps(policy)
    snap, _ = build_snapshot(prev, version=version, domain="tailnet", nodes=list(rows.values()), online={},
                             now=100.0, policy_text=text, policy=parse_policy(text), dns=DnsSettings(),
                             records=(), tailnet_version=version, epoch="e")
    return snap


def plain(nm) -> list[dict]:  # noqa: ANN001
    return [dict(r) for r in nm.packet_filter]


def lists_in(rules: list) -> list[list]:
    return [v for r in rules for v in r.values() if isinstance(v, list)]


def test_a_sets_stream_assembles_exactly_the_inline_filter_through_policy_changes() -> None:
    inline, sets = StreamState(1), StreamState(1, sets=True)
    a_inline, a_sets = MapAssembler(), MapAssembler()
    prev = None
    sent: list[dict] = []
    sent_inline: list[dict] = []
    # Each policy after each other one, including going back to a filter whose sets were dropped.
    order = [SELF, SELF_PORT, GROUP, SHORT, SELF, NONE, SELF_PORT, GROUP, SELF_PORT]
    for version, policy in enumerate(order, 1):
        prev = build(prev, policy, version)
        f_inline, f_sets = json.loads(next_frame(prev, inline)), json.loads(next_frame(prev, sets))
        assert "prefix_sets" not in f_inline and "src_set" not in json.dumps(f_inline)
        nm_inline, nm_sets = a_inline.apply(f_inline), a_sets.apply(f_sets)
        assert plain(nm_sets) == plain(nm_inline), (version, policy)
        # The sets stream never carries a long list inline, and never a set the node still holds.
        rules = f_sets["netmap"]["packet_filter"] if f_sets["type"] == "full" else f_sets.get("packet_filter", [])
        assert all(len(v) < SET_MIN for v in lists_in(rules)), (version, rules)
        sent.append(f_sets)
        sent_inline.append(f_inline)
    assert any("src_set" in json.dumps(f) for f in sent)   # the policies above do name long lists
    # A port added over the same sources: the new filter names the set the node already holds.
    port_added = sent[1]
    assert "prefix_sets" not in port_added and "src_set" in json.dumps(port_added["packet_filter"])
    assert len(json.dumps(port_added)) * 2 < len(json.dumps(sent_inline[1]))
    # SELF after SHORT: the user's set was dropped (SHORT named none), so it is sent again.
    assert sent[4]["prefix_sets"] and set(sent[4]["prefix_sets"]) == {
        r["src_set"] for r in sent[4]["packet_filter"]}
    assert "prefix_sets" not in sent[5]   # an empty filter names nothing


def test_a_stream_that_fell_behind_gets_the_sets_of_the_filter_it_lands_on() -> None:
    st, asm, ref = StreamState(1, sets=True), MapAssembler(), MapAssembler()
    s1 = build(None, SELF, 1)
    asm.apply(json.loads(next_frame(s1, st)))
    s2 = build(s1, NONE, 2)
    s3 = build(s2, GROUP, 3)   # the stream skips s2: one merged delta from s1 to s3
    frame = json.loads(next_frame(s3, st))
    assert set(frame["prefix_sets"]) == {r["src_set"] for r in frame["packet_filter"] if "src_set" in r}
    assert plain(asm.apply(frame)) == plain(ref.apply(json.loads(next_frame(s3, StreamState(1)))))


def test_a_resumed_stream_gets_every_set_its_filter_names() -> None:
    s1 = build(None, SELF, 10)
    asm = MapAssembler()
    asm.apply(json.loads(next_frame(s1, StreamState(1, sets=True))))
    rows = dict(ROWS)
    rows[2] = dataclasses.replace(rows[2], name="two")
    s2 = build(s1, SELF, 11, rows)
    nodes = resumable(s2, ResumeToken.parse(asm.resume), 1, [Change(11, 0.0, (("node.rename", "node:two"),), (2,))])
    assert nodes == {2}
    # Another replica's stream: it cannot know what the node holds, so the frame names and carries all.
    frame = json.loads(resume_frame(s2, StreamState(1, sets=True), nodes))
    assert set(frame["prefix_sets"]) == {r["src_set"] for r in frame["packet_filter"]}
    assert plain(asm.apply(frame)) == plain(MapAssembler().apply(json.loads(next_frame(s2, StreamState(1)))))


def test_set_ids_name_the_content_so_replicas_agree() -> None:
    a = json.loads(next_frame(build(None, SELF, 1), StreamState(1, sets=True)))
    b = json.loads(next_frame(build(build(None, GROUP, 1), SELF, 2), StreamState(1, sets=True)))
    assert a["prefix_sets"] == b["prefix_sets"]


@pytest.mark.parametrize("why, frame", [
    ("a set never sent", {"type": "delta", "version": 2,
                          "packet_filter": [{"src_set": "feed", "dst": ["100.64.0.1/32"], "ports": "*", "protos": [6]}]}),
    ("a set id that is not a string", {"type": "delta", "version": 2,
                                       "packet_filter": [{"src_set": 7, "dst": [], "ports": "*", "protos": [6]}]}),
    ("prefix_sets not an object", {"type": "delta", "version": 2, "prefix_sets": ["x"], "packet_filter": []}),
    ("a set that is not a list", {"type": "delta", "version": 2, "prefix_sets": {"a": "100.64.0.1/32"},
                                  "packet_filter": []}),
])
def test_a_frame_naming_what_the_node_does_not_hold_is_refused(why: str, frame: dict) -> None:
    asm = MapAssembler()
    asm.apply(json.loads(next_frame(build(None, SHORT, 1), StreamState(1, sets=True))))
    with pytest.raises(NetMapError):
        asm.apply(frame)


def test_the_node_keeps_only_the_sets_its_filter_names() -> None:
    st, asm = StreamState(1, sets=True), MapAssembler()
    s1 = build(None, SELF, 1)
    full = json.loads(next_frame(s1, st))
    asm.apply(full)
    held = set(full["prefix_sets"])
    asm.apply(json.loads(next_frame(build(s1, NONE, 2), st)))
    stale = {"type": "delta", "version": 3, "packet_filter": [
        {"src_set": next(iter(held)), "dst": ["100.64.0.1/32"], "ports": "*", "protos": [6]}]}
    with pytest.raises(NetMapError, match="never sent"):
        asm.apply(stale)   # what the server assumes: a dropped set is sent again before it is named
