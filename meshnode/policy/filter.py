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


# One compiled rule: (protos, port ranges or None for all, src any/exact/nets, dst any/exact/nets).
_Compiled = tuple


def _compile(rules: Iterable[FilterRule], version: int) -> tuple[_Compiled, ...]:
    compiled = []
    for rule in rules:
        src = _nets(rule.src, version)
        dst = _nets(rule.dst, version)
        if not (src[0] or src[1] or src[2]) or not (dst[0] or dst[1] or dst[2]):
            continue  # the rule names no address of this family
        ports = tuple((r.first, r.last) for r in rule.ports)
        all_ports = any(lo == 0 and hi == 65535 for lo, hi in ports)
        compiled.append((frozenset(rule.protos), None if all_ports else ports) + src + dst)
    return tuple(compiled)


def _in(addr: bytes, any_: bool, exact: frozenset[bytes], nets: tuple[tuple[int, int], ...]) -> bool:
    if any_ or addr in exact:
        return True
    if nets:
        value = int.from_bytes(addr, "big")
        for net, mask in nets:
            if value & mask == net:
                return True
    return False


class PacketFilter:
    """Inbound packet filter with reply tracking. Not thread-safe: one per data-plane worker."""

    def __init__(self, rules: Iterable[FilterRule], *, max_flows: int = 4096,
                 tcp_timeout: float = 3600.0, other_timeout: float = 120.0) -> None:
        self._rules: tuple[tuple[_Compiled, ...], tuple[_Compiled, ...]] = ((), ())
        self.set_rules(rules)
        self._flows: dict[tuple, float] = {}
        self._max_flows = max(1, max_flows)
        self._tcp_timeout = tcp_timeout
        self._other_timeout = other_timeout
        self._drops = [0] * len(DropReason)
        self._accepts = [0] * len(AcceptReason)
        self.evictions = 0

    def set_rules(self, rules: Iterable[FilterRule]) -> None:
        """Replace the rules (a new network map) keeping the tracked flows; one atomic swap."""
        rules = tuple(rules)
        self._rules = (_compile(rules, 4), _compile(rules, 6))

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
        if version == 6:
            if n < 40:
                return None
            end = 40 + ((packet[4] << 8) | packet[5])
            if end > n:
                return None
            proto = packet[6]
            off = 40
            frag = 0
            hops = 0
            while proto in _V6_EXT:
                hops += 1
                if hops > _MAX_V6_EXT or off + 8 > end:
                    return None
                if proto == 44:
                    frag = ((packet[off + 2] << 8) | packet[off + 3]) >> 3
                    proto = packet[off]
                    off += 8
                else:
                    proto, off = packet[off], off + ((packet[off + 1] + 1) << 3)
            if off > end:
                return None
            return 6, proto, off, end, frag
        return None

    def check(self, packet: bytes, now: float) -> bool:
        """Whether an inbound packet may pass; drops are counted by reason. Never raises."""
        try:
            return self._check(packet, now)
        except (IndexError, ValueError, TypeError):  # a bound we failed to check: still a drop
            self._drops[DropReason.MALFORMED] += 1
            return False

    def _check(self, packet: bytes, now: float) -> bool:
        parsed = self._parse(packet)
        if parsed is None:
            self._drops[DropReason.MALFORMED] += 1
            return False
        version, proto, off, end, frag = parsed
        if version == 4:
            src, dst, addrs, rules = packet[12:16], packet[16:20], packet[12:20], self._rules[0]
        else:
            src, dst, addrs, rules = packet[8:24], packet[24:40], packet[8:40], self._rules[1]
        port = -1
        flow_key = None
        if proto in _PORT_PROTOS:
            if not frag:
                if off + 4 > end:
                    self._drops[DropReason.MALFORMED] += 1
                    return False
                port = (packet[off + 2] << 8) | packet[off + 3]
                flow_key = (proto, addrs, packet[off:off + 4])
        elif (proto == _ICMP or proto == _ICMPV6) and not frag:
            if off + 8 > end:
                self._drops[DropReason.MALFORMED] += 1
                return False
            if packet[off] == _ECHO_REPLY[proto]:
                flow_key = (proto, addrs, packet[off + 4:off + 6])
        for protos, ports, s_any, s_exact, s_nets, d_any, d_exact, d_nets in rules:
            if proto not in protos:
                continue
            if ports is not None and port >= 0:
                for lo, hi in ports:
                    if lo <= port <= hi:
                        break
                else:
                    continue
            if _in(dst, d_any, d_exact, d_nets) and _in(src, s_any, s_exact, s_nets):
                self._accepts[AcceptReason.RULE] += 1
                return True
        if flow_key is not None:
            expiry = self._flows.get(flow_key)
            if expiry is not None:
                if expiry >= now:
                    self._accepts[AcceptReason.REPLY] += 1
                    return True
                del self._flows[flow_key]
        self._drops[DropReason.NOT_ALLOWED] += 1
        return False

    def note_outbound(self, packet: bytes, now: float) -> None:
        """Track a packet this node sends, so its replies pass `check`. Never raises."""
        try:
            self._note(packet, now)
        except (IndexError, ValueError, TypeError):
            pass  # an unreadable outbound packet opens no flow; the tunnel counts its own errors

    def _note(self, packet: bytes, now: float) -> None:
        parsed = self._parse(packet)
        if parsed is None:
            return
        version, proto, off, end, frag = parsed
        if frag:
            return
        # Keys are stored as the reply will look: remote address first, remote port first.
        if version == 4:
            addrs = packet[16:20] + packet[12:16]
        else:
            addrs = packet[24:40] + packet[8:24]
        if proto in _PORT_PROTOS:
            if off + 4 > end:
                return
            key = (proto, addrs, packet[off + 2:off + 4] + packet[off:off + 2])
            timeout = self._tcp_timeout if proto == _TCP else self._other_timeout
        elif proto == _ICMP or proto == _ICMPV6:
            if off + 8 > end or packet[off] != _ECHO_REQUEST[proto]:
                return
            key = (proto, addrs, packet[off + 4:off + 6])
            timeout = self._other_timeout
        else:
            return
        flows = self._flows
        expiry = flows.get(key)
        if expiry is not None:
            # Rewriting on every packet would cost a dict write per packet; refreshing once half
            # the timeout has passed keeps idle expiry between timeout/2 and timeout.
            if expiry - now > timeout / 2:
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
