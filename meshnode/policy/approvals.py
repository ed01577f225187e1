"""Who may apply a tag (`tagOwners`) and which routes and exit nodes are approved at once
(`autoApprovers`)."""

from __future__ import annotations

from typing import Iterable

from .identity import Identity, matches
from .model import IPNetwork, NodeInfo, Policy, Selector


def tag_allowed(policy: Policy | None, user: str, tag: str) -> bool:
    """Whether `user` may apply `tag` to a node (directly or through a group in tagOwners).

    A tag absent from tagOwners belongs to no one, and with no policy set (None) no tag has an owner:
    only an admin or an auth key that carries the tag can apply it (the allow-all default is about
    traffic, never about who may claim a tag's access).
    """
    if policy is None:
        return False
    owners = policy.tag_owners.get(tag)
    if owners is None:
        return False
    who = Identity(user=user)
    return any(matches(policy, owner, who) for owner in owners)


def tag_allowed_for_node(policy: Policy | None, node: NodeInfo, tag: str) -> bool:
    """Whether `node` may apply `tag` to itself: its user owns it, or (tagged) one of its tags does."""
    if policy is None:
        return False
    owners = policy.tag_owners.get(tag)
    if owners is None:
        return False
    return any(matches(policy, owner, _identity(node)) for owner in owners)


def _identity(node: NodeInfo) -> Identity:
    return Identity(None if node.tags else node.user, frozenset(node.tags))


def _approves(policy: Policy, approvers: Iterable[Selector], node: NodeInfo) -> bool:
    who = _identity(node)
    return any(matches(policy, a, who) for a in approvers)


def auto_approved_exit(policy: Policy | None, node: NodeInfo) -> bool:
    """Whether an exit-node advertisement by `node` is approved without an admin (autoApprovers.exitNode)."""
    return policy is not None and _approves(policy, policy.auto_approvers.exit_node, node)


def auto_approved_routes(policy: Policy | None, node: NodeInfo,
                         routes: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """The advertised `routes` approved at once: each inside an autoApprovers.routes CIDR whose
    approvers name the node (its user or group, or one of its tags). Default routes (/0) follow
    the exitNode approvers, as in Tailscale."""
    if policy is None:
        return ()
    approved = []
    exit_ok: bool | None = None
    for route in routes:
        if route.prefixlen == 0:
            if exit_ok is None:
                exit_ok = auto_approved_exit(policy, node)
            if exit_ok:
                approved.append(route)
            continue
        for cidr, approvers in policy.auto_approvers.routes:
            if (cidr.version == route.version and route.subnet_of(cidr)  # type: ignore[arg-type]
                    and _approves(policy, approvers, node)):
                approved.append(route)
                break
    return tuple(approved)
