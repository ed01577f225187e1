"""Random policies from a small grammar: the compiled evaluator agrees with a naive reference
evaluator written here from the raw policy document, and the packet filter built from a node's
filter rules agrees with `allows` for traffic arriving at that node."""

from __future__ import annotations

import ipaddress
import json
import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnode.policy import NodeInfo, PacketFilter, compile_policy, parse_policy

USERS = ["u1@x", "u2@x", "u3@x"]
TAGS = ["tag:a", "tag:b"]
ROUTE = "10.0.0.0/24"


def _node(i: int, user: str, tags: tuple[str, ...] = (), routes: tuple[str, ...] = ()) -> NodeInfo:
    return NodeInfo(i, f"n{i}", user, tags,
                    (ipaddress.ip_address(f"100.64.0.{i}"), ipaddress.ip_address(f"fd7a:115c:a1e0::{i}")),
                    tuple(ipaddress.ip_network(r) for r in routes))


NODES = [_node(1, "u1@x"), _node(2, "u1@x"), _node(3, "u2@x"), _node(4, "u3@x", ("tag:a",)),
         _node(5, "u2@x", ("tag:a", "tag:b")), _node(6, "u3@x", ("tag:b",), (ROUTE,))]
NODE_BY_IP = {str(a): n for n in NODES for a in n.addresses}
IPS = [str(a) for n in NODES for a in n.addresses] + ["10.0.0.5", "8.8.8.8", "fd00::1"]

SELECTORS = (["*", "autogroup:member", "autogroup:tagged", "h1", "h2", "100.64.0.3", "100.64.0.0/30",
              "fd7a:115c:a1e0::5", "group:g1", "group:g2"] + USERS + TAGS)
DST_SELECTORS = SELECTORS + ["autogroup:self", ROUTE, "10.0.0.4/30", "8.8.8.8"]
PORTS = ["*", "22", "80,443", "1000-2000", "443-443"]
PROTOS = [None, "tcp", "udp", "icmp"]
DEFAULT = {6, 17, 1, 58}
PROTO_SETS = {None: DEFAULT, "tcp": {6}, "udp": {17}, "icmp": {1, 58}}


@st.composite
def documents(draw: Any) -> dict[str, Any]:
    acls = []
    for _ in range(draw(st.integers(0, 3))):
        proto = draw(st.sampled_from(PROTOS))
        ports = st.just("*") if proto == "icmp" else st.sampled_from(PORTS)
        rule = {"action": "accept",
                "src": draw(st.lists(st.sampled_from(SELECTORS), min_size=1, max_size=3)),
                "dst": [f"{sel}:{draw(ports)}" for sel in
                        draw(st.lists(st.sampled_from(DST_SELECTORS), min_size=1, max_size=3))]}
        if proto:
            rule["proto"] = proto
        acls.append(rule)
    return {
        "groups": {"group:g1": draw(st.lists(st.sampled_from(USERS), max_size=3)),
                   "group:g2": draw(st.lists(st.sampled_from(USERS), max_size=3))},
        "hosts": {"h1": draw(st.sampled_from(["100.64.0.2", "100.64.0.4/31", "10.0.0.5"])),
                  "h2": draw(st.sampled_from(["fd7a:115c:a1e0::/120", "8.8.0.0/16"]))},
        "tagOwners": {"tag:a": [], "tag:b": []},
        "acls": acls,
    }


# The reference: every selector answered by brute force over the node list and the raw document.

def _ref_in_prefix(ip: str, text: str) -> bool:
    addr = ipaddress.ip_address(ip)
    prefix = ipaddress.ip_network(text)
    return addr.version == prefix.version and addr in prefix


def _ref_names(doc: dict[str, Any], selector: str, ip: str) -> bool:
    node = NODE_BY_IP.get(ip)
    user = node.user if node is not None and not node.tags else None
    if selector == "*":
        return True
    if selector == "autogroup:member":
        return user is not None
    if selector == "autogroup:tagged":
        return node is not None and bool(node.tags)
    if selector.startswith("group:"):
        return user is not None and user in doc["groups"][selector]
    if selector.startswith("tag:"):
        return node is not None and selector in node.tags
    if "@" in selector:
        return user == selector
    if selector in doc["hosts"]:
        return _ref_in_prefix(ip, doc["hosts"][selector])
    return _ref_in_prefix(ip, selector)


def _ref_ports(text: str, port: int) -> bool:
    if text == "*":
        return True
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if int(lo) <= port <= int(hi or lo):
            return True
    return False


def reference_allows(doc: dict[str, Any], src: str, dst: str, proto: int, port: int) -> bool:
    for rule in doc["acls"]:
        if proto not in PROTO_SETS[rule.get("proto")]:
            continue
        if not any(_ref_names(doc, s, src) for s in rule["src"]):
            continue
        for entry in rule["dst"]:
            selector, _, ports = entry.rpartition(":")
            if proto in (6, 17) and not _ref_ports(ports, port):
                continue
            if selector == "autogroup:self":
                s_node, d_node = NODE_BY_IP.get(src), NODE_BY_IP.get(dst)
                if (s_node and d_node and not s_node.tags and not d_node.tags
                        and s_node.user == d_node.user):
                    return True
            elif _ref_names(doc, selector, dst):
                return True
    return False


queries = st.tuples(st.sampled_from(IPS), st.sampled_from(IPS), st.sampled_from([6, 17, 1, 58, 47]),
                    st.sampled_from([22, 80, 443, 1500, 3000]))


@given(documents(), st.lists(queries, min_size=1, max_size=30))
@settings(max_examples=300, deadline=None)
def test_allows_agrees_with_reference(doc: dict[str, Any], qs: list[tuple[str, str, int, int]]) -> None:
    compiled = compile_policy(parse_policy(json.dumps(doc)), NODES)
    for src, dst, proto, port in qs:
        expected = reference_allows(doc, src, dst, proto, port)
        assert compiled.allows(src, dst, proto, port) == expected, (src, dst, proto, port)


def _packet(src: str, dst: str, proto: int, port: int) -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if proto in (6, 17):
        payload = struct.pack("!HHHH", 40000, port, 8, 0) + b"\0" * 12
    elif proto in (1, 58):
        payload = struct.pack("!BBHHH", 8 if proto == 1 else 128, 0, 0, 1, 1)
    else:
        payload = b"\0" * 8
    if s.version == 4:
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                           s.packed, d.packed) + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64, s.packed, d.packed) + payload


@given(documents(), st.lists(queries, min_size=1, max_size=30))
@settings(max_examples=300, deadline=None)
def test_node_filters_and_visibility_agree_with_allows(doc: dict[str, Any],
                                                      qs: list[tuple[str, str, int, int]]) -> None:
    compiled = compile_policy(parse_policy(json.dumps(doc)), NODES)
    filters = {n.id: PacketFilter(compiled.filter_rules(n.id)) for n in NODES}
    router = NODES[5]
    for src, dst, proto, port in qs:
        if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
            continue
        allowed = compiled.allows(src, dst, proto, port)
        receiver = NODE_BY_IP.get(dst) or (router if _ref_in_prefix(dst, ROUTE) else None)
        if receiver is not None:
            got = filters[receiver.id].check(_packet(src, dst, proto, port), 0.0)
            assert got == allowed, (src, dst, proto, port, compiled.filter_rules(receiver.id))
        sender = NODE_BY_IP.get(src)
        if allowed and sender is not None and receiver is not None and sender is not receiver:
            assert receiver.id in compiled.visible_peers(sender.id)
            assert sender.id in compiled.visible_peers(receiver.id)
