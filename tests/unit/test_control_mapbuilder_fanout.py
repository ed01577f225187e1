"""Changes that concern every node (a policy, a DNS record) fanned out from shared pieces (mapbuilder).

A policy change reuses the previous snapshot's interned reach sets and filter texts, and nodes share
one filter text and one reach set where their rules and visibility agree. The reference for "right"
is independent of all that sharing: a fresh snapshot built from nothing, and the policy compiled
afresh (`visible_peers`, `rules_to_json(filter_rules)`): every stream, woken or skipped by the
server's wake-up rule, must hold exactly that after every change.
"""

from __future__ import annotations

import dataclasses
import json

from hypothesis import HealthCheck, given, settings, strategies as st

from magicdns.records import Record
from meshnode.control.client import MapAssembler
from meshnode.control.mapbuilder import (FilterTexts, ReachSets, Snapshot, StreamState, build_snapshot, next_frame,
                                         node_info)
from meshnode.control.store import DnsSettings, Node
from meshnode.policy import compile_policy, parse_policy, rules_to_json
from tests.unit.test_control_resume import deliver

USERS = ("alice@example.com", "bob@example.com", "carol@example.com")
OWNERS = {"tag:server": ["alice@example.com"]}


def _p(*acls: tuple[list[str], list[str]], groups: dict | None = None) -> str:
    doc: dict = {"tagOwners": OWNERS, "acls": [{"action": "accept", "src": s, "dst": d} for s, d in acls]}
    if groups:
        doc["groups"] = groups
    return json.dumps(doc)


OPS_GROUP = {"group:ops": ["alice@example.com", "bob@example.com"]}
POLICIES = [
    None,                                                                    # allow-all
    _p((["*"], ["*:22,80"])),
    _p((["*"], ["*:22,80,443"])),                                            # a port added: same visibility
    _p((["autogroup:member"], ["autogroup:self:*"])),
    _p((["autogroup:member"], ["autogroup:self:22"]), (["autogroup:member"], ["autogroup:self:443"])),
    _p((["autogroup:member"], ["autogroup:self:*"]), (["group:ops"], ["group:ops:*"]), groups=OPS_GROUP),
    _p((["autogroup:member"], ["tag:server:443"]), (["alice@example.com"], ["10.1.0.0/24:*"])),
    _p((["group:ops"], ["*:*"]), (["carol@example.com"], ["0.0.0.0/0:*"]), groups=OPS_GROUP),
]


def node(i: int, user: str, **kw) -> Node:
    base = dict(id=i, machine_key=f"m{i}", node_key=f"k{i}", name=f"n{i}", hostname=f"n{i}", user=user, tags=(),
                os="linux", endpoints=(), advertised_routes=(), approved_routes=(), advertises_exit_node=False,
                exit_node_approved=False, ephemeral=False, created=0.0, last_seen=None, expiry=None,
                logged_out=False, offset=i, authkey_id=None)
    base.update(kw)
    return Node(**base)


def initial_rows(users: list[int]) -> dict[int, Node]:
    rows = {i: node(i, USERS[users[i - 1] % 3]) for i in range(1, 8)}
    rows[5] = dataclasses.replace(rows[5], tags=("tag:server",))
    rows[6] = dataclasses.replace(rows[6], advertised_routes=("10.1.0.0/24",), approved_routes=("10.1.0.0/24",))
    rows[7] = dataclasses.replace(rows[7], advertises_exit_node=True, exit_node_approved=True)
    return rows


def build(prev: Snapshot | None, rows: dict[int, Node], version: int, policy_text: str | None,
          records: tuple[Record, ...], online: set[int]) -> Snapshot:
    policy = parse_policy(policy_text) if policy_text else None
    snap, _ = build_snapshot(prev, version=version, domain="tailnet", nodes=list(rows.values()),
                             online=dict.fromkeys(online, 1), now=100.0, policy_text=policy_text, policy=policy,
                             dns=DnsSettings(), records=records, tailnet_version=version, epoch="e")
    return snap


def check_against_fresh(snap: Snapshot, rows: dict[int, Node], policy_text: str | None, records: tuple,
                        online: set[int], streams: dict[int, tuple[StreamState, MapAssembler]]) -> None:
    fresh = build(None, rows, snap.version, policy_text, records, online)
    compiled = compile_policy(parse_policy(policy_text) if policy_text else None,
                              [node_info(n) for n in fresh.rows.values()])
    for nid, (_state, asm) in streams.items():
        held = asm.apply({"type": "delta", "version": snap.version})
        assert held == MapAssembler().apply(json.loads(next_frame(fresh, StreamState(nid))))
        assert [dict(r) for r in held.packet_filter] == rules_to_json(compiled.filter_rules(nid))
        assert {p.id for p in held.peers} == compiled.visible_peers(nid)


OPS = st.lists(st.tuples(st.sampled_from(["policy", "policy", "record", "endpoints", "rename", "online", "user",
                                          "delete", "add"]),
                         st.integers(1, 9), st.integers(0, len(POLICIES) - 1)), min_size=1, max_size=10)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, users=st.lists(st.integers(0, 2), min_size=7, max_size=7), start=st.integers(0, len(POLICIES) - 1))
def test_policy_and_dns_changes_leave_every_stream_on_the_fresh_map(ops: list, users: list[int], start: int) -> None:
    rows = initial_rows(users)
    policy_text = POLICIES[start]
    records: tuple[Record, ...] = ()
    online: set[int] = {1, 2}
    version = 1
    snap = build(None, rows, version, policy_text, records, online)
    streams = {i: (StreamState(i, patches=True), MapAssembler()) for i in rows}
    for state, asm in streams.values():
        asm.apply(json.loads(next_frame(snap, state)))
    next_id = 10
    for kind, target, arg in ops:
        if kind == "policy":
            policy_text = POLICIES[arg]
        elif kind == "record":
            records = records + (Record(f"r{len(records)}.tailnet", "A", f"100.64.0.{arg + 1}"),)
        elif kind == "online":
            online ^= {target}
        elif kind == "add":
            rows[next_id] = node(next_id, USERS[arg % 3])
            next_id += 1
        elif target not in rows:
            continue
        elif kind == "delete":
            del rows[target]
        else:
            field = {"endpoints": ("endpoints", (f"192.0.2.{arg}:{version}",)), "rename": ("name", f"r{target}v{version}"),
                     "user": ("user", USERS[arg % 3])}[kind]
            rows[target] = dataclasses.replace(rows[target], **{field[0]: field[1]})
        version += 1
        prev, snap = snap, build(snap, rows, version, policy_text, records, online)
        deliver(prev, snap, streams)
        check_against_fresh(snap, rows, policy_text, records, online, streams)


def test_a_port_added_keeps_every_reach_set_and_sends_only_filters() -> None:
    rows = initial_rows([0, 0, 1, 1, 2, 2, 0])
    snap = build(None, rows, 1, POLICIES[3], (), set())
    states = {i: StreamState(i, patches=True) for i in rows}
    for state in states.values():
        next_frame(snap, state)
    held = {i: s.reach for i, s in states.items()}
    snap2 = build(snap, rows, 2, POLICIES[4], (), set())
    assert snap2.compiled is not snap.compiled
    for nid, state in states.items():
        text = next_frame(snap2, state)
        if rows[nid].tags:   # a tagged node has no devices of its own: nothing changed for it
            assert text is None
        else:
            assert set(json.loads(text)) == {"type", "version", "packet_filter", "resume"}, nid   # no peers
        assert state.reach is held[nid]   # the very set object: no diff was computed
    # Nodes with the same rules share one filter text; different ones do not.
    alice = [n for n, r in rows.items() if r.user == USERS[0] and not r.tags]
    assert len(alice) >= 2 and states[alice[0]].filter_text != states[alice[1]].filter_text  # own addresses


def test_nodes_under_star_rules_share_one_filter_text_and_one_reach_set() -> None:
    rows = {i: node(i, USERS[i % 3]) for i in range(1, 30)}
    snap = build(None, rows, 1, POLICIES[1], (), set())
    states = [StreamState(i) for i in rows]
    for state in states:
        next_frame(snap, state)
    assert all(s.filter_text is states[0].filter_text and s.reach is states[0].reach for s in states)
    snap2 = build(snap, rows, 2, POLICIES[2], (), set())
    frames = {next_frame(snap2, s).split('"resume"')[0] for s in states}
    assert len(frames) == 1   # one text but for the resume token
    assert all(s.filter_text is states[0].filter_text for s in states)


def test_tables_of_older_policies_are_not_kept() -> None:
    rows = {i: node(i, USERS[i % 3]) for i in range(1, 6)}
    snap = build(None, rows, 1, POLICIES[1], (), set())
    for v, text in enumerate([POLICIES[3], POLICIES[1], POLICIES[5]], start=2):
        prev, snap = snap, build(snap, rows, v, text, (), set())
        for i in rows:
            snap.reach.of(snap.compiled, i)
            snap.filters.of(snap.compiled, i)
        # Each generation knows only the one before it, never a chain back to the first policy.
        assert snap.reach._old_sets is prev.reach._sets and snap.filters._old_texts is prev.filters._texts
        assert snap.filters._old_by_id is prev.filters._by_id and snap.reach._old_parts is prev.reach._parts
    assert isinstance(snap.reach, ReachSets) and isinstance(snap.filters, FilterTexts)


def test_filter_and_dns_deltas_keep_the_nodes_peer_tuple_and_peer_deltas_replace_it() -> None:
    rows = {i: node(i, USERS[0]) for i in range(1, 6)}
    snap = build(None, rows, 1, POLICIES[1], (), set())
    state, asm = StreamState(1, patches=True), MapAssembler()
    first = asm.apply(json.loads(next_frame(snap, state)))
    steps = [("filter", POLICIES[2], ()), ("dns", POLICIES[2], (Record("w.tailnet", "A", "100.64.0.1"),))]
    held = first
    for what, text, records in steps:
        snap = build(snap, rows, snap.version + 1, text, records, set())
        nm = asm.apply(json.loads(next_frame(snap, state)))
        assert nm.peers is held.peers, what                 # no re-sort of the peers for these
        assert nm == MapAssembler().apply(json.loads(next_frame(snap, StreamState(1))))
        held = nm
    rows[3] = dataclasses.replace(rows[3], endpoints=("192.0.2.9:1",))
    snap = build(snap, rows, snap.version + 1, POLICIES[2], steps[-1][2], set())
    nm = asm.apply(json.loads(next_frame(snap, state)))
    assert nm.peers is not held.peers and nm.peers[1].endpoints == ("192.0.2.9:1",)
    assert nm == MapAssembler().apply(json.loads(next_frame(snap, StreamState(1))))


def test_dns_text_is_reused_only_for_the_same_records_and_settings() -> None:
    rows = {i: node(i, USERS[0]) for i in range(1, 4)}
    records = (Record("w.tailnet", "A", "100.64.0.1"),)
    s1 = build(None, rows, 1, None, records, set())
    s2 = build(s1, rows, 2, POLICIES[1], records, set())
    assert s2.dns_text is s1.dns_text
    s3 = build(s2, rows, 3, POLICIES[1], records + (Record("v.tailnet", "A", "100.64.0.2"),), set())
    assert "v.tailnet" in s3.dns_text
    s4, _ = build_snapshot(s3, version=4, domain="tailnet", nodes=list(rows.values()), online={}, now=100.0,
                           policy_text=POLICIES[1], policy=parse_policy(POLICIES[1]),
                           dns=DnsSettings(nameservers=("9.9.9.9",)), records=s3.dns_source[1])
    assert "9.9.9.9" in s4.dns_text
    listed = [Record("w.tailnet", "A", "100.64.0.1")]   # a list may change in place: never reused
    s5, _ = build_snapshot(s4, version=5, domain="tailnet", nodes=list(rows.values()), online={}, now=100.0,
                           policy_text=None, policy=None, dns=DnsSettings(), records=listed)
    listed.append(Record("x.tailnet", "A", "100.64.0.3"))
    s6, _ = build_snapshot(s5, version=6, domain="tailnet", nodes=list(rows.values()), online={}, now=100.0,
                           policy_text=None, policy=None, dns=DnsSettings(), records=listed)
    assert "x.tailnet" in s6.dns_text and "x.tailnet" not in s5.dns_text
