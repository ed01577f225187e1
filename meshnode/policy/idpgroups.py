"""The identity provider's groups as members of the policy's groups (sans-I/O).

A policy that declares a group whose name is an OIDC group (`"group:eng": []`) gets every user whose
provider lists `eng` in their `groups` claim (as of their last sign-in) as a member, next to the
members the policy lists itself. Only declared groups are filled, so the provider can never create
a group the admin did not write. The members count wherever the policy names the group: `acls`,
`tagOwners` (a tag owned through a provider group is lost when a sign-in shows the user left it)
and `autoApprovers`.
"""

from __future__ import annotations

import dataclasses
import json
from types import MappingProxyType
from typing import Mapping

from .model import Policy


def cache_key(text: str | None, extra: Mapping[str, tuple[str, ...]]) -> str | None:
    """A key that changes when the text or the provider's memberships do (the compile cache's key)."""
    if text is None or not extra:
        return text
    return text + "\0" + json.dumps(sorted((g, sorted(m)) for g, m in extra.items()))


def merge(policy: Policy | None, extra: Mapping[str, tuple[str, ...]]) -> Policy | None:
    if policy is None or not extra:
        return policy
    groups = dict(policy.groups)
    touched = False
    for name, members in extra.items():
        if name in groups:
            groups[name] = tuple(dict.fromkeys((*groups[name], *sorted(members))))
            touched = True
    return dataclasses.replace(policy, groups=MappingProxyType(groups)) if touched else policy
