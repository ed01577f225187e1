"""The data plane's packet filter: inbound packets from the tunnel checked against the node's
filter rules, with replies of connections this node opened let through by a small flow table.

Sans-I/O and built for the per-packet path: rules are compiled once into per-family tuples of
byte-string sets and integer masks, a packet is read in place with index arithmetic, nothing is
logged, and the only allocations are the few slices used as lookup keys. Nothing here raises on
input: a packet that cannot be read is dropped and counted.
"""

from __future__ import annotations

import enum
from typing import Iterable

from .model import IPNetwork
from .rules import FilterRule

_TCP, _UDP, _SCTP, _ICMP, _ICMPV6 = 6, 17, 132, 1, 58
_PORT_PROTOS = frozenset({_TCP, _UDP, _SCTP})
# IPv6 extension headers walked to find the transport header (hop-by-hop, routing, dest options,
# fragment); anything else (including AH/ESP) is treated as the transport protocol itself.
_V6_EXT = frozenset({0, 43, 60, 44})
_MAX_V6_EXT = 8
_ECHO_REQUEST = {_ICMP: 8, _ICMPV6: 128}
_ECHO_REPLY = {_ICMP: 0, _ICMPV6: 129}


class DropReason(enum.IntEnum):
    """Why the filter dropped a packet (the index into the drop counters)."""

    MALFORMED = 0       # too short, bad version or lengths, truncated headers
    NOT_ALLOWED = 1     # readable, but no rule and no tracked flow lets it in


class AcceptReason(enum.IntEnum):
    """Why the filter accepted a packet."""

    RULE = 0            # a filter rule allows it
    REPLY = 1           # a reply of a flow this node opened
    RELATED = 2         # an ICMP error about a flow this node opened (unreachable, too big...)


def _nets(prefixes: Iterable[IPNetwork], version: int
          ) -> tuple[bool, frozenset[bytes], tuple[tuple[int, int], ...]]:
    """(any, exact addresses as packed bytes, (network, mask) integer pairs) for one family."""
    width = 32 if version == 4 else 128
    exact: set[bytes] = set()
    nets: list[tuple[int, int]] = []
    for p in prefixes:
        if p.version != version:
            continue
        if p.prefixlen == 0:
            return True, frozenset(), ()
        if p.prefixlen == width:
            exact.add(p.network_address.packed)
        else:
            nets.append((int(p.network_address), int(p.netmask)))
    return False, frozenset(exact), tuple(nets)


# One compiled rule, for one family and protocol:
# (port ranges or None for all ports, src any/exact/nets, dst any/exact/nets).
_Compiled = tuple
_MALFORMED, _NOT_ALLOWED = int(DropReason.MALFORMED), int(DropReason.NOT_ALLOWED)
_RULE, _REPLY, _RELATED = int(AcceptReason.RULE), int(AcceptReason.REPLY), int(AcceptReason.RELATED)
# ICMP errors quote the packet that caused them: destination unreachable (which carries IPv6's
# packet too big for path-MTU discovery, and IPv4's fragmentation needed), time exceeded, parameter
# problem.
_ICMP_ERRORS = {_ICMP: frozenset({3, 11, 12}), _ICMPV6: frozenset({1, 2, 3, 4})}


def _compile(rules: Iterable[FilterRule], version: int) -> dict[int, tuple[_Compiled, ...]]:
    """Rules of one family indexed by protocol, so a packet only walks the rules that can match."""
    by_proto: dict[int, list[_Compiled]] = {}
    for rule in rules:
        src = _nets(rule.src, version)
        dst = _nets(rule.dst, version)
        if not (src[0] or src[1] or src[2]) or not (dst[0] or dst[1] or dst[2]):
            continue  # the rule names no address of this family
        ports = tuple((r.first, r.last) for r in rule.ports)
        all_ports = any(lo == 0 and hi == 65535 for lo, hi in ports)
        for proto in rule.protos:
            uses_ports = proto in _PORT_PROTOS and not all_ports
            by_proto.setdefault(proto, []).append((ports if uses_ports else None,) + src + dst)
    return {proto: tuple(compiled) for proto, compiled in by_proto.items()}


def _in_nets(addr: bytes, nets: tuple[tuple[int, int], ...]) -> bool:
    value = int.from_bytes(addr, "big")
    for net, mask in nets:
        if value & mask == net:
            return True
    return False


def _walk_v6(packet: bytes, proto: int, end: int) -> tuple[int, int, int] | None:
    """Follow IPv6 extension headers: (transport protocol, its offset, fragment offset) or None."""
    off = 40
    frag = 0
    for _ in range(_MAX_V6_EXT + 1):
        if proto not in _V6_EXT:
            return (proto, off, frag) if off <= end else None
        if off + 8 > end:
            return None
        if proto == 44:
            frag = ((packet[off + 2] << 8) | packet[off + 3]) >> 3
            proto, off = packet[off], off + 8
        else:
            proto, off = packet[off], off + ((packet[off + 1] + 1) << 3)
    return None


def _quoted_flow(packet: bytes, start: int, end: int, version: int, local: bytes) -> tuple | None:
    """The flow-table key of the packet an ICMP error quotes, if it is one this node sent."""
    if version == 4:
        if start + 20 > end or packet[start] >> 4 != 4:
            return None
        off = start + ((packet[start] & 15) << 2)
        proto = packet[start + 9]
        src, dst = packet[start + 12:start + 16], packet[start + 16:start + 20]
    else:
        if start + 40 > end or packet[start] >> 4 != 6:
            return None
        off = start + 40
        proto = packet[start + 6]  # quoted extension headers are not walked: no match, dropped
        src, dst = packet[start + 8:start + 24], packet[start + 24:start + 40]
    if src != local:
        return None  # the quoted packet must be one this node sent
    if proto in _PORT_PROTOS and off + 4 <= end:
        return (proto, dst, src, (packet[off + 2] << 8) | packet[off + 3], (packet[off] << 8) | packet[off + 1])
    if (proto == _ICMP or proto == _ICMPV6) and off + 8 <= end and packet[off] == _ECHO_REQUEST[proto]:
        return (proto, dst, src, (packet[off + 4] << 8) | packet[off + 5], -1)
    return None


class PacketFilter:
    """Inbound packet filter with reply tracking. Not thread-safe: one per data-plane worker."""

    def __init__(self, rules: Iterable[FilterRule], *, max_flows: int = 4096,
                 tcp_timeout: float = 3600.0, other_timeout: float = 120.0) -> None:
        """`rules` from the network map; flows are tracked up to `max_flows` (the stalest evicted),
        TCP for `tcp_timeout` seconds after the last outbound packet, UDP/SCTP/ICMP echo for
        `other_timeout`."""
        self._v4: dict[int, tuple[_Compiled, ...]] = {}
        self._v6: dict[int, tuple[_Compiled, ...]] = {}
        self.set_rules(rules)
        self._flows: dict[tuple, float] = {}
        self._max_flows = max(1, max_flows)
        self._tcp_timeout = tcp_timeout
        self._other_timeout = other_timeout
        self._drops = [0] * len(DropReason)
        self._accepts = [0] * len(AcceptReason)
        self.evictions = 0

    def set_rules(self, rules: Iterable[FilterRule]) -> None:
        """Replace the rules (a new network map), keeping the tracked flows. Call it from the thread
        that calls `check`."""
        rules = tuple(rules)
        self._v4, self._v6 = _compile(rules, 4), _compile(rules, 6)

    @property
    def drops(self) -> dict[DropReason, int]:
        """Dropped packets by reason since creation."""
        return {reason: self._drops[reason] for reason in DropReason}

    @property
    def accepts(self) -> dict[AcceptReason, int]:
        """Accepted packets by reason since creation."""
        return {reason: self._accepts[reason] for reason in AcceptReason}

    @property
    def flow_count(self) -> int:
        """Flows currently tracked (expired ones linger until looked up or evicted)."""
        return len(self._flows)

    def _parse(self, packet: bytes) -> tuple[int, int, int, int, int] | None:
        """(version, proto, transport offset, end, fragment offset) or None when unreadable."""
        n = len(packet)
        if n < 20:
            return None
        version = packet[0] >> 4
        if version == 4:
            ihl = (packet[0] & 15) << 2
            end = (packet[2] << 8) | packet[3]
            if ihl < 20 or end < ihl or end > n:
                return None
            return 4, packet[9], ihl, end, ((packet[6] & 0x1F) << 8) | packet[7]
        if version == 6 and n >= 40:
            end = 40 + ((packet[4] << 8) | packet[5])
            if end > n:
                return None
            walked = _walk_v6(packet, packet[6], end)
            return None if walked is None else (6, walked[0], walked[1], end, walked[2])
        return None

    def check(self, packet: bytes, now: float) -> bool:
        """Whether an inbound packet may pass; drops are counted by reason. Never raises.

        Written as one function on purpose: each call saved here is paid on every packet.
        """
        try:
            n = len(packet)
            b0 = packet[0] if n >= 20 else 0
            if b0 >> 4 == 4:
                off = (b0 & 15) << 2
                end = (packet[2] << 8) | packet[3]
                if off < 20 or end < off or end > n:
                    self._drops[_MALFORMED] += 1
                    return False
                proto = packet[9]
                frag = ((packet[6] & 0x1F) << 8) | packet[7]
                a, b, c = 12, 16, 20
                rules = self._v4.get(proto)
            elif b0 >> 4 == 6 and n >= 40:
                end = 40 + ((packet[4] << 8) | packet[5])
                proto = packet[6]
                off, frag = 40, 0
                if end > n:
                    self._drops[_MALFORMED] += 1
                    return False
                if proto in _V6_EXT:
                    walked = _walk_v6(packet, proto, end)
                    if walked is None:
                        self._drops[_MALFORMED] += 1
                        return False
                    proto, off, frag = walked
                a, b, c = 8, 24, 40
                rules = self._v6.get(proto)
            else:
                self._drops[_MALFORMED] += 1
                return False
            port = -1
            if proto in _PORT_PROTOS:
                if not frag:
                    if off + 4 > end:
                        self._drops[_MALFORMED] += 1
                        return False
                    port = (packet[off + 2] << 8) | packet[off + 3]
            elif (proto == _ICMP or proto == _ICMPV6) and not frag and off + 8 > end:
                self._drops[_MALFORMED] += 1
                return False
            src = packet[a:b]
            dst = packet[b:c]
            if rules:
                for ports, s_any, s_exact, s_nets, d_any, d_exact, d_nets in rules:
                    if ports is not None and port >= 0:
                        for lo, hi in ports:
                            if lo <= port <= hi:
                                break
                        else:
                            continue
                    if not (d_any or dst in d_exact or (d_nets and _in_nets(dst, d_nets))):
                        continue
                    if s_any or src in s_exact or (s_nets and _in_nets(src, s_nets)):
                        self._accepts[_RULE] += 1
                        return True
            if self._flows and not frag:
                if port >= 0:
                    key = (proto, src, dst, (packet[off] << 8) | packet[off + 1], port)
                elif (proto == _ICMP or proto == _ICMPV6) and packet[off] == _ECHO_REPLY[proto]:
                    key = (proto, src, dst, (packet[off + 4] << 8) | packet[off + 5], -1)
                elif (proto == _ICMP or proto == _ICMPV6) and packet[off] in _ICMP_ERRORS[proto]:
                    key = _quoted_flow(packet, off + 8, end, b0 >> 4, dst)
                    if key is not None and self._flows.get(key, -1.0) >= now:
                        self._accepts[_RELATED] += 1
                        return True
                    key = None
                else:
                    key = None
                if key is not None:
                    expiry = self._flows.get(key)
                    if expiry is not None:
                        if expiry >= now:
                            self._accepts[_REPLY] += 1
                            return True
                        del self._flows[key]
            self._drops[_NOT_ALLOWED] += 1
            return False
        except (IndexError, ValueError, TypeError):  # a bound we failed to check: still a drop
            self._drops[_MALFORMED] += 1
            return False

    def note_outbound(self, packet: bytes, now: float) -> None:
        """Track a packet this node sends, so its replies pass `check`. Never raises."""
        try:
            n = len(packet)
            b0 = packet[0] if n >= 20 else 0
            if b0 >> 4 == 4:
                off = (b0 & 15) << 2
                end = (packet[2] << 8) | packet[3]
                if off < 20 or end < off or end > n or ((packet[6] & 0x1F) << 8) | packet[7]:
                    return  # unreadable or a later fragment: nothing to track
                proto = packet[9]
                a, b, c = 12, 16, 20
            else:
                parsed = self._parse(packet)
                if parsed is None or parsed[4]:
                    return
                _, proto, off, end, _ = parsed
                a, b, c = 8, 24, 40
            # Keys are stored as the reply will look: (proto, remote, local, remote port, local port).
            if proto in _PORT_PROTOS:
                if off + 4 > end:
                    return
                key = (proto, packet[b:c], packet[a:b], (packet[off + 2] << 8) | packet[off + 3],
                       (packet[off] << 8) | packet[off + 1])
                timeout = self._tcp_timeout if proto == _TCP else self._other_timeout
            elif proto == _ICMP or proto == _ICMPV6:
                if off + 8 > end or packet[off] != _ECHO_REQUEST[proto]:
                    return
                key = (proto, packet[b:c], packet[a:b], (packet[off + 4] << 8) | packet[off + 5], -1)
                timeout = self._other_timeout
            else:
                return
        except (IndexError, ValueError, TypeError):
            return  # an unreadable outbound packet opens no flow; the tunnel counts its own errors
        flows = self._flows
        expiry = flows.get(key)
        if expiry is not None:
            # Rewriting on every packet would cost a dict write per packet; refreshing once half
            # the timeout has passed keeps idle expiry between timeout/2 and timeout.
            if expiry - now > timeout * 0.5:
                return
            del flows[key]  # re-inserted at the end, so eviction order follows recent use
        elif len(flows) >= self._max_flows:
            self._evict(now)
        flows[key] = now + timeout

    def _evict(self, now: float) -> None:
        """Make room: drop the least recently refreshed flow (dict order is refresh order)."""
        flows = self._flows
        oldest = next(iter(flows))
        del flows[oldest]
        self.evictions += 1

    def expire(self, now: float) -> int:
        """Forget every expired flow (call now and then, off the packet path); returns how many."""
        dead = [k for k, expiry in self._flows.items() if expiry < now]
        for k in dead:
            del self._flows[k]
        return len(dead)
