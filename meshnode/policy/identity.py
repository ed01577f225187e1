"""Matching selectors against a symbolic identity (a user, tags and/or an address), without a node list.

The `tests` section and the approval checks reason about who someone is rather than which node
holds which IP; this module is the one place that says what each selector kind means for an identity.
"""

from __future__ import annotations

from dataclasses import dataclass

from .model import IPNetwork, Policy, Selector, SelectorKind


@dataclass(frozen=True, slots=True)
class Identity:
    """A user (for untagged nodes), the tags of a tagged node, and the prefix it sends from or owns."""

    user: str | None = None
    tags: frozenset[str] = frozenset()
    prefix: IPNetwork | None = None


def _within(inner: IPNetwork | None, outer: IPNetwork | None) -> bool:
    return (inner is not None and outer is not None and inner.version == outer.version
            and inner.subnet_of(outer))  # type: ignore[arg-type]


def matches(policy: Policy, selector: Selector, who: Identity) -> bool:
    """Whether `selector` (src, dst or owner; not autogroup:self) names `who`."""
    kind = selector.kind
    untagged_user = who.user if not who.tags else None
    if kind is SelectorKind.ANY:
        return True
    if kind is SelectorKind.USER:
        return untagged_user is not None and untagged_user == selector.name
    if kind is SelectorKind.GROUP:
        return untagged_user is not None and untagged_user in policy.groups.get(selector.name, ())
    if kind is SelectorKind.TAG:
        return selector.name in who.tags
    if kind is SelectorKind.MEMBER:
        return untagged_user is not None
    if kind is SelectorKind.TAGGED:
        return bool(who.tags)
    if kind in (SelectorKind.HOST, SelectorKind.PREFIX):
        return _within(who.prefix, selector.prefix)
    return False


def dst_matches(policy: Policy, selector: Selector, src: Identity, dst: Identity) -> bool:
    """Whether a dst selector names `dst` for traffic from `src` (autogroup:self needs both)."""
    if selector.kind is SelectorKind.SELF:
        return (not src.tags and not dst.tags and src.user is not None and src.user == dst.user)
    return matches(policy, selector, dst)
