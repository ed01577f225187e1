"""tagOwners and autoApprovers."""

from __future__ import annotations

import ipaddress

from meshnode.policy import (NodeInfo, auto_approved_exit, auto_approved_routes, parse_policy,
                             tag_allowed, tag_allowed_for_node)

POLICY = parse_policy("""{
  "groups": {"group:ops": ["olga@example.com"]},
  "tagOwners": {
    "tag:server": ["group:ops", "alice@example.com"],
    "tag:ci": ["tag:server"],
    "tag:locked": [],
  },
  "autoApprovers": {
    "routes": {
      "10.0.0.0/8": ["group:ops"],
      "192.168.0.0/16": ["tag:server"],
      "fd00::/8": ["alice@example.com"],
    },
    "exitNode": ["tag:server", "olga@example.com"],
  },
}""")

net = ipaddress.ip_network


def node(user: str, tags: tuple[str, ...] = ()) -> NodeInfo:
    return NodeInfo(1, "n", user, tags, (ipaddress.ip_address("100.64.0.1"),))


def test_tag_owners() -> None:
    assert tag_allowed(POLICY, "alice@example.com", "tag:server")
    assert tag_allowed(POLICY, "olga@example.com", "tag:server")          # through group:ops
    assert not tag_allowed(POLICY, "bob@example.com", "tag:server")
    assert not tag_allowed(POLICY, "alice@example.com", "tag:ci")         # owned by a tag only
    assert not tag_allowed(POLICY, "alice@example.com", "tag:locked")
    assert not tag_allowed(POLICY, "alice@example.com", "tag:undefined")
    assert not tag_allowed(None, "anyone@example.com", "tag:anything")    # no policy: no tag owners


def test_tagged_node_may_apply_tags_its_tags_own() -> None:
    server = node("bob@example.com", ("tag:server",))
    assert tag_allowed_for_node(POLICY, server, "tag:ci")
    assert not tag_allowed_for_node(POLICY, server, "tag:server")         # bob does not own it
    assert tag_allowed_for_node(POLICY, node("alice@example.com"), "tag:server")
    assert not tag_allowed_for_node(POLICY, node("alice@example.com"), "tag:ci")


def test_auto_approved_routes() -> None:
    olga = node("olga@example.com")
    wanted = (net("10.1.0.0/16"), net("10.0.0.0/8"), net("11.0.0.0/8"), net("192.168.1.0/24"),
              net("0.0.0.0/0"))
    assert auto_approved_routes(POLICY, olga, wanted) == (net("10.1.0.0/16"), net("10.0.0.0/8"),
                                                          net("0.0.0.0/0"))
    server = node("olga@example.com", ("tag:server",))   # tagged: its tags approve, not its user
    assert auto_approved_routes(POLICY, server, wanted) == (net("192.168.1.0/24"), net("0.0.0.0/0"))
    alice = node("alice@example.com")
    assert auto_approved_routes(POLICY, alice, (net("fd00:1::/32"), net("::/0"), net("fc00::/8"))) == (
        net("fd00:1::/32"),)
    assert auto_approved_routes(POLICY, alice, (net("10.0.0.0/7"),)) == ()   # wider than the CIDR
    assert auto_approved_routes(None, olga, wanted) == ()


def test_auto_approved_exit() -> None:
    assert auto_approved_exit(POLICY, node("x@example.com", ("tag:server",)))
    assert auto_approved_exit(POLICY, node("olga@example.com"))
    assert not auto_approved_exit(POLICY, node("alice@example.com"))
    assert not auto_approved_exit(POLICY, node("olga@example.com", ("tag:ci",)))
    assert not auto_approved_exit(None, node("olga@example.com"))
