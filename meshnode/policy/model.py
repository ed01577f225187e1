"""The parsed, validated policy and the node identity it is evaluated against, as frozen values."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from ..derp.derpmap import RelayMap

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Everything: the other side of the tailnet ranges (magicdns/ranges.py) in a prefix.
ALL_V4 = ipaddress.IPv4Network("0.0.0.0/0")
ALL_V6 = ipaddress.IPv6Network("::/0")



def _empty() -> Mapping:
    return MappingProxyType({})


class SelectorKind(enum.Enum):
    """What a src/dst/owner entry names."""

    ANY = "*"
    USER = "user"
    GROUP = "group"
    TAG = "tag"
    MEMBER = "autogroup:member"    # nodes owned by users, not tagged
    TAGGED = "autogroup:tagged"    # every tagged node
    SELF = "autogroup:self"        # dst only: the src user's own untagged nodes
    HOST = "host"                  # an alias from `hosts`
    PREFIX = "prefix"              # an IP (as /32 or /128) or a CIDR


@dataclass(frozen=True, slots=True)
class Selector:
    """One src or dst entry. `name` is the text as written; `prefix` is set for HOST and PREFIX."""

    kind: SelectorKind
    name: str
    prefix: IPNetwork | None = None

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class PortRange:
    """An inclusive port range; `*` is 0-65535."""

    first: int
    last: int

    def __str__(self) -> str:
        if self.first == 0 and self.last == 65535:
            return "*"
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last


ALL_PORTS = (PortRange(0, 65535),)


@dataclass(frozen=True, slots=True)
class DstEntry:
    """A `host:ports` entry of an ACL's dst."""

    selector: Selector
    ports: tuple[PortRange, ...]


class Action(enum.Enum):
    """ACL actions; Tailscale's policy only grants, everything not granted is denied."""

    ACCEPT = "accept"


@dataclass(frozen=True, slots=True)
class AclRule:
    """One entry of `acls`; `protos` are IANA protocol numbers (the default set when unspecified)."""

    action: Action
    src: tuple[Selector, ...]
    dst: tuple[DstEntry, ...]
    protos: tuple[int, ...]


class Expectation(enum.Enum):
    """What a `tests` entry expects of a destination."""

    ACCEPT = "accept"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class TestDst:
    """A destination of a `tests` entry: a selector (host, IP, user, tag) and one port."""

    __test__ = False  # not a pytest test class

    selector: Selector
    port: int
    text: str


@dataclass(frozen=True, slots=True)
class PolicyTest:
    """One entry of `tests`: from `src`, each `accept` destination is reachable, each `deny` is not."""

    __test__ = False  # not a pytest test class

    src: Selector
    accept: tuple[TestDst, ...]
    deny: tuple[TestDst, ...]
    proto: int


@dataclass(frozen=True, slots=True)
class AutoApprovers:
    """`autoApprovers`: who may have subnet routes inside a CIDR, or an exit node, approved at once."""

    routes: tuple[tuple[IPNetwork, tuple[Selector, ...]], ...] = ()
    exit_node: tuple[Selector, ...] = ()


@dataclass(frozen=True)
class Policy:
    """A parsed, validated policy. The mappings are read-only views; a Policy is not hashable."""

    acls: tuple[AclRule, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=_empty)
    hosts: Mapping[str, IPNetwork] = field(default_factory=_empty)
    tag_owners: Mapping[str, tuple[Selector, ...]] = field(default_factory=_empty)
    auto_approvers: AutoApprovers = field(default_factory=AutoApprovers)
    tests: tuple[PolicyTest, ...] = ()
    ignored_sections: tuple[str, ...] = ()  # Tailscale sections we accept but do not act on (ssh...)
    derp_map: "RelayMap | None" = None  # the "derpMap" section as a meshnode.derp.derpmap.RelayMap, if the policy has one
    text: str = ""  # the source, kept so `policy get` returns what the admin wrote, comments included


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """A node as the policy sees it. A tagged node's identity is its tags, not its `user`."""

    id: int
    name: str
    user: str
    tags: tuple[str, ...] = ()
    addresses: tuple[IPAddress, ...] = ()
    approved_routes: tuple[IPNetwork, ...] = ()
    is_exit_node: bool = False
