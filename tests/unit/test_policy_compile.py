"""Evaluating a policy against nodes: selectors, autogroups, hosts, ports, visibility, filter rules."""

from __future__ import annotations

import ipaddress
import json

import pytest

from meshnode.policy import (IPProto, NodeInfo, PortRange, compile_policy, parse_policy,
                             rules_from_json, rules_to_json)
from meshnode.policy.errors import PolicyValidationError

TCP, UDP, ICMP, ICMPV6, GRE = 6, 17, 1, 58, 47
net = ipaddress.ip_network


def node(id: int, user: str, tags: tuple[str, ...] = (), routes: tuple[str, ...] = (),
         exit: bool = False) -> NodeInfo:
    return NodeInfo(id, f"n{id}", user, tags,
                    (ipaddress.ip_address(f"100.64.0.{id}"), ipaddress.ip_address(f"fd7a:115c:a1e0::{id}")),
                    tuple(net(r) for r in routes), exit)


ALICE_LAPTOP, ALICE_PHONE, BOB, CAROL, SERVER, ROUTER, CI, DAVE = 1, 2, 3, 4, 5, 6, 7, 8
NODES = [
    node(ALICE_LAPTOP, "alice@example.com"),
    node(ALICE_PHONE, "alice@example.com"),
    node(BOB, "bob@example.com"),
    node(CAROL, "carol@example.com"),
    node(SERVER, "alice@example.com", ("tag:server",)),
    node(ROUTER, "alice@example.com", ("tag:router",), ("192.168.1.0/24",), exit=True),
    node(CI, "bob@example.com", ("tag:ci",)),
    node(DAVE, "dave@example.com"),
]


def ip(id: int, v6: bool = False) -> str:
    return f"fd7a:115c:a1e0::{id}" if v6 else f"100.64.0.{id}"


HEADER = """
  "groups": {"group:dev": ["bob@example.com", "carol@example.com"]},
  "hosts": {"lan": "192.168.1.0/24", "srv": "100.64.0.5", "outside": "8.8.8.0/24"},
  "tagOwners": {"tag:server": [], "tag:router": [], "tag:ci": []},
"""


def compiled(*acls: str, nodes: list[NodeInfo] = NODES):
    text = "{" + HEADER + '"acls": [' + ",".join(acls) + "]}"
    return compile_policy(parse_policy(text), nodes)


def acl(src: str, dst: str, proto: str = "") -> str:
    extra = f', "proto": "{proto}"' if proto else ""
    return f'{{"action": "accept", "src": [{src}], "dst": [{dst}]{extra}}}'


@pytest.mark.parametrize("src, allowed, denied", [
    ('"*"', [ALICE_LAPTOP, BOB, SERVER, CI], []),
    ('"bob@example.com"', [BOB], [ALICE_LAPTOP, CI, CAROL]),   # CI is bob's but tagged
    ('"group:dev"', [BOB, CAROL], [ALICE_LAPTOP, DAVE, CI]),
    ('"tag:ci"', [CI], [BOB, SERVER]),
    ('"autogroup:member"', [ALICE_LAPTOP, BOB, CAROL, DAVE], [SERVER, CI, ROUTER]),
    ('"autogroup:tagged"', [SERVER, CI, ROUTER], [ALICE_LAPTOP, BOB]),
    ('"srv"', [SERVER], [BOB]),
    ('"100.64.0.3"', [BOB], [CAROL]),
    ('"100.64.0.0/30"', [ALICE_LAPTOP, ALICE_PHONE, BOB], [CAROL]),
])
def test_src_selectors(src: str, allowed: list[int], denied: list[int]) -> None:
    policy = compiled(acl(src, '"tag:server:22"'))
    for n in allowed:
        assert policy.allows(ip(n), ip(SERVER), TCP, 22), n
    for n in denied:
        assert not policy.allows(ip(n), ip(SERVER), TCP, 22), n


def test_prefix_src_is_family_specific_and_identities_cover_both() -> None:
    policy = compiled(acl('"100.64.0.3"', '"tag:server:22"'), acl('"carol@example.com"', '"tag:server:22"'))
    assert not policy.allows(ip(BOB, v6=True), ip(SERVER, v6=True), TCP, 22)
    assert policy.allows(ip(CAROL, v6=True), ip(SERVER, v6=True), TCP, 22)


@pytest.mark.parametrize("dst, allowed, denied", [
    ('"*:22"', [SERVER, ALICE_LAPTOP, "192.168.1.7", "1.1.1.1"], []),
    ('"alice@example.com:22"', [ALICE_LAPTOP, ALICE_PHONE], [SERVER, BOB]),
    ('"group:dev:22"', [BOB, CAROL], [DAVE]),
    ('"tag:server:22"', [SERVER], [ROUTER, ALICE_LAPTOP]),
    ('"autogroup:member:22"', [ALICE_LAPTOP, DAVE], [SERVER]),
    ('"autogroup:tagged:22"', [SERVER, CI], [DAVE]),
    ('"srv:22"', [SERVER], [ROUTER]),
    ('"lan:22"', ["192.168.1.7"], ["192.168.2.7", ROUTER]),
    ('"100.64.0.8:22"', [DAVE], [CAROL]),
])
def test_dst_selectors(dst: str, allowed: list, denied: list) -> None:
    policy = compiled(acl('"bob@example.com"', dst))
    for d in allowed:
        assert policy.allows(ip(BOB), ip(d) if isinstance(d, int) else d, TCP, 22), d
    for d in denied:
        assert not policy.allows(ip(BOB), ip(d) if isinstance(d, int) else d, TCP, 22), d


def test_autogroup_self_pairs_each_user_with_own_untagged_devices() -> None:
    policy = compiled(acl('"autogroup:member"', '"autogroup:self:*"'))
    assert policy.allows(ip(ALICE_LAPTOP), ip(ALICE_PHONE), TCP, 5000)
    assert policy.allows(ip(ALICE_PHONE, v6=True), ip(ALICE_LAPTOP, v6=True), UDP, 53)
    assert not policy.allows(ip(ALICE_LAPTOP), ip(SERVER), TCP, 22)      # alice's, but tagged
    assert not policy.allows(ip(BOB), ip(ALICE_LAPTOP), TCP, 22)
    assert not policy.allows(ip(CI), ip(BOB), TCP, 22)                   # bob's, but tagged
    assert policy.visible_peers(ALICE_LAPTOP) == {ALICE_PHONE}
    assert policy.visible_peers(BOB) == frozenset()
    assert policy.visible_peers(SERVER) == frozenset()
    (rule,) = policy.filter_rules(ALICE_PHONE)
    assert set(rule.src) == {net(f"{ip(ALICE_LAPTOP)}/32"), net(f"{ip(ALICE_PHONE)}/32"),
                             net(f"{ip(ALICE_LAPTOP, True)}/128"), net(f"{ip(ALICE_PHONE, True)}/128")}
    assert set(rule.dst) == {net(f"{ip(ALICE_PHONE)}/32"), net(f"{ip(ALICE_PHONE, True)}/128")}
    (own,) = policy.filter_rules(BOB)   # a user's only device still "reaches itself"
    assert set(own.src) == set(own.dst) == {net(f"{ip(BOB)}/32"), net(f"{ip(BOB, True)}/128")}
    assert policy.filter_rules(SERVER) == ()


def test_ports_and_protocols() -> None:
    policy = compiled(acl('"group:dev"', '"tag:server:22,80-90"'), acl('"*"', '"srv:*"', "icmp"))
    assert policy.allows(ip(BOB), ip(SERVER), TCP, 22)
    assert policy.allows(ip(BOB), ip(SERVER), UDP, 85)
    assert not policy.allows(ip(BOB), ip(SERVER), TCP, 23)
    assert not policy.allows(ip(BOB), ip(SERVER), TCP, 91)
    assert not policy.allows(ip(BOB), ip(SERVER), GRE, 0)
    assert policy.allows(ip(DAVE), ip(SERVER), ICMP, 0)      # the ICMP rule
    assert not policy.allows(ip(DAVE), ip(SERVER), TCP, 22)
    # ICMP has no ports: a port-limited rule with the default protocols lets ping through.
    assert policy.allows(ip(BOB), ip(SERVER, True), ICMPV6, 12345)


def test_visibility_goes_both_ways_and_hides_the_rest() -> None:
    policy = compiled(acl('"group:dev"', '"tag:server:22"'))
    assert policy.visible_peers(BOB) == {SERVER}
    assert policy.visible_peers(CAROL) == {SERVER}
    assert policy.visible_peers(SERVER) == {BOB, CAROL}       # may be reached by them
    assert policy.visible_peers(ALICE_LAPTOP) == frozenset()
    assert policy.visible_peers(DAVE) == frozenset()


def test_subnet_router_is_visible_to_those_reaching_its_routes() -> None:
    policy = compiled(acl('"tag:ci"', '"lan:8000-8999"'))
    assert policy.visible_peers(CI) == {ROUTER}
    assert policy.visible_peers(ROUTER) == {CI}
    assert policy.allows(ip(CI), "192.168.1.20", TCP, 8080)
    assert not policy.allows(ip(CI), ip(ROUTER), TCP, 8080)   # the router itself is not the LAN
    (rule,) = policy.filter_rules(ROUTER)
    assert rule.dst == (net("192.168.1.0/24"),)
    assert set(rule.src) == {net(f"{ip(CI)}/32"), net(f"{ip(CI, True)}/128")}
    assert rule.ports == (PortRange(8000, 8999),)


def test_narrower_dst_inside_a_route_reaches_the_router_with_that_prefix() -> None:
    policy = compiled(acl('"bob@example.com"', '"192.168.1.128/25:443"'))
    assert policy.visible_peers(BOB) == {ROUTER}
    assert policy.filter_rules(ROUTER)[0].dst == (net("192.168.1.128/25"),)


def test_src_behind_a_subnet_router_makes_the_router_visible() -> None:
    policy = compiled(acl('"lan"', '"tag:server:22"'))
    assert policy.visible_peers(SERVER) == {ROUTER}
    assert policy.allows("192.168.1.9", ip(SERVER), TCP, 22)
    (rule,) = policy.filter_rules(SERVER)
    assert rule.src == (net("192.168.1.0/24"),)


def test_exit_node_is_visible_for_internet_destinations() -> None:
    policy = compiled(acl('"dave@example.com"', '"outside:53"'))
    assert policy.visible_peers(DAVE) == {ROUTER}
    (rule,) = policy.filter_rules(ROUTER)
    assert rule.dst == (net("8.8.8.0/24"),)
    everything = compiled(acl('"dave@example.com"', '"*:*"'))
    assert ROUTER in everything.visible_peers(DAVE)
    assert {net("0.0.0.0/0"), net("::/0")} <= set(everything.filter_rules(ROUTER)[0].dst)


def test_filter_rules_hold_only_what_arrives_at_the_node() -> None:
    policy = compiled(acl('"group:dev"', '"tag:server:22", "tag:server:443", "dave@example.com:80"'))
    rules = policy.filter_rules(SERVER)
    assert len(rules) == 2
    by_ports = {r.ports: r for r in rules}
    rule22 = by_ports[(PortRange(22, 22),)]
    assert set(rule22.dst) == {net("100.64.0.5/32"), net("fd7a:115c:a1e0::5/128")}
    assert set(rule22.src) == {net("100.64.0.3/32"), net("100.64.0.4/32"), net("fd7a:115c:a1e0::3/128"),
                               net("fd7a:115c:a1e0::4/128")}  # bob and carol
    assert set(rule22.protos) == {TCP, UDP, ICMP, ICMPV6}
    assert policy.filter_rules(BOB) == ()
    (to_dave,) = policy.filter_rules(DAVE)
    assert to_dave.ports == (PortRange(80, 80),)


def test_wildcard_src_is_sent_as_default_routes() -> None:
    policy = compiled(acl('"*"', '"srv:22"'))
    (rule,) = policy.filter_rules(SERVER)
    assert rule.src == (net("0.0.0.0/0"), net("::/0"))
    assert policy.visible_peers(SERVER) == frozenset(range(1, 9)) - {SERVER}


def test_no_policy_allows_all_and_empty_policy_denies_all() -> None:
    everything = compile_policy(None, NODES)
    assert everything.visible_peers(BOB) == frozenset(range(1, 9)) - {BOB}
    assert everything.allows(ip(BOB), ip(DAVE), TCP, 1)
    nothing = compile_policy(parse_policy("{}"), NODES)
    assert nothing.visible_peers(BOB) == frozenset()
    assert nothing.filter_rules(BOB) == ()
    assert not nothing.allows(ip(BOB), ip(DAVE), TCP, 1)


def test_unknown_node_is_a_key_error() -> None:
    policy = compiled(acl('"*"', '"*:*"'))
    with pytest.raises(KeyError):
        policy.visible_peers(999)
    with pytest.raises(KeyError):
        policy.filter_rules(999)


def test_duplicate_node_ids_are_refused() -> None:
    with pytest.raises(ValueError):
        compile_policy(None, [node(1, "a@b"), node(1, "c@d")])


def test_filter_rules_round_trip_through_json() -> None:
    policy = compiled(acl('"group:dev", "lan"', '"tag:server:22,80-90"', "tcp"))
    rules = policy.filter_rules(SERVER)
    wire = json.loads(json.dumps(rules_to_json(rules)))
    assert rules_from_json(wire) == rules
    assert wire[0]["ports"] == "22,80-90" and wire[0]["protos"] == [TCP]


@pytest.mark.parametrize("bad", [
    {"src": ["1.2.3.4/32"], "dst": [], "ports": "22"},
    {"src": ["1.2.3.4/33"], "dst": [], "ports": "22", "protos": [6]},
    {"src": "1.2.3.4/32", "dst": [], "ports": "22", "protos": [6]},
    {"src": [], "dst": [], "ports": "x", "protos": [6]},
    {"src": [], "dst": [], "ports": "22", "protos": [256]},
    {"src": [], "dst": [], "ports": "22", "protos": [True]},
    [],
])
def test_malformed_json_rules_are_refused(bad: object) -> None:
    with pytest.raises(PolicyValidationError) as info:
        rules_from_json([bad])
    assert "filter rules[0]" in str(info.value)


def test_large_tailnet_compiles_with_sensible_answers() -> None:
    """10,000 nodes (timing is in the report, not asserted): members reach servers and themselves."""
    many = [NodeInfo(i, f"n{i}", f"u{i % 500}@x", ("tag:server",) if i % 100 == 0 else (),
                     (ipaddress.IPv4Address(0x64400000 + i + 1),), (), False) for i in range(10000)]
    policy = compile_policy(parse_policy(
        '{"tagOwners": {"tag:server": []}, "acls": ['
        '{"action": "accept", "src": ["autogroup:member"], "dst": ["tag:server:443"]},'
        '{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}'), many)
    assert policy.visible_peers(1) == frozenset(range(0, 10000, 100)) | (frozenset(range(1, 10000, 500)) - {1})
    assert len(policy.visible_peers(0)) == 9900
    (rule,) = policy.filter_rules(0)
    assert len(rule.src) < 1000  # 9,900 member addresses collapse into ranges between the servers
    assert policy.allows(ipaddress.IPv4Address(0x64400000 + 2), ipaddress.IPv4Address(0x64400000 + 1), IPProto.TCP, 443)


def test_autogroup_self_with_an_address_source_pairs_that_device_with_its_siblings() -> None:
    policy = compiled(acl(f'"{ip(ALICE_LAPTOP)}"', '"autogroup:self:22"'))
    assert policy.allows(ip(ALICE_LAPTOP), ip(ALICE_PHONE), TCP, 22)
    assert not policy.allows(ip(ALICE_PHONE), ip(ALICE_LAPTOP), TCP, 22)
    assert not policy.allows(ip(ALICE_LAPTOP, True), ip(ALICE_PHONE, True), TCP, 22)  # v4 prefix only
    assert policy.visible_peers(ALICE_PHONE) == {ALICE_LAPTOP}
    (rule,) = policy.filter_rules(ALICE_PHONE)
    assert rule.src == (net(f"{ip(ALICE_LAPTOP)}/32"),)


def test_cached_json_form_matches_the_plain_one() -> None:
    policy = compiled(acl('"group:dev", "lan"', '"tag:server:22", "lan:80"'),
                      acl('"autogroup:member"', '"autogroup:self:*"'))
    for n in NODES:
        assert policy.filter_rules_json(n.id) == rules_to_json(policy.filter_rules(n.id))
        assert policy.filter_rules_json(n.id) == rules_to_json(policy.filter_rules(n.id))  # cached


def test_a_policy_over_the_same_nodes_reuses_the_self_sources_and_stays_exact() -> None:
    """autogroup:self sources are collapsed once per index: a port change compiled over the same
    nodes hands back the very same source tuples, and a policy whose sources differ (one address,
    not every member) does not pick up the cached ones."""
    def text(src: str, ports: str) -> str:
        return ('{"acls": [{"action": "accept", "src": [%s], "dst": ["autogroup:self:%s"]}]}' % (src, ports))
    first = compile_policy(parse_policy(text('"autogroup:member"', "22")), NODES)
    second = compile_policy(parse_policy(text('"autogroup:member"', "80")), NODES, same_nodes_as=first)
    narrow = compile_policy(parse_policy(text(f'"{ip(ALICE_LAPTOP)}"', "80")), NODES, same_nodes_as=first)
    for compiled, fresh_text in ((second, text('"autogroup:member"', "80")),
                                 (narrow, text(f'"{ip(ALICE_LAPTOP)}"', "80"))):
        fresh = compile_policy(parse_policy(fresh_text), NODES)   # its own index: nothing cached
        for n in NODES:
            assert rules_to_json(compiled.filter_rules(n.id)) == rules_to_json(fresh.filter_rules(n.id)), n
    phone_first, phone_second = first.filter_rules(ALICE_PHONE), second.filter_rules(ALICE_PHONE)
    assert phone_second[0].src is phone_first[0].src                      # not collapsed again
    assert [str(p) for p in phone_second[0].src] == [ip(ALICE_LAPTOP) + "/32", ip(ALICE_PHONE) + "/32",
                                                     ip(ALICE_LAPTOP, True) + "/128", ip(ALICE_PHONE, True) + "/128"]
    assert phone_second[0].ports != phone_first[0].ports
    assert [str(p) for p in narrow.filter_rules(ALICE_PHONE)[0].src] == [ip(ALICE_LAPTOP) + "/32"]
