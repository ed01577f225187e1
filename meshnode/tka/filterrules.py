"""Locked-out peers out of the packet filter: the map's rules minus the addresses of every peer
whose node key carries no valid signature (a pure function over the map's rule JSON).

Why at all, when a locked-out peer is no WireGuard peer (nothing it sends is decrypted)? Defense in
depth against a control server that maps another, signed peer's routes over the locked-out one's
address, and so that what a locked node *installs* says what it enforces: no rule in force names an
address the lock refused.

What Tailscale does (ipn/ipnlocal `unlockedNodesPermitted`): when the control server marks a peer
`UnsignedPeerAPIOnly` and the filter still lets any of its AllowedIPs in, the whole filter is thrown
away (fail closed: nothing is accepted). That is right for Tailscale, whose control server
already leaves unsigned peers out of every other rule, so a rule naming one means the server is
broken or hostile. Here the control server compiles ACLs without looking at signatures: with a
`*` rule, every unsigned node is inside a source range of every map. Throwing the filter away would
cut every node off whenever one unsigned node exists, so instead each locked-out host is
subtracted exactly:
- a prefix equal to the host goes;
- a range that merely contains it (100.64.0.0/10, `*` = 0.0.0.0/0 and ::/0) is replaced by the
  smallest set of prefixes that covers the range without it (32 for 0.0.0.0/0, 128 for ::/0);
- a rule left with no source or no destination accepts nothing and is dropped.
Only the peer's own tailnet addresses are subtracted, not the subnet routes it advertises: another,
signed router may serve the same route (and the locked-out one gets no route here anyway).
A map that gives a locked-out peer the address of a signed one cuts the signed one out too: it
fails closed (a control server that does that can deny service anyway); this node's own addresses
are never cut (node/lock.py).
A rule that cannot be read is passed through unchanged: the tunnel refuses the whole filter with
a clear error and keeps the rules it had (which were filtered).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Iterator, Mapping, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def host_addresses(addresses: Iterable[str]) -> frozenset[IPAddress]:
    """The host addresses among a peer's `addresses` ("100.64.0.3" or "100.64.0.3/32"); anything
    unreadable is skipped (the map's own parser has already refused malformed ones)."""
    out: set[IPAddress] = set()
    for a in addresses:
        try:
            out.add(ipaddress.ip_interface(a).ip)
        except ValueError:
            continue
    return frozenset(out)


def without_hosts(rules: Sequence[Mapping[str, Any]], hosts: Iterable[IPAddress]) -> tuple[Mapping[str, Any], ...]:
    """`rules` (the map's `packet_filter`) with every address in `hosts` removed from each rule's
    `src` and `dst`; rules that no longer name a source or a destination are dropped. Rules that do
    not involve any of `hosts` are returned as the very same objects."""
    by_version: dict[int, list[int]] = {4: [], 6: []}
    for h in hosts:
        by_version[h.version].append(int(h))
    if not by_version[4] and not by_version[6]:
        return tuple(rules)
    for v in by_version.values():
        v.sort()
    out: list[Mapping[str, Any]] = []
    for rule in rules:
        try:
            src = _subtract(rule["src"], by_version)
            dst = _subtract(rule["dst"], by_version)
        except (KeyError, TypeError, ValueError):
            out.append(rule)   # unreadable: the tunnel refuses the filter and says why
            continue
        if src is None and dst is None:
            out.append(rule)
            continue
        new_src = src if src is not None else list(rule["src"])
        new_dst = dst if dst is not None else list(rule["dst"])
        if not new_src or not new_dst:
            continue
        out.append({**rule, "src": new_src, "dst": new_dst})
    return tuple(out)


def _subtract(prefixes: Any, hosts: Mapping[int, Sequence[int]]) -> list[str] | None:
    """The prefixes without the hosts, as strings; None when none of the hosts is in any of them."""
    if not isinstance(prefixes, list):
        raise TypeError("expected a list of prefixes")
    nets = [ipaddress.ip_network(p) for p in prefixes]   # ValueError/TypeError: unreadable
    if not any(_inside(n, hosts[n.version]) for n in nets):
        return None
    out: list[str] = []
    for n in nets:
        inside = _inside(n, hosts[n.version])
        if not inside:
            out.append(str(n))
            continue
        bits = n.max_prefixlen
        cls = ipaddress.IPv4Network if n.version == 4 else ipaddress.IPv6Network
        out.extend(str(cls((base, plen))) for base, plen in _split(int(n.network_address), n.prefixlen, bits, inside))
    return out


def _inside(net: IPNetwork, hosts: Sequence[int]) -> list[int]:
    lo, hi = int(net.network_address), int(net.broadcast_address)
    return [h for h in hosts if lo <= h <= hi]


def _split(base: int, plen: int, bits: int, hosts: list[int]) -> Iterator[tuple[int, int]]:
    """The prefixes covering base/plen except `hosts` (sorted, all inside): halve the range until
    each half holds no host (kept whole) or is a host (dropped). At most len(hosts) * bits steps."""
    if not hosts:
        yield base, plen
        return
    if plen == bits:
        return   # the host itself
    half = 1 << (bits - plen - 1)
    mid = base + half
    yield from _split(base, plen + 1, bits, [h for h in hosts if h < mid])
    yield from _split(mid, plen + 1, bits, [h for h in hosts if h >= mid])
