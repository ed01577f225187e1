"""Which of two measured paths is better: tailscale's betterAddr (wgengine/magicsock/endpoint.go).

Each path scores the percentage by which it is faster than the slower one, plus a bonus for
loopback (50), link-local (30), private (20) and IPv6 (10) addresses; a path must win by more than
1 point to replace the current one, so two near-equal paths never flap."""

from __future__ import annotations

import ipaddress

from .types import Endpoint

# Go's netip.Addr.IsPrivate (RFC 1918, RFC 4193): Python's is_private also counts documentation
# and benchmarking ranges, which are public addresses as far as paths go.
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


def _bonus(ep: Endpoint) -> int:
    ip = ipaddress.ip_address(ep[0])
    points = 0
    if ip.is_loopback:
        points += 50
    elif ip.is_link_local:
        points += 30
    elif any(ip in net for net in _PRIVATE if net.version == ip.version):
        points += 20
    if ip.version == 6:
        points += 10
    return points


def better(a: Endpoint, a_latency: float, b: Endpoint | None, b_latency: float) -> bool:
    """True if path `a` should replace the current path `b` (None: there is none)."""
    if b is None:
        return True
    if a == b:
        return False
    a_points = b_points = 0
    if a_latency > b_latency and a_latency > 0:
        b_points = int(100 - (b_latency * 100) / a_latency)
    elif b_latency > 0:
        a_points = int(100 - (a_latency * 100) / b_latency)
    a_points += _bonus(a)
    b_points += _bonus(b)
    if a_points <= 1 and b_points == 0:
        return False  # less than 1% better: stay (hysteresis)
    return a_points > b_points
