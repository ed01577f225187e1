"""Per-node network maps: one tailnet snapshot, and the full or delta frame each node needs from it.

No I/O here: the server reads the store, calls `build_snapshot`, then `next_frame` for every open
stream. The cost model matters at 10,000 nodes:
- a snapshot reuses the previous one's per-node JSON text (and policy compilation) for everything
  that did not change, so a rename serialises one node, not ten thousand;
- a stream that saw the previous snapshot and whose visible set is unchanged gets a delta computed
  from the snapshot's `changed` set (O(changed)), not by diffing every peer;
- frames are assembled from the cached JSON texts by string joins, never re-serialised per node.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from magicdns.records import Record

from ..netmap import MapNode, default_allowed_ips
from ..policy import CompiledPolicy, NodeInfo, Policy, compile_policy
from .addresses import address_objects
from .store import Change, DnsSettings, Node

HISTORY = 32  # snapshots a stream may fall behind and still get a delta

# Fields of a peer that change often on their own (a roaming laptop's endpoints, presence, a rename,
# a key rotation): when nothing else about a peer changed, a stream one snapshot behind gets only
# these in a patch (`peers_patch`), not the peer's whole object. Keys as in `MapNode.to_json`.
PATCH_FIELDS = frozenset({"name", "fqdn", "node_key", "disco_key", "key_signature", "endpoints", "online",
                          "home_region", "last_seen"})

# Change-log actions whose effect on a resuming node's map the change's node ids fully describe:
# node-scoped writes (the peers they name are sent again, or as removed) and settings every resume
# frame carries anyway (DNS). Anything else since the node's version (a policy, a domain, Tailnet
# Lock, a user's groups, a write that named nothing) could change which peers it sees: full map.
RESUMABLE_ACTIONS = frozenset({
    "node.register", "node.login", "node.rename", "node.delete", "node.expire", "node.logout",
    "node.endpoints", "node.seen", "node.tags", "node.routes", "node.login-approved",
    "authkey.create", "authkey.use", "authkey.revoke", "user.create", "user.role",
    "dns.nameservers", "dns.search_domains", "dns.route", "dns.records",
    "dns.record.add", "dns.record.remove", "dns.record.change",
})
# ...except when they wrote the resuming node itself: its tags, routes or login decide what it sees.
SELF_REACH_ACTIONS = frozenset({"node.register", "node.login", "node.tags", "node.routes"})


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


# A str as JSON, exactly as `_dumps` writes it, without an encoder object per call (one per frame).
_json_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def map_node(node: Node, domain: str, online: bool, key_signature: str = "", lock_key: str = "") -> MapNode:
    """A stored node as peers see it (with its Tailnet Lock signature, if the control server has one
    for its current node key)."""
    addrs = node.addresses
    allowed = default_allowed_ips(addrs, node.approved_routes, node.exit_node_approved)
    return MapNode(node.id, node.name, f"{node.name}.{domain}", node.user, addrs, node.node_key,
                   node.endpoints, allowed, node.advertised_routes, node.approved_routes,
                   node.exit_node_approved, node.advertises_exit_node, node.tags, online, node.os,
                   node.last_seen, node.ephemeral, node.disco_key, key_signature, lock_key,
                   node.home_region)


def node_info(node: Node) -> NodeInfo:
    """A stored node as the policy engine sees it."""
    return NodeInfo(node.id, node.name, node.user, node.tags, address_objects(node.offset),
                    tuple(ipaddress.ip_network(r) for r in node.approved_routes),
                    node.exit_node_approved)


def dns_json(settings: DnsSettings, records: Iterable[Record]) -> dict:
    return {"nameservers": list(settings.nameservers),
            "routes": {d: list(ups) for d, ups in settings.routes},
            "search_domains": list(settings.search_domains),
            "records": [r.to_json() for r in records],
            # Sent only when on, so maps (and their hashes) of tailnets without it do not change.
            **({"upgrade_public_dns": True} if settings.upgrade_public_dns else {})}


@dataclass(frozen=True)
class Snapshot:
    """The tailnet at one moment, shared by every stream. `seq` counts snapshots in this process."""

    seq: int
    version: int
    domain: str
    rows: Mapping[int, Node]              # active nodes (logged in, unexpired), as stored
    nodes: Mapping[int, MapNode]
    node_text: Mapping[int, str]          # JSON text of each MapNode (object reused while unchanged)
    infos: tuple[NodeInfo, ...]
    policy_text: str | None
    policy: Policy | None
    compiled: CompiledPolicy
    dns_text: str
    changed: frozenset[int] = frozenset()   # nodes new or different since snapshot seq-1
    removed: frozenset[int] = frozenset()   # nodes gone since snapshot seq-1
    # (seq, changed, removed) of the last HISTORY snapshots, this one last: a stream that fell a few
    # snapshots behind gets a delta from these instead of a full map, and no stream has to remember
    # what it was sent peer by peer (10k peers x 1k streams would pin a gigabyte).
    history: tuple[tuple[int, frozenset[int], frozenset[int]], ...] = ()
    reach: "ReachSets" = field(default_factory=lambda: ReachSets())
    filters: "FilterTexts" = field(default_factory=lambda: FilterTexts())   # of `compiled`, like `reach`
    derp_map_text: str = "null"             # the relay map (JSON of meshnode.derp.derpmap.RelayMap), or null
    ca_pem: str = ""  # the tailnet CA's certificate (ca.py), in every map so nodes can verify each other
    tka_head: str | None = None             # Tailnet Lock head of the tailnet (None: the lock is off)
    flow_logs: bool = False                 # connection logs on (`control settings flow-logs on`)
    # The store's version (change log) the rows were read at, or after; and the store's identity.
    # Together with a node id they make the resume token a node sends back when it reconnects.
    tailnet_version: int = 0
    epoch: str = ""
    # node id -> JSON text of a `peers_patch` entry, for nodes whose change since snapshot seq-1 is
    # only in PATCH_FIELDS (a stream exactly one snapshot behind sends these instead of node_text).
    patches: Mapping[int, str] = field(default_factory=dict)
    # (settings, records) `dns_text` was made from, when the records came as a tuple (immutable).
    dns_source: tuple = (None, None)

    def resume_token(self, node_id: int) -> str:
        return f"{self.epoch}.{node_id}.{self.tailnet_version}"

    @property
    def differs(self) -> bool:
        """Whether anything a node could see changed relative to the previous snapshot."""
        return bool(self.changed or self.removed)


def build_snapshot(prev: Snapshot | None, *, version: int, domain: str, nodes: Iterable[Node],
                   online: Mapping[int, int], now: float, policy_text: str | None, policy: Policy | None,
                   dns: DnsSettings, records: Iterable[Record], derp_map_text: str = "null",
                   ca_pem: str = "", tka_head: str | None = None,
                   signatures: Mapping[str, str] | None = None, flow_logs: bool = False,
                   lock_keys: Mapping[str, str] | None = None, tailnet_version: int = 0,
                   epoch: str = "") -> tuple[Snapshot, bool]:
    """The next snapshot and whether it differs from `prev` (if not, keep serving `prev`'s version)."""
    rows: dict[int, Node] = {}
    mnodes: dict[int, MapNode] = {}
    texts: dict[int, str] = {}
    infos: list[NodeInfo] = []
    changed: set[int] = set()
    patches: dict[int, str] = {}
    p_rows = prev.rows if prev and prev.domain == domain else {}
    p_infos = {i.id: i for i in prev.infos} if prev else {}
    for node in nodes:
        if not node.active(now):
            continue
        rows[node.id] = node
        old = prev.nodes.get(node.id) if prev and p_rows else None
        is_online = node.id in online
        sig = signatures.get(node.node_key, "") if signatures else ""
        lock_key = lock_keys.get(node.node_key, "") if lock_keys else ""
        if (old is not None and p_rows.get(node.id) is node and old.online == is_online
                and old.key_signature == sig and old.lock_key == lock_key):
            # The store hands back the identical Node object for an unchanged row.
            mnodes[node.id], texts[node.id] = old, prev.node_text[node.id]  # type: ignore[union-attr]
            info = p_infos.get(node.id)
            infos.append(info if info is not None else node_info(node))
            continue
        mn = map_node(node, domain, is_online, sig, lock_key)
        if old is not None and old == mn:
            mn, text = old, prev.node_text[node.id]  # type: ignore[union-attr]
        else:
            text = _dumps(mn.to_json(domain))
            changed.add(node.id)
            if old is not None:
                patch = _patch(old, mn, domain)
                if patch is not None:
                    patches[node.id] = patch
        mnodes[node.id], texts[node.id] = mn, text
        old_row = p_rows.get(node.id)
        info = p_infos.get(node.id)
        if info is None or old_row is None or _policy_fields(old_row) != _policy_fields(node):
            info = node_info(node)
        infos.append(info)
    infos_t = tuple(infos)
    same_nodes = prev is not None and prev.infos == infos_t
    if same_nodes and prev.policy_text == policy_text:  # type: ignore[union-attr]
        compiled = prev.compiled  # type: ignore[union-attr]
    else:   # a policy change over the same nodes keeps their index (addresses, users, tags, routes)
        compiled = compile_policy(policy, infos_t, prev.compiled if same_nodes else None)  # type: ignore[union-attr]
    if (prev is not None and isinstance(records, tuple) and prev.dns_source[1] is records
            and prev.dns_source[0] == dns):
        dns_text = prev.dns_text   # the same (immutable) records: 1,500 of them take ~2 ms to format
    else:
        dns_text = _dumps(dns_json(dns, records))
    removed = frozenset(prev.nodes.keys() - mnodes.keys()) if prev else frozenset()
    seq = (prev.seq + 1) if prev else 0
    changed_f = frozenset(changed)
    history = ((prev.history[-(HISTORY - 1):] if prev else ()) + ((seq, changed_f, removed),))
    if prev is not None and compiled is prev.compiled:
        reach, filters = prev.reach, prev.filters
    else:   # the previous tables let unchanged visibility classes and filters keep their objects
        reach = ReachSets(prev.reach if prev is not None else None)
        filters = FilterTexts(prev.filters if prev is not None else None)
    snap = Snapshot(seq, version, domain, rows, mnodes, texts, infos_t, policy_text, policy, compiled,
                    dns_text, changed_f, removed, history, reach, filters, derp_map_text, ca_pem, tka_head, flow_logs,
                    tailnet_version, epoch, patches,
                    (dns, records) if isinstance(records, tuple) else (None, None))
    differs = (prev is None or snap.differs or compiled is not prev.compiled or dns_text != prev.dns_text
               or domain != prev.domain or derp_map_text != prev.derp_map_text or ca_pem != prev.ca_pem
               or tka_head != prev.tka_head or flow_logs != prev.flow_logs)
    return snap, differs


def _patch(old: MapNode, new: MapNode, domain: str) -> str | None:
    """The `peers_patch` entry taking `old` to `new`, or None when a field outside PATCH_FIELDS
    changed. A field `to_json` leaves out (empty, false, None) is sent as null: "drop it"."""
    before, after = old.to_json(domain), new.to_json(domain)
    keys = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    if not keys <= PATCH_FIELDS:
        return None
    patch: dict[str, object] = {"id": new.id}
    for k in sorted(keys):
        patch[k] = after.get(k)
    return _dumps(patch)


TARGETED_MAX = 64   # changed nodes in one snapshot beyond which waking every stream is as cheap


def concerned(prev: Snapshot, snap: Snapshot) -> frozenset[int] | None:
    """The nodes whose maps `snap` changes relative to `prev`, when that is only some nodes' peer
    entries (endpoints, presence, a rename...): the changed nodes and every node that sees one of
    them (visibility is symmetric, so that is each changed node's own reach). None: it may concern
    every node (a policy, membership, DNS or relay change), or too many changed to be worth it."""
    if (snap.compiled is not prev.compiled or snap.removed or len(snap.changed) > TARGETED_MAX
            or snap.dns_text != prev.dns_text or snap.domain != prev.domain
            or snap.derp_map_text != prev.derp_map_text or snap.ca_pem != prev.ca_pem
            or snap.tka_head != prev.tka_head or snap.flow_logs != prev.flow_logs):
        return None
    out: set[int] = set()
    for node_id in snap.changed:
        out |= snap.reach.of(snap.compiled, node_id)
    return frozenset(out)


def fast_forward(prev: Snapshot, snap: Snapshot, state: StreamState) -> bool:
    """Mark a stream that holds `prev`'s map, and that `snap` does not concern, as holding `snap`'s
    (what `next_frame` would do, returning None), so it need not be woken; False if it is not at
    `prev` (behind, or still waiting for its first map): wake it."""
    if state.seq != prev.seq:
        return False
    state.seq = snap.seq
    return True


def _policy_fields(node: Node) -> tuple:
    # The name is left out on purpose: compilation never reads NodeInfo.name, so a rename keeps the
    # old NodeInfo and with it the compiled policy (recompiling 10k nodes costs ~100 ms).
    return (node.user, node.tags, node.offset, node.approved_routes, node.exit_node_approved)


def with_version(snap: Snapshot, version: int) -> Snapshot:
    return replace(snap, version=version)


class ReachSets:
    """Interned "visible peers plus self" sets of one compiled policy, and their pairwise diffs.

    `visible_peers(n)` is a fresh 10k-element set per node under a broad policy (half a megabyte);
    with self added back, nodes of one visibility class share one set, so a thousand streams hold one
    copy instead of a thousand, and a policy or membership change diffs each distinct pair of old
    and new sets once instead of once per stream.

    A node's set is the union of a few parts the compiled policy shares between nodes
    (`CompiledPolicy.visibility_parts`), so it is looked up by the identity of those parts: a few
    microseconds per node, where building, hashing and comparing a 10k-element set took half a
    millisecond. Parts and sets are interned by content across policies too (`prev`: the previous
    snapshot's tables): after a policy change that leaves who-sees-whom alone (a port added), every
    stream finds the very set object it holds, so its frame needs no peer diff at all. Only what the
    newest policy used is kept: the tables of older ones are dropped with their snapshots.
    """

    def __init__(self, prev: "ReachSets | None" = None) -> None:
        self._sets: dict[frozenset[int], frozenset[int]] = {}      # content -> the one shared object
        self._parts: dict[frozenset[int], frozenset[int]] = {}     # likewise, for parts
        self._part_of: dict[int, tuple[frozenset[int], frozenset[int]]] = {}   # id(part) -> (part, interned)
        self._union: dict[tuple[int, ...], frozenset[int]] = {}     # ids of interned parts -> their union
        self._node: dict[int, frozenset[int]] = {}                   # node id -> its set, this policy
        self._diffs: dict[tuple[frozenset[int], frozenset[int]], tuple[frozenset[int], frozenset[int]]] = {}
        # Only the previous generation's content tables: never a chain back through every policy.
        self._old_sets = prev._sets if prev is not None else {}
        self._old_parts = prev._parts if prev is not None else {}

    def _intern(self, table: dict[frozenset[int], frozenset[int]], old: dict[frozenset[int], frozenset[int]],
                value: frozenset[int]) -> frozenset[int]:
        hit = table.get(value)
        if hit is None:
            hit = old.get(value, value)
            table[hit] = hit
        return hit

    def of(self, compiled: CompiledPolicy, node_id: int) -> frozenset[int]:
        hit = self._node.get(node_id)
        if hit is not None:
            return hit
        interned = []
        for part in compiled.visibility_parts(node_id):
            known = self._part_of.get(id(part))
            if known is None:
                # The part itself is kept (in the value) so its id is not reused while it is a key.
                known = self._part_of[id(part)] = (part, self._intern(self._parts, self._old_parts, part))
            interned.append(known[1])
        key = tuple(sorted(id(p) for p in interned))
        union = self._union.get(key)
        if union is None:
            union = frozenset().union(*interned) if len(interned) != 1 else interned[0]
            # The interned parts stay alive in `_parts`, so the ids in `key` stay theirs.
            union = self._union[key] = self._intern(self._sets, self._old_sets, union)
        if node_id not in union:   # a node that only receives (a tagged server): its own set
            union = self._intern(self._sets, self._old_sets, union | {node_id})
        self._node[node_id] = union
        return union

    def diff(self, old: frozenset[int], new: frozenset[int]) -> tuple[frozenset[int], frozenset[int]]:
        """(added, removed) going from `old` to `new`."""
        key = (old, new)
        hit = self._diffs.get(key)
        if hit is None:
            hit = self._diffs[key] = (new - old, old - new)
        return hit


class FilterTexts:
    """The JSON text of each node's packet filter under one compiled policy, exactly
    `_dumps(rules_to_json(compiled.filter_rules(node)))`, built from pieces shared between nodes.

    Under group policies thousands of nodes get the same source lists (every member, a user's own
    devices) and the same ports: each list is formatted once, not once per node (formatting prefixes
    was most of a policy change's cost per stream). Whole texts are interned by content, and across
    policies too (`prev`), so nodes with one filter share one string and a stream whose filter a new
    policy left alone compares it by identity.
    """

    def __init__(self, prev: "FilterTexts | None" = None) -> None:
        self._texts: dict[str, str] = {}
        self._nets: dict[tuple, str] = {}          # prefixes -> JSON list text
        # id(prefix tuple) -> (the tuple, its text): source lists and a node's own host prefixes are
        # tuples shared between nodes and kept across policies (compile.py caches them), so most are
        # found by identity. The tuple is kept in the value, so its id cannot be reused meanwhile.
        self._by_id: dict[int, tuple[tuple, str]] = {}
        self._tails: dict[tuple, str] = {}         # (ports, protos) -> the rule's text after "dst"
        # (id(ports), id(protos)) -> (ports, protos, text): compile.py shares both tuples between the
        # nodes of a grant, so the tail is found without hashing each PortRange again.
        self._tails_by_id: dict[tuple[int, int], tuple[tuple, tuple, str]] = {}
        # Per form (False: lists inline; True: long lists as prefix-set references, see `of`).
        self._node: dict[bool, dict[int, str]] = {False: {}, True: {}}
        self._rules: dict[bool, dict[int, tuple[tuple, str]]] = {False: {}, True: {}}  # id(rules) -> (it, text)
        # A filter text in the reference form -> the sets it names, ((id, list text), ...), in order.
        self._refs: dict[str, tuple[tuple[str, str], ...]] = {}
        self._ids: dict[str, str] = {}            # list text -> its set id
        self._old_texts = prev._texts if prev is not None else {}
        self._old_refs = prev._refs if prev is not None else {}
        self._old_ids = prev._ids if prev is not None else {}
        self._old_nets = prev._nets if prev is not None else {}
        self._old_by_id = prev._by_id if prev is not None else {}
        # Found by id in the previous tables, not yet in `_nets`: the content table is completed with
        # them only when a lookup by content needs it (hashing a tuple of prefixes is most of what a
        # node's filter costs after a port change, and that change never looks anything up by content).
        self._carried: list[tuple[tuple, str]] = []
        self._old_carried = prev._carried if prev is not None else []

    def _shared_text(self, nets: tuple) -> str:
        hit = self._by_id.get(id(nets))
        if hit is None:
            hit = self._old_by_id.get(id(nets))
            if hit is None:
                hit = (nets, self._net_text(nets))
            else:   # kept for the content table: the next policy may bring equal new tuples
                self._carried.append(hit)
            self._by_id[id(nets)] = hit
        return hit[1]

    def _net_text(self, nets: tuple) -> str:
        if self._carried or self._old_carried:
            for table, carried in ((self._nets, self._carried), (self._old_nets, self._old_carried)):
                for known, text in carried:
                    table.setdefault(known, text)
                carried.clear()
        text = self._nets.get(nets)
        if text is None:
            text = self._old_nets.get(nets)
            if text is None:
                text = _dumps([str(p) for p in nets])
            self._nets[nets] = text
        return text

    def of(self, compiled: CompiledPolicy, node_id: int, sets: bool = False) -> str:
        """The node's filter text; with `sets`, every source or destination list of SET_MIN or more
        prefixes is a reference (`"src_set"`/`"dst_set"`: the list's set id) and `refs(text)` gives
        the sets it names."""
        by_node = self._node[sets]
        hit = by_node.get(node_id)
        if hit is not None:
            return hit
        shared = compiled.filter_rules(node_id)
        by_rules = self._rules[sets]
        known = by_rules.get(id(shared))   # nodes under `*` destinations share one rules tuple
        if known is not None:
            by_node[node_id] = known[1]
            return known[1]
        rules = []
        refs: list[tuple[str, str]] = []
        for rule in shared:
            by_id = self._tails_by_id.get((id(rule.ports), id(rule.protos)))
            if by_id is not None:
                tail = by_id[2]
            else:
                tail_key = (rule.ports, rule.protos)
                tail = self._tails.get(tail_key)
                if tail is None:
                    tail = self._tails[tail_key] = "".join([
                        ',"ports":', _dumps(",".join(str(r) for r in rule.ports)),
                        ',"protos":', _dumps([int(p) for p in rule.protos]), "}"])
                # The tuples are kept in the value, so their ids are not reused meanwhile.
                self._tails_by_id[(id(rule.ports), id(rule.protos))] = (rule.ports, rule.protos, tail)
            src, dst = self._shared_text(rule.src), self._shared_text(rule.dst)
            if sets and len(rule.src) >= SET_MIN:
                src = self._ref(src, refs, '{"src_set":')
            else:
                src = '{"src":' + src
            if sets and len(rule.dst) >= SET_MIN:
                dst = self._ref(dst, refs, ',"dst_set":')
            else:
                dst = ',"dst":' + dst
            rules.append("".join([src, dst, tail]))
        text = "[" + ",".join(rules) + "]"
        hit = self._texts.get(text)
        if hit is None:
            hit = self._old_texts.get(text, text)
            self._texts[hit] = hit
        if sets and hit not in self._refs:
            # Interned too: streams whose filters name the same sets share one tuple, and the
            # frame builder compares a stream's old and new tuples by identity first.
            found = tuple(refs)
            self._refs[hit] = self._old_refs.get(hit, found)
        by_node[node_id] = hit
        by_rules[id(shared)] = (shared, hit)
        return hit

    def refs(self, text: str) -> tuple[tuple[str, str], ...]:
        """The prefix sets a filter text from `of(..., sets=True)` names: (id, JSON list text)."""
        return self._refs.get(text, ())

    def _ref(self, list_text: str, refs: list[tuple[str, str]], key: str) -> str:
        sid = self._ids.get(list_text)
        if sid is None:
            sid = self._old_ids.get(list_text)
            if sid is None:
                sid = set_id(list_text)
            self._ids[list_text] = sid
        if (sid, list_text) not in refs:
            refs.append((sid, list_text))
        return key + '"' + sid + '"'


SET_MIN = 8   # prefixes in a filter list from which it goes as a prefix set (a reference is ~25 bytes)


def set_id(list_text: str) -> str:
    """A prefix set's id: a hash of its JSON text, so every replica names the same list alike."""
    return hashlib.blake2b(list_text.encode(), digest_size=9).hexdigest()


def _sets_json(refs: Iterable[tuple[str, str]]) -> str:
    return "{" + ",".join(['"' + sid + '":' + text for sid, text in refs]) + "}"


@dataclass
class StreamState:
    """What one open map stream has been sent (so the next frame can be a delta). Only references
    to shared objects: the interned reach set (visible peers plus self), and the JSON texts of self,
    DNS and filter."""

    node_id: int
    seq: int = -1
    compiled: CompiledPolicy | None = None
    reach: frozenset[int] = frozenset()
    filter_text: str = "[]"
    self_text: str | None = None
    dns_text: str | None = None
    domain: str | None = None
    derp_map_text: str = "null"
    ca_pem: str = ""
    tka_head: str | None = None
    flow_logs: bool = False
    tailnet_version: int = -1   # of the resume token the node was last sent
    patches: bool = False   # the node understands `peers_patch` (it said so when it opened the stream)
    sets: bool = False      # ...and prefix-set references in its filter (`prefix_sets`)
    filter_sets: tuple[tuple[str, str], ...] = ()   # the sets it holds: those its filter names

    @property
    def full(self) -> bool:
        """The next frame will be a full map."""
        return self.seq < 0


class NodeGone(Exception):
    """The stream's node is no longer in the tailnet (deleted, logged out or expired)."""


def next_frame(snap: Snapshot, state: StreamState) -> str | None:
    """The JSON text of the frame that brings `state` up to `snap` (None: nothing to send).

    The first frame of a stream is a full map, and so is the next one after a stream fell more
    than HISTORY snapshots behind; otherwise a delta. Raises `NodeGone` when the node left the
    tailnet, so the server ends its stream.
    """
    nid = state.node_id
    if nid not in snap.nodes:
        raise NodeGone(nid)
    old_reach = state.reach
    if state.compiled is not snap.compiled:
        reach = snap.reach.of(snap.compiled, nid)
        filter_text = snap.filters.of(snap.compiled, nid, state.sets)
    else:
        reach, filter_text = old_reach, state.filter_text
    texts = snap.node_text
    if state.seq < 0 or state.seq < snap.history[0][0] - 1:
        frame: str | None = "".join([
            '{"type":"full","netmap":{"version":', str(snap.version), ',"domain":', _dumps(snap.domain),
            ',"self":', texts[nid], ',"peers":[', ",".join([texts[p] for p in sorted(reach) if p != nid]),
            '],"dns":', snap.dns_text, ',"packet_filter":', filter_text, ',"derp":{},"derp_map":',
            snap.derp_map_text, (',"tailnet_ca":' + _dumps(snap.ca_pem)) if snap.ca_pem else "",
            ',"tka_head":', _dumps(snap.tka_head), ',"flow_logs":', _dumps(snap.flow_logs), '},"resume":',
            _json_str(snap.resume_token(nid)), _sets_part(snap, state, filter_text, ()), '}'])
        state.tailnet_version = snap.tailnet_version
    else:
        since: set[int] = set()
        for seq, changed_ids, _removed in reversed(snap.history):   # newest first: most streams are one behind
            if seq <= state.seq:
                break
            since |= changed_ids
        removed: frozenset[int] | set[int] = frozenset()
        added: frozenset[int] = frozenset()
        if reach is old_reach:
            changed = since & reach
        else:
            added, removed = snap.reach.diff(old_reach, reach)
            changed = set(added)
            changed |= since & reach
        changed.discard(nid)
        patched: list[str] = []
        if state.patches and state.seq == snap.seq - 1 and snap.patches:
            # One snapshot behind: the node holds each changed peer exactly as snapshot seq-1 had it.
            fresh = changed - added
            for p in sorted(fresh & snap.patches.keys()):
                patched.append(snap.patches[p])
                changed.discard(p)
        parts = ['{"type":"delta","version":', str(snap.version)]
        if snap.domain != state.domain:
            parts += [',"domain":', _dumps(snap.domain)]
        if texts[nid] is not state.self_text:
            parts += [',"self":', texts[nid]]
        if changed:
            parts += [',"peers_changed":[', ",".join([texts[p] for p in sorted(changed)]), "]"]
        if patched:
            parts += [',"peers_patch":[', ",".join(patched), "]"]
        if removed:
            parts += [',"peers_removed":', _dumps(sorted(removed))]
        if snap.dns_text != state.dns_text:
            parts += [',"dns":', snap.dns_text]
        if filter_text != state.filter_text:
            parts += [',"packet_filter":', filter_text, _sets_part(snap, state, filter_text, state.filter_sets)]
        if snap.derp_map_text != state.derp_map_text:
            parts += [',"derp_map":', snap.derp_map_text]
        if snap.ca_pem != state.ca_pem:
            parts += [',"tailnet_ca":', _dumps(snap.ca_pem)]
        if snap.tka_head != state.tka_head:
            parts += [',"tka_head":', _dumps(snap.tka_head)]
        if snap.flow_logs != state.flow_logs:
            parts += [',"flow_logs":', _dumps(snap.flow_logs)]
        frame = None
        if len(parts) > 2:
            # A new resume token rides along only on a frame sent anyway: a node whose map did not
            # change keeps its older (still true) token rather than getting a frame for it.
            if snap.tailnet_version != state.tailnet_version:
                parts += [',"resume":', _json_str(snap.resume_token(nid))]
                state.tailnet_version = snap.tailnet_version
            frame = "".join(parts) + "}"
    _sent(snap, state, reach, filter_text)
    return frame


def _sets_part(snap: Snapshot, state: StreamState, filter_text: str, held: tuple[tuple[str, str], ...]) -> str:
    """The `prefix_sets` member for a frame that carries `filter_text`: the sets it names that the
    node does not hold (`held`: what its previous filter named; the node keeps exactly those)."""
    if not state.sets:
        return ""
    refs = snap.filters.refs(filter_text)
    state.filter_sets = refs
    if refs is held:
        return ""
    new = [r for r in refs if r not in held]
    return ',"prefix_sets":' + _sets_json(new) if new else ""


def _sent(snap: Snapshot, state: StreamState, reach: frozenset[int], filter_text: str) -> None:
    """Record in `state` that the node now holds `snap`'s map."""
    nid = state.node_id
    texts = snap.node_text
    state.seq, state.compiled, state.reach, state.filter_text = snap.seq, snap.compiled, reach, filter_text
    state.self_text, state.dns_text, state.domain = texts[nid], snap.dns_text, snap.domain
    state.derp_map_text = snap.derp_map_text
    state.ca_pem = snap.ca_pem
    state.tka_head, state.flow_logs = snap.tka_head, snap.flow_logs


@dataclass(frozen=True, slots=True)
class ResumeToken:
    """What a reconnecting node says it holds: the map of `node_id` at store version `version` of
    the tailnet whose store is `epoch`."""

    epoch: str
    node_id: int
    version: int

    @staticmethod
    def parse(text: object) -> "ResumeToken | None":
        """The token, or None for anything malformed (the node then gets a full map)."""
        if not isinstance(text, str) or len(text) > 100:
            return None
        parts = text.split(".")
        if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
            return None
        return ResumeToken(parts[0], int(parts[1]), int(parts[2]))


def resumable(snap: Snapshot, token: ResumeToken, node_id: int, changes: Iterable[Change]) -> frozenset[int] | None:
    """The nodes whose rows changed between the token's version and `snap`, when `changes` (the
    change log after that version, up to at least `snap.tailnet_version`) tell everything a resuming
    node needs; None when only a full map is safe: another tailnet or node, a version this snapshot
    has not reached, a gap, or a change whose effect on this node's peers is unknowable."""
    if token.epoch != snap.epoch or token.node_id != node_id or token.version > snap.tailnet_version:
        return None
    ids: set[int] = set()
    last = token.version
    for change in changes:
        if change.version != last + 1:
            return None   # a hole: never guess what it held
        last = change.version
        actions = {action for action, _target in change.items}
        if not actions <= RESUMABLE_ACTIONS:
            return None
        if node_id in change.nodes and actions & SELF_REACH_ACTIONS:
            return None
        ids.update(change.nodes)
    if last < snap.tailnet_version:
        return None
    return frozenset(ids)


def resume_frame(snap: Snapshot, state: StreamState, changed_nodes: frozenset[int]) -> str:
    """The first frame of a resumed stream, as a delta: the peers in `changed_nodes` (from
    `resumable`) again, or as removed when this node no longer sees them; everything that is not a
    peer (self, DNS, filter, relay map, CA, lock head) in full, since it is small; and the ids of all
    peers it sees (`peers_present`, so it drops any that left unlogged, e.g. by key expiry) and of
    those online (`peers_online`: presence is not in the change log). Raises `NodeGone`."""
    nid = state.node_id
    if nid not in snap.nodes:
        raise NodeGone(nid)
    reach = snap.reach.of(snap.compiled, nid)
    filter_text = snap.filters.of(snap.compiled, nid, state.sets)
    texts = snap.node_text
    changed = sorted(p for p in changed_nodes & reach if p != nid)
    removed = sorted(changed_nodes - reach)
    present = sorted(p for p in reach if p != nid)
    online = [p for p in present if snap.nodes[p].online]
    parts = ['{"type":"delta","version":', str(snap.version), ',"resume":', _json_str(snap.resume_token(nid)),
             ',"domain":', _dumps(snap.domain), ',"self":', texts[nid],
             ',"peers_changed":[', ",".join([texts[p] for p in changed]), '],"peers_removed":', _dumps(removed),
             ',"peers_present":', _dumps(present), ',"peers_online":', _dumps(online),
             ',"dns":', snap.dns_text, ',"packet_filter":', filter_text, _sets_part(snap, state, filter_text, ()),
             ',"derp_map":', snap.derp_map_text,
             ',"tailnet_ca":', _dumps(snap.ca_pem), ',"tka_head":', _dumps(snap.tka_head),
             ',"flow_logs":', _dumps(snap.flow_logs), '}']
    state.tailnet_version = snap.tailnet_version
    _sent(snap, state, reach, filter_text)
    return "".join(parts)
