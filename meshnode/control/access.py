"""Who may do what at registration and policy time: tag ownership, route auto-approval, and the
checks a new policy must pass before it is stored. The policy engine (`meshnode.policy`) decides;
this module applies its answers to the control store's values."""

from __future__ import annotations

import ipaddress
import time

from ..policy import NodeInfo, Policy, auto_approved_exit, auto_approved_routes, check_policy, tag_allowed
from .mapbuilder import node_info
from .store import ControlStore, Grant, Node, Registration


class TagNotAllowed(PermissionError):
    """A node asked for a tag its user does not own (tagOwners) and its auth key does not carry."""


def set_policy(store: ControlStore, text: str) -> Policy:
    """Parse the policy and run its `tests` against the current nodes; store it only if both pass.

    Raises `PolicyError` (the old policy stays). Shared by the admin API and the CLI.
    """
    result: list[Policy] = []

    def validate(t: str, nodes: list[Node]) -> None:
        now = time.time()
        result.append(check_policy(t, [node_info(n) for n in nodes if n.active(now)]))
    store.set_policy_text(text, validate)
    return result[0]


def authorize(policy: Policy | None, user: str, key_tags: tuple[str, ...], reg: Registration,
               existing: Node | None) -> Grant:
    """Tags a registration may carry and what is approved at once (tagOwners, autoApprovers)."""
    for tag in reg.advertise_tags:
        if tag not in key_tags and not tag_allowed(policy, user, tag):
            raise TagNotAllowed(f"user {user!r} may not apply {tag} (tagOwners) and the auth key does not carry it")
    if key_tags or reg.advertise_tags or existing is None:
        tags = tuple(sorted(set(key_tags) | set(reg.advertise_tags)))
    else:
        tags = existing.tags  # a plain re-login keeps what the admin set
    probe = NodeInfo(existing.id if existing else 0, "", user, tags)
    routes = [ipaddress.ip_network(r) for r in reg.advertise_routes]
    auto = {str(r) for r in auto_approved_routes(policy, probe, routes)}
    kept = set(existing.approved_routes) if existing else set()
    approved = tuple(sorted(r for r in reg.advertise_routes if r in auto or r in kept))
    exit_ok = reg.advertise_exit_node and (
        (existing is not None and existing.exit_node_approved) or auto_approved_exit(policy, probe))
    return Grant(tags, approved, bool(exit_ok))
