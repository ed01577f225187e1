"""MapAssembler's reuse (peers tuple, parsed records, patched peers) gives exactly the map a fresh full
map of the same snapshot gives, and `apply_sealed` (the per-frame work of the stream's read loop)
refuses what does not open."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from nacl.public import PrivateKey

from magicdns.records import parse_record
from meshnode.control.client import MapAssembler
from meshnode.control.mapbuilder import StreamState, build_snapshot, next_frame
from meshnode.control.protocol import Channel, ProtocolError
from meshnode.control.store import DnsSettings, Node
from meshnode.netmap import DnsConfig, JsonBuilder, MapNode, NetMap, NetMapError, ViewBuilder, netmap_to_view
from meshnode.policy import parse_policy

POLICY = '{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:22,80"]}]}'
POLICY2 = '{"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:22,80,443"]}]}'


def node(i: int, user: str, **kw) -> Node:
    base = dict(id=i, machine_key=f"m{i}", node_key=f"k{i}", name=f"n{i}", hostname=f"n{i}", user=user, tags=(),
                os="linux", endpoints=(f"192.0.2.{i}:41641",), advertised_routes=(), approved_routes=(),
                advertises_exit_node=False, exit_node_approved=False, ephemeral=False, created=0.0,
                last_seen=None, expiry=None, logged_out=False, offset=i, authkey_id=None, disco_key=f"d{i}")
    base.update(kw)
    return Node(**base)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def channels() -> tuple[Channel, Channel]:
    """(server side, node side) of one machine's sealed channel."""
    server, machine = PrivateKey.generate(), PrivateKey.generate()
    return (Channel(_b64(bytes(server)), _b64(bytes(machine.public_key))),
            Channel(_b64(bytes(machine)), _b64(bytes(server.public_key))))


class Tailnet:
    """Rows and settings the map builder reads; `snap()` builds the next snapshot from them."""

    def __init__(self) -> None:
        self.rows = {i: node(i, "alice@example.com" if i <= 6 else "bob@example.com") for i in range(1, 11)}
        self.online = {i: 1 for i in self.rows if i % 2}
        self.policy = POLICY
        self.records = [parse_record("wiki", "A", "10.0.0.1"), parse_record("git", "CNAME", "wiki.tailnet.")]
        self.dns = DnsSettings(("1.1.1.1",), (("corp.example", ("10.0.0.53",)),), ())
        self.version = 0
        self.prev = None

    def snap(self):  # noqa: ANN201
        self.version += 1
        s, _ = build_snapshot(self.prev, version=self.version, domain="tailnet", nodes=list(self.rows.values()),
                              online=self.online, now=100.0, policy_text=self.policy,
                              policy=parse_policy(self.policy), dns=self.dns, records=tuple(self.records),
                              tailnet_version=self.version, epoch="test")
        self.prev = s
        return s


def fresh(s) -> NetMap:  # noqa: ANN001
    """What a node that connects now gets: a full map of snapshot `s`."""
    frame = json.loads(next_frame(s, StreamState(1, patches=True)))
    assert frame["type"] == "full"
    nm = MapAssembler().apply(frame)
    assert nm is not None
    return nm


def same(a: NetMap, b: NetMap) -> None:
    assert a == b
    assert a.to_json() == b.to_json()


def test_deltas_and_patches_after_a_full_map_give_the_map_a_fresh_full_map_gives() -> None:
    net, (server, node_chan) = Tailnet(), channels()
    st, asm = StreamState(1, patches=True), MapAssembler()

    def step(kind: str, keys: set[str]) -> NetMap:
        s = net.snap()
        text = next_frame(s, st)
        assert text is not None
        msg = json.loads(text)
        assert msg["type"] == kind and keys <= set(msg), msg
        nm = asm.apply_sealed(node_chan, server.seal_bytes(text.encode()))
        assert nm is not None and asm.last_type == kind
        same(nm, fresh(s))
        return nm

    first = step("full", {"netmap"})
    assert [p.id for p in first.peers] == [2, 3, 4, 5, 6]
    # One peer's endpoint (a patch), then its disco key, relay home and presence together.
    net.rows[3] = dataclasses.replace(net.rows[3], endpoints=("198.51.100.7:1", "[2001:db8::1]:2"))
    patched = step("delta", {"peers_patch"})
    assert patched.peers[1].endpoints == ("198.51.100.7:1", "[2001:db8::1]:2")
    assert all(a is b for a, b in zip(first.peers, patched.peers) if a.id != 3)
    net.rows[3] = dataclasses.replace(net.rows[3], disco_key="d3-new", home_region=7, endpoints=())
    net.online.pop(3)
    step("delta", {"peers_patch"})
    net.rows[3] = dataclasses.replace(net.rows[3], home_region=None)
    step("delta", {"peers_patch"})
    # A rename goes the general way (name and fqdn), and is still exact.
    net.rows[4] = dataclasses.replace(net.rows[4], name="renamed", hostname="renamed")
    step("delta", set())
    # A record added: the others are the very objects parsed before.
    net.records.append(parse_record("db", "AAAA", "fd00::1", 60))
    before = asm.apply_sealed(node_chan, server.seal_bytes(next_frame(net.snap(), st).encode()))
    net.records.append(parse_record("ci", "A", "10.0.0.9"))
    s = net.snap()
    dns = asm.apply_sealed(node_chan, server.seal_bytes(next_frame(s, st).encode()))
    same(dns, fresh(s))
    assert all(a is b for a, b in zip(before.dns.records, dns.dns.records))
    # A record removed, then a policy change: filter only; the peers are the same tuple.
    del net.records[0]
    step("delta", {"dns"})
    net.policy = POLICY2
    filtered = step("delta", {"packet_filter"})
    assert set(json.loads(next_frame(net.snap(), st) or "null") or {}) <= {"type", "version", "resume"}
    assert "443" in json.dumps([dict(r) for r in filtered.packet_filter])
    net.dns = DnsSettings(("9.9.9.9",), (), ("corp.example",))
    again = step("delta", {"dns"})
    assert again.peers is filtered.peers


def test_a_patch_applied_in_place_equals_the_general_path() -> None:
    """Every patch `_patched` takes must give what to_json -> change -> from_json gives; the others
    (other fields, bad values) go that way and are refused as before."""
    base = MapNode.from_json({"id": 5, "name": "n5", "user": "u", "addresses": ["100.64.0.5", "fd7a::5"],
                              "node_key": "k5", "endpoints": ["192.0.2.5:1"], "online": True,
                              "last_seen": 10.0, "disco_key": "d5", "home_region": 2, "tags": ["tag:x"]},
                             "tailnet")
    patches = [{"endpoints": ["198.51.100.1:2"]}, {"endpoints": None}, {"endpoints": []}, {"online": False},
               {"online": None}, {"online": 1}, {"last_seen": 12}, {"last_seen": None}, {"disco_key": None},
               {"disco_key": "d5b"}, {"home_region": 9}, {"home_region": None},
               {"endpoints": ["a:1"], "online": False, "last_seen": 1.5, "disco_key": "x", "home_region": 1},
               {"name": "other"}, {"tags": None}, {"endpoints": "192.0.2.1:1"}, {}]
    for patch in patches:
        obj = base.to_json("tailnet")
        for key, value in patch.items():
            if value is None:
                obj.pop(key, None)
            else:
                obj[key] = value
        want = MapNode.from_json(obj, "tailnet")
        asm = MapAssembler()
        asm.apply({"type": "full", "netmap": {"version": 1, "domain": "tailnet", "self": dict(obj, id=1),
                                              "peers": [base.to_json("tailnet")]}})
        nm = asm.apply({"type": "delta", "version": 2, "peers_patch": [dict(patch, id=5)]})
        assert nm is not None and nm.peers == (want,), patch
    for bad in ({"home_region": 0}, {"home_region": True}, {"last_seen": "soon"}, {"online": True, "x": [1]}):
        asm = MapAssembler()
        asm.apply({"type": "full", "netmap": {"version": 1, "domain": "tailnet", "self": base.to_json("tailnet"),
                                              "peers": [base.to_json("tailnet")]}})
        if "x" in bad:   # an unknown field is ignored by from_json, as before
            assert asm.apply({"type": "delta", "version": 2, "peers_patch": [dict(bad, id=5)]}) is not None
            continue
        with pytest.raises(NetMapError):
            asm.apply({"type": "delta", "version": 2, "peers_patch": [dict(bad, id=5)]})


def full_with_records(records: list[dict]) -> dict:
    return {"type": "full", "netmap": {"version": 1, "domain": "tailnet",
                                       "self": {"id": 1, "name": "a", "addresses": ["100.64.0.1"], "node_key": "k"},
                                       "dns": {"records": records}}}


def test_reused_records_never_stand_for_a_record_that_parses_differently() -> None:
    asm = MapAssembler()
    ok = {"name": "wiki.tailnet.", "type": "A", "value": "10.0.0.1", "ttl": 1}
    asm.apply(full_with_records([ok]))
    # ttl true == 1 in Python: it must be parsed (and refused), not taken for the cached record.
    with pytest.raises(NetMapError, match="records"):
        asm.apply({"type": "delta", "version": 2, "dns": {"records": [dict(ok, ttl=True)]}})
    asm = MapAssembler()
    asm.apply(full_with_records([ok]))
    nm = asm.apply({"type": "delta", "version": 2, "dns": {"records": [ok, dict(ok, override=True)]}})
    assert [r.override for r in nm.dns.records] == [False, True]
    dns = {"records": [dict(ok, name="wiki"), dict(ok, type="CNAME", value="wiki")]}
    nm = asm.apply({"type": "delta", "version": 3, "domain": "other", "dns": dns})
    assert nm.dns == DnsConfig.from_json(dns, "other")   # what a node that never cached anything reads


def test_the_record_cache_holds_only_about_what_the_map_holds() -> None:
    asm = MapAssembler()
    asm.apply(full_with_records([]))
    for v in range(2, 400):
        rec = {"name": f"r{v}.tailnet.", "type": "A", "value": "10.0.0.1"}
        nm = asm.apply({"type": "delta", "version": v, "dns": {"records": [rec]}})
        assert [r.name for r in nm.dns.records] == [f"r{v}.tailnet"]
    assert len(asm._records) <= 2 + 64


def test_apply_sealed_refuses_a_frame_that_does_not_open() -> None:
    server, node_chan = channels()
    other, _ = channels()
    net = Tailnet()
    text = next_frame(net.snap(), StreamState(1, patches=True)).encode()
    sealed = server.seal_bytes(text)
    assert sealed[:24] != server.seal_bytes(text)[:24]   # a fresh nonce each time
    asm = MapAssembler()
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    for bad in (tampered, other.seal_bytes(text), sealed[:20], b""):
        with pytest.raises(ProtocolError):
            asm.apply_sealed(node_chan, bad)
    assert asm.apply_sealed(node_chan, sealed) is not None
    # A sealed keepalive opens and yields nothing; seal() and open() still agree with open_bytes().
    assert asm.apply_sealed(node_chan, server.seal_bytes(b'{"type":"keepalive"}')) is None
    assert node_chan.open(server.seal({"a": 1}))[1] == {"a": 1}
    # The same bytes on the wire as before: PyNaCl's Box opens what seal_bytes makes, and the reverse.
    assert node_chan._box.decrypt(server.seal_bytes(b"wire")) == b"wire"
    assert server.open_bytes(bytes(node_chan._box.encrypt(b"back"))) == b"back"
    assert json.loads(server.open_bytes(node_chan.seal({"b": 2}))) == {"b": 2}


def test_the_daemons_view_builder_converts_only_changed_peers_and_equals_a_fresh_view() -> None:
    """The daemon builds each map's DNS view with one ViewBuilder: after deltas it must give exactly
    `netmap_to_view` of the same map, with the Host of every peer the delta left alone reused."""
    net, (server, node_chan) = Tailnet(), channels()
    st, asm, views = StreamState(1, patches=True), MapAssembler(), ViewBuilder()

    def next_map() -> NetMap:
        nm = asm.apply_sealed(node_chan, server.seal_bytes(next_frame(net.snap(), st).encode()))
        assert nm is not None
        return nm

    first = next_map()
    v1 = views.build(first)
    assert v1 == netmap_to_view(first)
    net.policy = POLICY2                                     # filter only
    v2 = views.build(next_map())
    assert all(a is b for a, b in zip(v1.peers, v2.peers))
    net.rows[3] = dataclasses.replace(net.rows[3], name="moved", hostname="moved")   # one peer renamed
    net.online.pop(5)                                        # and one goes offline
    nm3 = next_map()
    v3 = views.build(nm3)
    assert v3 == netmap_to_view(nm3)
    assert [h.name for h in v3.peers if h.name == "moved"] == ["moved"]
    kept = [a is b for a, b in zip(v2.peers, v3.peers)]
    assert kept.count(False) == 2 and len(kept) == 5
    net.rows[3] = dataclasses.replace(net.rows[3], logged_out=True)                  # a peer leaves
    nm4 = next_map()
    assert views.build(nm4) == netmap_to_view(nm4) and len(nm4.peers) == 4


def test_the_daemons_json_builder_writes_what_to_json_writes_after_every_kind_of_delta() -> None:
    net, (server, node_chan) = Tailnet(), channels()
    st, asm, js = StreamState(1, patches=True), MapAssembler(), JsonBuilder()

    def check() -> dict:
        nm = asm.apply_sealed(node_chan, server.seal_bytes(next_frame(net.snap(), st).encode()))
        assert nm is not None
        out = js.build(nm)
        assert out == nm.to_json() and NetMap.from_json(json.loads(json.dumps(out))) == nm
        return out

    first = check()
    net.policy = POLICY2
    second = check()
    assert all(a is b for a, b in zip(first["peers"], second["peers"]))   # reused, not rewritten
    net.rows[2] = dataclasses.replace(net.rows[2], endpoints=("198.51.100.2:9",))
    third = check()
    assert third["peers"][0] is not second["peers"][0] and third["peers"][0]["endpoints"] == ["198.51.100.2:9"]
    assert second["peers"][0]["endpoints"] == ["192.0.2.2:41641"]   # the dict handed out before is unchanged
    net.rows[4] = dataclasses.replace(net.rows[4], logged_out=True)
    check()
    # A new domain changes every peer's JSON (fqdn is written only when it is not NAME.DOMAIN).
    nm = asm.apply({"type": "delta", "version": 99, "domain": "other.example"})
    assert js.build(nm) == nm.to_json()


def test_a_full_map_after_deltas_keeps_only_its_own_records_and_reuses_them() -> None:
    asm = MapAssembler()
    recs = [{"name": f"r{i}.tailnet.", "type": "A", "value": f"10.0.0.{i}"} for i in range(1, 40)]
    for v, r in enumerate(recs):   # reconnects: a full map each time, a record more each time
        asm.apply(dict(full_with_records(recs[: v + 1]), resume=None))
    assert len(asm._records) == len(recs)
    nm = asm.apply(full_with_records(recs[:2]))
    assert len(asm._records) == 2
    again = asm.apply({"type": "delta", "version": 2, "dns": {"records": recs[:3]}})
    assert again.dns.records[:2] == nm.dns.records and all(a is b for a, b in zip(nm.dns.records, again.dns.records))
