"""Reading the selector strings of a policy: `*`, users, groups, tags, autogroups, hosts, IPs, CIDRs,
and the `host:ports` form of a destination."""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass
from typing import AbstractSet, Mapping

from .model import ALL_PORTS, IPNetwork, PortRange, Selector, SelectorKind

HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_AUTOGROUPS = {
    "autogroup:member": SelectorKind.MEMBER,
    "autogroup:tagged": SelectorKind.TAGGED,
    "autogroup:self": SelectorKind.SELF,
}


class Role(enum.Enum):
    """Where a selector appears; each place admits different kinds."""

    SRC = "src"
    DST = "dst"
    OWNER = "owner"        # tagOwners and autoApprovers values
    GROUP_MEMBER = "group member"
    TEST_SRC = "test src"
    TEST_DST = "test dst"


_ALLOWED: dict[Role, frozenset[SelectorKind]] = {
    Role.SRC: frozenset(SelectorKind) - {SelectorKind.SELF},
    Role.DST: frozenset(SelectorKind),
    Role.OWNER: frozenset({SelectorKind.USER, SelectorKind.GROUP, SelectorKind.TAG}),
    Role.GROUP_MEMBER: frozenset({SelectorKind.USER}),
    Role.TEST_SRC: frozenset({SelectorKind.USER, SelectorKind.GROUP, SelectorKind.TAG,
                              SelectorKind.HOST, SelectorKind.PREFIX}),
    Role.TEST_DST: frozenset({SelectorKind.USER, SelectorKind.TAG, SelectorKind.HOST,
                              SelectorKind.PREFIX}),
}


@dataclass(frozen=True, slots=True)
class Names:
    """The names a selector may refer to: defined groups, hosts and tags."""

    groups: AbstractSet[str]
    hosts: Mapping[str, IPNetwork]
    tags: AbstractSet[str]


def parse_prefix(text: str) -> IPNetwork:
    """An IP (as a host prefix) or a CIDR; ValueError with the reason otherwise.

    Host bits set in a CIDR are refused (strict), as `10.0.0.1/24` is more often a typo than intent.
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"bad IP or CIDR {text!r}: {exc}") from None


def _kind(text: str, names: Names) -> Selector:
    if text == "*":
        return Selector(SelectorKind.ANY, text)
    if text.startswith("group:"):
        if text not in names.groups:
            raise ValueError(f"unknown group {text!r} (not defined in groups)")
        return Selector(SelectorKind.GROUP, text)
    if text.startswith("tag:"):
        if text not in names.tags:
            raise ValueError(f"undefined tag {text!r} (not defined in tagOwners)")
        return Selector(SelectorKind.TAG, text)
    if text.startswith("autogroup:"):
        kind = _AUTOGROUPS.get(text)
        if kind is None:
            raise ValueError(f"unknown autogroup {text!r} (known: {', '.join(sorted(_AUTOGROUPS))})")
        return Selector(kind, text)
    if "@" in text:
        user, _, domain = text.partition("@")
        if not user or "@" in domain or any(c.isspace() for c in text):
            raise ValueError(f"bad user {text!r}")
        return Selector(SelectorKind.USER, text)
    if text in names.hosts:
        return Selector(SelectorKind.HOST, text, names.hosts[text])
    if re.match(r"^[0-9a-fA-F:.]+(/\d+)?$", text) and any(c in text for c in ".:"):
        return Selector(SelectorKind.PREFIX, text, parse_prefix(text))
    if ":" in text:
        raise ValueError(f"unknown selector kind {text.split(':', 1)[0] + ':'!r} in {text!r}")
    raise ValueError(f"unknown selector {text!r} (not a user, group:, tag:, autogroup:, host alias, "
                     "IP or CIDR)")


def parse_selector(text: object, role: Role, names: Names) -> Selector:
    """Read one selector string admitted in `role`; ValueError with a clear reason otherwise."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected a non-empty string, got {text!r}")
    selector = _kind(text, names)
    if selector.kind not in _ALLOWED[role]:
        raise ValueError(f"{text!r} is not allowed as a {role.value}")
    return selector


def parse_port(text: str) -> int:
    """One port number 0-65535."""
    if not text.isdigit():
        raise ValueError(f"bad port {text!r}")
    port = int(text)
    if port > 65535:
        raise ValueError(f"bad port {text!r} (above 65535)")
    return port


def parse_ports(text: str) -> tuple[PortRange, ...]:
    """`*`, `22`, `80,443`, `1000-2000` (and combinations) into sorted, merged ranges."""
    if text == "*":
        return ALL_PORTS
    ranges: list[PortRange] = []
    for part in text.split(","):
        lo, dash, hi = part.partition("-")
        first = parse_port(lo)
        last = parse_port(hi) if dash else first
        if last < first:
            raise ValueError(f"bad port range {part!r} (first above last)")
        ranges.append(PortRange(first, last))
    return merge_ranges(ranges)


def merge_ranges(ranges: list[PortRange]) -> tuple[PortRange, ...]:
    """Sorted, non-overlapping, non-adjacent ranges covering the same ports."""
    merged: list[PortRange] = []
    for r in sorted(ranges):
        if merged and r.first <= merged[-1].last + 1:
            if r.last > merged[-1].last:
                merged[-1] = PortRange(merged[-1].first, r.last)
        else:
            merged.append(r)
    return tuple(merged)


def split_host_port(text: object) -> tuple[str, str]:
    """Split `host:ports` at the last colon; IPv6 hosts may be bracketed (`[fd7a::1]:22`)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"expected a 'host:ports' string, got {text!r}")
    host, colon, ports = text.rpartition(":")
    if not colon or not host:
        raise ValueError(f"{text!r} is not of the form host:ports")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, ports
