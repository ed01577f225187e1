"""Who may do what at registration and policy time: tag ownership, route auto-approval, and the
checks a new policy must pass before it is stored. The policy engine (`meshnode.policy`) decides;
this module applies its answers to the control store's values."""

from __future__ import annotations

import ipaddress
import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping

from ..policy import (NodeInfo, Policy, PolicyError, auto_approved_exit, auto_approved_routes, check_policy,
                      idpgroups, parse_policy, tag_allowed)
from .mapbuilder import node_info
from .store import ControlStore, Grant, Node, Registration


log = logging.getLogger("meshnode.control.access")


class TagNotAllowed(PermissionError):
    """A node asked for a tag its user does not own (tagOwners) and its auth key does not carry."""


@dataclass(frozen=True, slots=True)
class PolicyChange:
    """What `set_policy` did: the policy now in force, and the tags nodes lost with it."""

    policy: Policy
    tags_removed: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (node name, tags it lost)


def owned_tags(policy: Policy | None, node: Node, grants: frozenset[str]) -> tuple[str, ...]:
    """The tags `node` may keep under `policy`: granted by an admin or its auth key (`grants`), or
    ones its user may apply (tagOwners)."""
    return tuple(t for t in node.tags if t in grants or tag_allowed(policy, node.user, t))


def _retag(store: ControlStore, policy: Policy | None, nodes: list[Node]) -> dict[int, tuple[str, ...]]:
    """The tags each of `nodes` keeps under `policy`, for those that lose some."""
    retag = {}
    for n in nodes:
        kept = owned_tags(policy, n, store.tag_grants(n)) if n.tags else ()
        if kept != n.tags:
            retag[n.id] = kept
    return retag


def set_policy(store: ControlStore, text: str, groups: Mapping[str, tuple[str, ...]] | None = None
               ) -> PolicyChange:
    """Parse the policy and run its `tests`; store it only if both pass. Nodes holding tags the new
    policy no longer lets their user apply lose them in the same transaction (the tests run against
    the nodes as they will be).

    `groups` are the identity provider's members of the policy's groups (default: as the store holds
    them from the users' last sign-ins): a tag owned through such a group is kept, as the maps and
    registrations count it.

    Raises `PolicyError` (the old policy stays). Shared by the admin API, the console and the CLI.
    """
    result: list[Policy] = []
    # Only a policy with tests needs every node (as NodeInfo); otherwise just the tagged ones, which
    # tagOwners may take tags from. Parsed here first: a policy that does not parse stops here.
    has_tests = bool(parse_policy(text).tests)

    def decide(t: str, nodes: list[Node]) -> dict[int, tuple[str, ...]]:
        now = time.time()
        extra = store.idp_groups() if groups is None else groups
        merged = idpgroups.merge(parse_policy(t), extra)
        retag = _retag(store, merged, nodes)
        if has_tests:
            after = [replace(n, tags=retag[n.id]) if n.id in retag else n for n in nodes]
            result.append(check_policy(t, [node_info(n) for n in after if n.active(now)], extra))
        else:
            assert merged is not None
            result.append(merged)
        return retag

    lost = store.set_policy_text(text, decide, all_nodes=has_tests)
    for node, tags in lost:
        log.warning("policy: node %s lost %s (its user %s no longer owns it under tagOwners)",
                    node.name, ",".join(tags), node.user)
    return PolicyChange(result[0], tuple((n.name, tags) for n, tags in lost))


def tags_after_sign_in(store: ControlStore) -> Callable[[list[Node]], dict[int, tuple[str, ...]]]:
    """For `ControlStore.sign_in_user`: once a sign-in changed a user's provider groups (inside its
    transaction), the tags their nodes keep under the stored policy with the new memberships."""
    def decide(nodes: list[Node]) -> dict[int, tuple[str, ...]]:
        text = store.policy_text()
        try:
            policy = idpgroups.merge(parse_policy(text), store.idp_groups()) if text is not None else None
        except PolicyError:
            return {}   # a stored policy a newer parser refuses: the server keeps the old one too
        return _retag(store, policy, nodes)
    return decide


def authorize(policy: Policy | None, user: str, key_tags: tuple[str, ...], reg: Registration,
               existing: Node | None) -> Grant:
    """Tags a registration may carry and what is approved at once (tagOwners, autoApprovers)."""
    for tag in reg.advertise_tags:
        if tag not in key_tags and not tag_allowed(policy, user, tag):
            raise TagNotAllowed(f"user {user!r} may not apply {tag}: tagOwners does not give it to them and"
                                " the auth key does not carry it (an admin can: `meshnode control nodes tag`)")
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
