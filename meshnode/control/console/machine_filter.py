"""The Machines page's search box, like Tailscale's: words match name, user, address or OS;
`tag:x`, `user:x`, `is:online|offline|exit-node|expired|ephemeral|tagged`, `has:routes` narrow it.
All terms must match (sans-I/O: the caller passes `online` and `now`)."""

from __future__ import annotations

from ..store import Node


def matches(node: Node, query: str, online: bool, now: float) -> bool:
    for term in query.lower().split():
        if not _term(node, term, online, now):
            return False
    return True


def _term(node: Node, term: str, online: bool, now: float) -> bool:
    key, sep, value = term.partition(":")
    if sep and key == "tag":
        return term in node.tags
    if sep and key == "user":
        return value in node.user.lower()
    if sep and key == "is":
        return {
            "online": online, "offline": not online, "exit-node": node.advertises_exit_node,
            "expired": node.expired(now), "ephemeral": node.ephemeral, "tagged": bool(node.tags),
            "untagged": not node.tags,
        }.get(value, False)
    if sep and key == "has":
        return value == "routes" and bool(node.advertised_routes)
    haystack = " ".join((node.name, node.hostname, node.user, node.os, *node.addresses, *node.tags)).lower()
    return term in haystack
