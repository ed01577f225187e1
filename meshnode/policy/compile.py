"""A policy compiled against a node list: who sees whom, each node's inbound filter, and `allows`.

Compilation resolves every (src, one dst entry) pair of every ACL to node-id sets once, using
indexes by user, tag and sorted address, so a 10,000-node tailnet costs
O(rules x nodes) to compile and O(rules + answer) per query, never a scan of node pairs.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from magicdns.ranges import TAILNET_V4, TAILNET_V6

from .model import (ALL_V4, ALL_V6, IPAddress, IPNetwork, NodeInfo, Policy,
                    PortRange, Selector, SelectorKind)
from .parse import default_policy
from .protocols import PORT_PROTOS
from .rules import FilterRule

_IDENTITY_KINDS = frozenset({SelectorKind.USER, SelectorKind.GROUP, SelectorKind.TAG,
                             SelectorKind.MEMBER, SelectorKind.TAGGED})
_ALL = (ALL_V4, ALL_V6)


@functools.lru_cache(maxsize=1 << 15)
def _host_prefix(address: IPAddress) -> IPNetwork:
    # From the integer: ip_network(address) takes a slower, string-parsing path (~4x). Cached: every
    # policy change asks again for each node's own /32 and /128 (an IPv6Network costs ~10 us).
    if address.version == 4:
        return ipaddress.IPv4Network(int(address))
    return ipaddress.IPv6Network(int(address))


def _in_tailnet(prefix: IPNetwork) -> bool:
    tailnet = TAILNET_V4 if prefix.version == 4 else TAILNET_V6
    return prefix.subnet_of(tailnet)  # type: ignore[arg-type]


def _is_default_route(route: IPNetwork) -> bool:
    return route.prefixlen == 0


@dataclass(frozen=True, slots=True)
class _Grant:
    """One ACL's sources paired with one of its dst entries, resolved to node ids."""

    rule_index: int
    src_nodes: frozenset[int]        # nodes named by identity (their addresses become filter sources)
    src_prefixes: tuple[IPNetwork, ...]  # literal prefixes (IPs, CIDRs, hosts; `*` is 0/0 and ::/0)
    src_seen: frozenset[int]         # src_nodes + nodes inside or routing a src prefix (visibility)
    src_members: frozenset[int]      # src_nodes + nodes with an address inside a src prefix
    dst: Selector
    dst_ident: frozenset[int]        # nodes the dst names by identity
    dst_nodes: frozenset[int]        # every node receiving traffic for this dst (routers, exit nodes)
    ports: tuple[PortRange, ...]
    protos: frozenset[int]


class _NodeIndex:
    """Nodes by id, user, tag, address and route: what makes selector resolution cheap."""

    def __init__(self, nodes: Iterable[NodeInfo]) -> None:
        self.by_id: dict[int, NodeInfo] = {}
        user_nodes: dict[str, set[int]] = {}   # untagged nodes only
        tag_nodes: dict[str, set[int]] = {}
        self.by_address: dict[IPAddress, int] = {}
        self.routes: list[tuple[IPNetwork, int]] = []
        exits: set[int] = set()
        sorted_addresses: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
        for node in nodes:
            if node.id in self.by_id:
                raise ValueError(f"duplicate node id {node.id}")
            self.by_id[node.id] = node
            if node.tags:
                for tag in node.tags:
                    tag_nodes.setdefault(tag, set()).add(node.id)
            else:
                user_nodes.setdefault(node.user, set()).add(node.id)
            for address in node.addresses:
                self.by_address[address] = node.id
                sorted_addresses[address.version].append((int(address), node.id))
            for route in node.approved_routes:
                if _is_default_route(route):
                    exits.add(node.id)
                else:
                    self.routes.append((route, node.id))
            if node.is_exit_node:
                exits.add(node.id)
        # Frozen so answers can share them without a caller's mutation leaking into the index.
        self.user_nodes = {u: frozenset(ids) for u, ids in user_nodes.items()}
        self.tag_nodes = {t: frozenset(ids) for t, ids in tag_nodes.items()}
        self.all = frozenset(self.by_id)
        self.exits = frozenset(exits)
        self.tagged = frozenset(n for ids in self.tag_nodes.values() for n in ids)
        self.members = self.all - self.tagged
        self._keys = {v: [a for a, _ in sorted(lst)] for v, lst in sorted_addresses.items()}
        self._ids = {v: [n for _, n in sorted(lst)] for v, lst in sorted_addresses.items()}
        self._hosts: dict[int, tuple[IPNetwork, ...]] = {}   # filled lazily by host_prefixes
        # autogroup:self sources, collapsed (CompiledPolicy.filter_rules), by what decides them. Kept
        # with the index, which a policy compiled over the same nodes shares: a port added does not
        # collapse every user's addresses again (60-200 ms a replica at 10,000 nodes).
        self.collapsed: dict[tuple, tuple[IPNetwork, ...]] = {}

    def host_prefixes(self, node: NodeInfo) -> tuple[IPNetwork, ...]:
        """The node's addresses as /32 and /128 prefixes (the dst of its own rules), made once per
        index: a policy change reuses the index and so asks for them again at no cost."""
        hit = self._hosts.get(node.id)
        if hit is None:
            hit = self._hosts[node.id] = tuple(_host_prefix(a) for a in node.addresses)
        return hit

    def in_prefix(self, prefix: IPNetwork) -> set[int]:
        """Nodes holding an address inside `prefix` (binary search on sorted addresses)."""
        keys, ids = self._keys[prefix.version], self._ids[prefix.version]
        lo = bisect.bisect_left(keys, int(prefix.network_address))
        hi = bisect.bisect_right(keys, int(prefix.broadcast_address))
        return set(ids[lo:hi])

    def routing(self, prefix: IPNetwork) -> set[int]:
        """Subnet routers with an approved route overlapping `prefix`."""
        return {n for route, n in self.routes if route.version == prefix.version and route.overlaps(prefix)}

    def identity(self, selector: Selector, groups: dict[str, tuple[str, ...]] | None) -> set[int]:
        """Nodes a user/group/tag/autogroup selector names."""
        kind = selector.kind
        if kind is SelectorKind.ANY:
            return set(self.all)
        if kind is SelectorKind.USER:
            return set(self.user_nodes.get(selector.name, ()))
        if kind is SelectorKind.GROUP:
            result: set[int] = set()
            for user in (groups or {}).get(selector.name, ()):
                result |= self.user_nodes.get(user, set())
            return result
        if kind is SelectorKind.TAG:
            return set(self.tag_nodes.get(selector.name, ()))
        if kind is SelectorKind.MEMBER:
            return set(self.members)
        if kind is SelectorKind.TAGGED:
            return set(self.tagged)
        return set()


@dataclass(frozen=True)
class CompiledPolicy:
    """A policy resolved against one node list. Immutable; queries are cached internally."""

    policy: Policy
    _index: _NodeIndex = field(repr=False)
    _grants: tuple[_Grant, ...] = field(repr=False)
    _src_of: dict[int, tuple[int, ...]] = field(repr=False)   # node -> grants it is a source of
    _dst_of: dict[int, tuple[int, ...]] = field(repr=False)   # node -> grants it receives for
    _self_grants: tuple[int, ...] = field(repr=False)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def node_ids(self) -> frozenset[int]:
        """The ids of the nodes this policy was compiled against."""
        return self._index.all

    def _node(self, node_id: int) -> NodeInfo:
        try:
            return self._index.by_id[node_id]
        except KeyError:
            raise KeyError(f"node {node_id} is not in the compiled node list") from None

    def _own_nodes(self, node: NodeInfo) -> frozenset[int]:
        """The user's untagged nodes, for autogroup:self (none for a tagged node)."""
        return frozenset() if node.tags else self._index.user_nodes.get(node.user, frozenset())

    def visible_peers(self, node_id: int) -> frozenset[int]:
        """Peers `node_id` may reach or that may reach it (routers of reachable routes included)."""
        # Not cached: under an allow-all policy each answer holds every node, and 10,000 of them
        # would pin gigabytes; the caller keeps the answers it needs.
        parts = self.visibility_parts(node_id)
        # With one distinct set (the common case of a few broad rules) the answer is that set,
        # shared between nodes instead of copied.
        if len(parts) == 1:
            result = parts[0]
        else:
            result = frozenset().union(*parts)
        if node_id in result:
            result = result - {node_id}
        return result

    def visibility_parts(self, node_id: int) -> tuple[frozenset[int], ...]:
        """The distinct sets whose union, less the node itself, is `visible_peers(node_id)`.

        Most are shared by many nodes (a grant's source or destination set, a user's own devices), so
        a caller that interns the union per combination of parts (mapbuilder.ReachSets) answers a
        whole tailnet with a few unions instead of one 10,000-element copy per node."""
        node = self._node(node_id)
        own = self._own_nodes(node)
        parts: dict[int, frozenset[int]] = {}
        for gi in self._src_of.get(node_id, ()):
            grant = self._grants[gi]
            if grant.dst.kind is SelectorKind.SELF:
                if node_id not in grant.src_members:
                    continue  # seen only as a router of a source prefix: no devices of its own
                part = own
            else:
                part = grant.dst_nodes
            parts[id(part)] = part
        for gi in self._dst_of.get(node_id, ()):
            part = self._grants[gi].src_seen
            parts[id(part)] = part
        if own:
            for gi in self._self_grants:
                key = ("own", gi, node.user)   # one intersection per user, not per device
                part = self._cache.get(key)
                if part is None:
                    part = self._cache[key] = self._grants[gi].src_members & own
                parts[id(part)] = part
        return tuple(parts.values())

    def _src_filter(self, gi: int) -> tuple[IPNetwork, ...]:
        key = ("src", gi)
        cached = self._cache.get(key)
        if cached is None:
            grant = self._grants[gi]
            cached = _collapse(self._addresses(grant.src_nodes), grant.src_prefixes)
            self._cache[key] = cached
        return cached

    def _addresses(self, ids: Iterable[int]) -> list[IPAddress]:
        by_id = self._index.by_id
        return [a for n in ids for a in by_id[n].addresses]

    def _dst_prefixes(self, grant: _Grant, node: NodeInfo) -> list[IPNetwork]:
        kind = grant.dst.kind
        if kind is SelectorKind.ANY:
            return list(_ALL)
        if kind in _IDENTITY_KINDS:
            return list(self._index.host_prefixes(node))
        prefix = grant.dst.prefix
        assert prefix is not None
        result = [_host_prefix(a) for a in node.addresses if a in prefix]
        for route in node.approved_routes:
            if route.version == prefix.version and route.overlaps(prefix) and not _is_default_route(route):
                result.append(prefix if prefix.subnet_of(route) else route)  # type: ignore[arg-type]
        if node.id in self._index.exits and not _in_tailnet(prefix):
            result.append(prefix)
        return result

    def filter_rules(self, node_id: int) -> tuple[FilterRule, ...]:
        """The inbound packet-filter rules of `node_id`: what may arrive at it (or through it)."""
        key = ("filter", node_id)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        node = self._node(node_id)
        gis = self._dst_of.get(node_id, ())
        own = self._own_nodes(node)
        shape = None
        if not (own and self._self_grants) and all(self._grants[gi].dst.kind is SelectorKind.ANY for gi in gis):
            # Only `*` destinations: the rules do not depend on the node, just on which grants it
            # receives for, so nodes with the same grants share one answer (and one JSON text).
            shape = ("filter-shape", gis)
            cached = self._cache.get(shape)
            if cached is not None:
                self._cache[key] = cached
                return cached
        # Dst entries of one ACL with equal ports share sources and protocols: merge them.
        merged: dict[tuple[int, tuple[PortRange, ...]], tuple[tuple[IPNetwork, ...], list[IPNetwork],
                                                             frozenset[int]]] = {}
        for gi in gis:
            grant = self._grants[gi]
            dst = self._dst_prefixes(grant, node)
            src = self._src_filter(gi)
            if dst and src:
                entry = merged.setdefault((grant.rule_index, grant.ports), (src, [], grant.protos))
                entry[1].extend(dst)
        rules = [FilterRule(src, tuple(dict.fromkeys(dst)), ports, tuple(sorted(protos)))
                 for (_, ports), (src, dst, protos) in merged.items()]
        if own:
            for gi in self._self_grants:
                grant = self._grants[gi]
                # Every device of a user gets the same sources: computed once per user.
                skey = ("self", gi, node.user)
                sources = self._cache.get(skey)
                if sources is None:
                    # `_self_sources` depends on exactly these (and the index's addresses).
                    ckey = (grant.src_members & own, grant.src_nodes & own, grant.src_prefixes)
                    collapsed = self._index.collapsed
                    sources = collapsed.get(ckey)
                    if sources is None:
                        if len(collapsed) >= 65_536:   # policies of many shapes over one index
                            collapsed.clear()
                        sources = collapsed[ckey] = _collapse(self._self_sources(grant, own), ())
                    self._cache[skey] = sources
                if sources:
                    pkey = ("protos", gi)   # one tuple per grant, shared by its nodes' rules
                    protos = self._cache.get(pkey)
                    if protos is None:
                        protos = self._cache[pkey] = tuple(sorted(grant.protos))
                    rules.append(FilterRule(sources, self._index.host_prefixes(node), grant.ports, protos))
        result = tuple(rules)
        self._cache[key] = result
        if shape is not None:
            self._cache[shape] = result
        return result

    def filter_rules_json(self, node_id: int) -> list[dict]:
        """`rules_to_json(filter_rules(node_id))`, with each rule's text cached: at 10,000 nodes the
        same few source lists are sent to many nodes, and formatting prefixes dominates the cost."""
        out = []
        for rule in self.filter_rules(node_id):
            key = ("json", id(rule.src))
            src = self._cache.get(key)
            if src is None or src[0] is not rule.src:
                src = (rule.src, [str(p) for p in rule.src])
                self._cache[key] = src
            out.append({"src": src[1], "dst": [str(p) for p in rule.dst],
                        "ports": ",".join(str(r) for r in rule.ports),
                        "protos": [int(p) for p in rule.protos]})
        return out

    def _self_sources(self, grant: _Grant, own: frozenset[int]) -> list[IPAddress]:
        """Addresses of the user's own nodes that the grant's sources name (by identity or prefix)."""
        result = []
        for n in sorted(grant.src_members & own):
            named = n in grant.src_nodes
            for a in self._index.by_id[n].addresses:
                if named or any(a in p for p in grant.src_prefixes):
                    result.append(a)
        return result

    def allows(self, src_ip: IPAddress | str, dst_ip: IPAddress | str, proto: int, port: int) -> bool:
        """Whether the policy lets `src_ip` send `proto` traffic to `dst_ip` (at `port` if it has ports)."""
        src = ipaddress.ip_address(src_ip) if isinstance(src_ip, str) else src_ip
        dst = ipaddress.ip_address(dst_ip) if isinstance(dst_ip, str) else dst_ip
        by_address = self._index.by_address
        src_node = by_address.get(src)
        dst_node = by_address.get(dst)
        check_port = proto in PORT_PROTOS
        for grant in self._grants:
            if proto not in grant.protos:
                continue
            if check_port and not any(r.first <= port <= r.last for r in grant.ports):
                continue
            if not ((src_node is not None and src_node in grant.src_nodes)
                    or any(src in p for p in grant.src_prefixes)):
                continue
            if self._dst_matches(grant, src_node, dst, dst_node):
                return True
        return False

    def _dst_matches(self, grant: _Grant, src_node: int | None, dst: IPAddress,
                     dst_node: int | None) -> bool:
        kind = grant.dst.kind
        if kind is SelectorKind.ANY:
            return True
        if kind is SelectorKind.SELF:
            # The source address already matched the grant's sources; self pairs it with the
            # same user's untagged nodes.
            if src_node is None or dst_node is None:
                return False
            s, d = self._index.by_id[src_node], self._index.by_id[dst_node]
            return not s.tags and not d.tags and s.user == d.user
        if kind in _IDENTITY_KINDS:
            return dst_node is not None and dst_node in grant.dst_ident
        assert grant.dst.prefix is not None
        return dst in grant.dst.prefix


def _collapse(addresses: Sequence[IPAddress], prefixes: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """Addresses and prefixes merged into the fewest covering prefixes, IPv4 first.

    Merging integer ranges first (ipaddress.collapse_addresses is ~25x slower on 10,000 addresses)
    keeps the cost of a rule whose sources are every member of a large tailnet small.
    """
    spans: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    singles: dict[int, IPAddress] = {}   # a lone address comes back as its cached host prefix
    prefixes = tuple(prefixes)
    # A whole address family (`*`) covers every address in it: skip them (20,000 under `src: ["*"]`).
    whole = {p.version for p in prefixes if p.prefixlen == 0}
    for a in addresses if len(whole) < 2 else ():
        if a.version in whole:
            continue
        value = int(a)
        spans[a.version].append((value, value))
        singles[value] = a
    for p in prefixes:
        spans[p.version].append((int(p.network_address), int(p.broadcast_address)))
    result: list[IPNetwork] = []
    for version, ranges in sorted(spans.items()):
        ranges.sort()
        merged: list[list[int]] = []
        for first, last in ranges:
            if merged and first <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], last)
            else:
                merged.append([first, last])
        make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        make_host = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
        for first, last in merged:
            if first == last:
                single = singles.get(first)
                result.append(_host_prefix(single) if single is not None and single.version == version
                              else make_host(first))
            else:
                result.extend(ipaddress.summarize_address_range(make(first), make(last)))
    return tuple(result)


def _resolve_src(index: _NodeIndex, selectors: Sequence[Selector], groups: dict[str, tuple[str, ...]]
                 ) -> tuple[frozenset[int], tuple[IPNetwork, ...], frozenset[int], frozenset[int]]:
    nodes: set[int] = set()
    prefixes: list[IPNetwork] = []
    seen: set[int] = set()
    inside: set[int] = set()
    for selector in selectors:
        if selector.kind is SelectorKind.ANY:
            nodes |= index.all
            prefixes.extend(_ALL)
        elif selector.prefix is not None:
            prefixes.append(selector.prefix)
            # Traffic from a subnet behind a router arrives through that router, so both must see it.
            inside |= index.in_prefix(selector.prefix)
            seen |= index.routing(selector.prefix)
        else:
            nodes |= index.identity(selector, groups)
    unique = tuple(dict.fromkeys(prefixes))
    if any(s.kind is SelectorKind.ANY for s in selectors):
        return index.all, unique, index.all, index.all  # shared, not copied
    frozen = frozenset(nodes)
    members = frozen | inside if inside - frozen else frozen
    seen = members | seen if seen - members else members
    return frozen, unique, seen, members


def _resolve_dst(index: _NodeIndex, selector: Selector, groups: dict[str, tuple[str, ...]]
                 ) -> tuple[frozenset[int], frozenset[int]]:
    kind = selector.kind
    if kind is SelectorKind.SELF:
        return frozenset(), frozenset()
    if kind is SelectorKind.ANY:
        return index.all, index.all
    if kind in _IDENTITY_KINDS:
        ident = frozenset(index.identity(selector, groups))
        return ident, ident
    prefix = selector.prefix
    assert prefix is not None
    receivers = index.in_prefix(prefix) | index.routing(prefix)
    if not _in_tailnet(prefix):
        receivers |= index.exits
    return frozenset(), frozenset(receivers)


def compile_policy(policy: Policy | None, nodes: Iterable[NodeInfo],
                   same_nodes_as: CompiledPolicy | None = None) -> CompiledPolicy:
    """Resolve `policy` (None: the default allow-all policy) against `nodes` for fast queries.

    `same_nodes_as`: an earlier compilation against exactly these nodes (the caller vouches for it):
    its node index is reused, which is most of the cost of a policy change at 10,000 nodes."""
    if policy is None:
        policy = default_policy()
    index = same_nodes_as._index if same_nodes_as is not None else _NodeIndex(nodes)
    groups = dict(policy.groups)
    grants: list[_Grant] = []
    for ri, rule in enumerate(policy.acls):
        src_nodes, src_prefixes, src_seen, src_members = _resolve_src(index, rule.src, groups)
        for entry in rule.dst:
            dst_ident, dst_nodes = _resolve_dst(index, entry.selector, groups)
            grants.append(_Grant(ri, src_nodes, src_prefixes, src_seen, src_members, entry.selector, dst_ident,
                                 dst_nodes, entry.ports, frozenset(rule.protos)))
    src_of: dict[int, list[int]] = {}
    dst_of: dict[int, list[int]] = {}
    self_grants = []
    for gi, grant in enumerate(grants):
        for n in grant.src_seen:
            src_of.setdefault(n, []).append(gi)
        for n in grant.dst_nodes:
            dst_of.setdefault(n, []).append(gi)
        if grant.dst.kind is SelectorKind.SELF:
            self_grants.append(gi)
    return CompiledPolicy(policy, index, tuple(grants), {n: tuple(g) for n, g in src_of.items()},
                          {n: tuple(g) for n, g in dst_of.items()}, tuple(self_grants))
