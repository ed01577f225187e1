"""The tailnet's address ranges and the resolver's own addresses: the one place they are defined.

Everything else derives from these: the zones we answer for, which upstreams may return tailnet
addresses, which clients may ask, and in meshnode the address allocator, the policy compiler,
the tunnel's endpoint checks, the router's masquerade rules, flow logs and the tailnet CA.
"""

from __future__ import annotations

import ipaddress

TAILNET_V4 = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598 shared address space, as Tailscale
TAILNET_V6 = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")  # Tailscale's ULA
TAILNET_RANGES = (TAILNET_V4, TAILNET_V6)
RESOLVER_V4 = ipaddress.IPv4Address("100.100.100.100")
RESOLVER_V6 = ipaddress.IPv6Address("fd7a:115c:a1e0::53")
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 well-known prefix

# Reverse zones: one per /16 of the v4 range (64.100.in-addr.arpa ... 127.100.in-addr.arpa), and
# the nibble-aligned /48 of the v6 range.
V4_REVERSE_APEXES = tuple(
    f"{TAILNET_V4.network_address.packed[1] + n}.{TAILNET_V4.network_address.packed[0]}.in-addr.arpa"
    for n in range(1 << (16 - TAILNET_V4.prefixlen)))
V6_REVERSE_APEX = ".".join(reversed(TAILNET_V6.network_address.exploded.replace(":", "")[:TAILNET_V6.prefixlen // 4])) \
    + ".ip6.arpa"


def in_tailnet(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for an address of the tailnet ranges, also written IPv4-mapped (::ffff:100.64.0.1) or in
    the NAT64 prefix (64:ff9b::100.64.0.1): both reach the same node."""
    if addr.version == 6:
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        elif addr in NAT64_PREFIX:
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    return addr in TAILNET_V4 if addr.version == 4 else addr in TAILNET_V6
