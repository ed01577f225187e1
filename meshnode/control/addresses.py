"""Tailnet address allocation (sans-I/O): IPv4 from 100.64.0.0/10, IPv6 from fd7a:115c:a1e0::/48.

A node's addresses are one *offset* into both ranges: offset n is 100.64.0.0 + n and
fd7a:115c:a1e0:: + n (100.64.0.1 <-> fd7a:115c:a1e0::1), so a v4 and v6 never disagree and one
integer column is the lease. The store keeps the lease per machine key, which is what makes the
addresses stable across restarts and re-logins.

Never allocated:
- the service ranges Tailscale reserves: 100.100.100.0/24 (MagicDNS at 100.100.100.100 and
  friends) and 100.115.92.0/23;
- offsets whose IPv6 form is a service address: fd7a:115c:a1e0::53 (the resolver's v6 address) and ::;
- any address ending in .0 or .255. 100.64.0.0/10 has no broadcast, but many tools, firewalls and
  people still treat x.x.x.0/x.x.x.255 as network/broadcast; skipping them costs <1% of 4M addresses.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import Container

from magicdns.ranges import RESOLVER_V6, TAILNET_V4, TAILNET_V6

V4_NET = TAILNET_V4
V6_NET = TAILNET_V6
RESERVED_V4 = (ipaddress.IPv4Network("100.100.100.0/24"), ipaddress.IPv4Network("100.115.92.0/23"))
RESERVED_V6 = (RESOLVER_V6,)
MAX_OFFSET = V4_NET.num_addresses - 1
_V4_BASE = int(V4_NET.network_address)
_V6_BASE = int(V6_NET.network_address)
# The same exclusions as integer offset ranges [first, last], so the scan never builds address objects.
_RESERVED_RANGES = tuple((int(n.network_address) - _V4_BASE, int(n.broadcast_address) - _V4_BASE)
                         for n in RESERVED_V4)
_RESERVED_OFFSETS = frozenset(int(a) - _V6_BASE for a in RESERVED_V6)


class AddressesExhausted(RuntimeError):
    """Every allocatable address is leased."""


@dataclass(frozen=True, slots=True)
class AddressPair:
    """A node's two addresses and the offset that names them."""

    offset: int
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address

    @property
    def texts(self) -> tuple[str, str]:
        return (str(self.ipv4), str(self.ipv6))


def pair_for(offset: int) -> AddressPair:
    """The addresses of `offset` (no allocatability check)."""
    return AddressPair(offset, ipaddress.IPv4Address(_V4_BASE + offset), ipaddress.IPv6Address(_V6_BASE + offset))


@functools.lru_cache(maxsize=1 << 16)
def address_objects(offset: int) -> tuple[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """The addresses of `offset` as objects, straight from the integers: `set_policy` asks for every
    node's, and formatting them as text to parse them back cost ~0.4 s at 10,000 nodes."""
    pair = pair_for(offset)
    return (pair.ipv4, pair.ipv6)


def is_allocatable(offset: int) -> bool:
    """May `offset` be handed to a node?"""
    if not 0 < offset <= MAX_OFFSET or offset & 0xFF in (0, 0xFF) or offset in _RESERVED_OFFSETS:
        return False
    return not any(first <= offset <= last for first, last in _RESERVED_RANGES)


def allocate(used: Container[int], start: int = 1) -> AddressPair:
    """The first allocatable, unused offset at or after `start`, wrapping around once.

    `start` lets the caller continue after the highest lease (O(1) in the common case) while a
    wrap-around still finds holes left by deleted nodes.
    """
    start = start if 0 < start <= MAX_OFFSET else 1
    offset = start
    while True:
        if is_allocatable(offset) and offset not in used:
            return pair_for(offset)
        offset = offset + 1 if offset < MAX_OFFSET else 1
        if offset == start:
            raise AddressesExhausted("no free address left in 100.64.0.0/10")
