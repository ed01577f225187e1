"""The zone snapshot: a `DnsView` turned into lookup tables, built once per view and never mutated.

Building must stay cheap (a 100,000-name view in well under a second), so nothing per name is
computed here beyond dictionary entries: resource records are made lazily by `Zone.rrsets` and the
answer engine memoises finished wire replies per snapshot.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
from dataclasses import dataclass
from typing import Iterable

from dnslib import AAAA, NS, PTR, QTYPE, RR, SOA, A

from .names import is_subdomain
from .ranges import (RESOLVER_V4, RESOLVER_V6, TAILNET_V4, TAILNET_V6, V4_REVERSE_APEXES,  # noqa: F401
                     V6_REVERSE_APEX, in_tailnet)
from .records import SHADOWING_TYPES, Record
from .upstream import Upstream
from .view import DnsView, Host, paused_gc

log = logging.getLogger(__name__)

NODE_TTL = 300
APEX_TTL = 3600
NEGATIVE_TTL = 60  # SOA MINIMUM: how long resolvers may cache "no such name" (RFC 2308)



@dataclass(frozen=True, slots=True)
class LocalZone:
    """A zone we answer with authority: the tailnet domain, a reverse zone or a local-only route."""

    apex: str
    kind: str  # "tailnet", "reverse4", "reverse6", "local", or "exact" (one name outside them all)


@dataclass(frozen=True, slots=True)
class ForwardRoute:
    """Names under `suffix` go to `upstreams` ('' is the default route)."""

    suffix: str
    upstreams: tuple[Upstream, ...]
    allow_tailnet_answers: bool


class Zone:
    """Everything the answer engine needs to answer from one view; read-only after construction."""

    def __init__(self, view: DnsView, fallback_upstreams: tuple[Upstream, ...] = (),
                 resolver_addresses: tuple[str, ...] = (str(RESOLVER_V4), str(RESOLVER_V6))) -> None:
        with paused_gc():
            self._build(view, fallback_upstreams, resolver_addresses)

    def _build(self, view: DnsView, fallback_upstreams: tuple[Upstream, ...],
               resolver_addresses: tuple[str, ...]) -> None:
        self.view = view
        self.domain = view.domain
        self.serial = view.version & 0xFFFFFFFF
        self.warnings: list[str] = []
        self.ns_name = f"magicdns.{self.domain}"
        self.resolver_addresses = tuple(ipaddress.ip_address(a) for a in resolver_addresses)
        self.hosts: dict[str, Host] = {}
        self.addr_to_name: dict[int, str] = {}
        self._add_hosts(view.hosts)
        self.records: dict[str, list[Record]] = {}
        self.shadowed: set[str] = set()  # host names whose addresses an override record replaces
        self._add_records(view.dns.records)
        self.ents = self._empty_non_terminals()
        self.v4_sorted = sorted(k for k in self.addr_to_name if k < 1 << 32)
        self.v6_sorted = sorted(k - (1 << 32) for k in self.addr_to_name if k >= 1 << 32)
        self.routes: dict[str, LocalZone | ForwardRoute] = {}
        self.exact: dict[str, LocalZone] = {}  # filled once the routes are known
        self._add_routes(view, fallback_upstreams)
        self.max_route_labels = max((s.count(".") + 1 for s in self.routes), default=1)
        self.exact = self._exact_names()
        self.has_wildcards = any(name.startswith("*.") for name in self.records)
        # The last label of every name we answer for, in wire form: the first time a name under
        # one of our zones appears in a message, this is written out (compression only points
        # back), so a reply without any of these holds none of our names. chase.complete_chain's
        # cheap test.
        self.top_label_wires = frozenset(
            bytes((len(top),)) + top + b"\x00"
            for top in {apex.rsplit(".", 1)[-1].encode() for apex in [*self.local_apexes(), *self.exact]})

    # -- construction -------------------------------------------------------------------------

    def _add_hosts(self, hosts: Iterable[Host]) -> None:
        # Locals and a class test instead of the `version` property: this loop runs once per node
        # and address, 300,000 times for a 100,000-node view.
        by_name = self.hosts
        setdefault = self.addr_to_name.setdefault
        suffix = "." + self.domain
        v4 = ipaddress.IPv4Address
        for host in hosts:
            fqdn = host.name + suffix
            if fqdn in by_name:  # two nodes with one name: serve both, but say so
                prev = by_name[fqdn]
                self.warnings.append(f"two hosts named {fqdn}; serving the addresses of both")
                host = Host(host.name, prev.addresses + host.addresses, prev.tags, prev.online)
            by_name[fqdn] = host
            for addr in host.addresses:
                # One int key space for both families: v6 keys are offset past the v4 range.
                setdefault(int(addr) if addr.__class__ is v4 else int(addr) + (1 << 32), fqdn)

    def _add_records(self, records: Iterable[Record]) -> None:
        by_name: dict[str, list[Record]] = {}
        for rec in records:
            by_name.setdefault(rec.name, []).append(rec)
        for name, recs in by_name.items():
            if any(r.rtype == "CNAME" for r in recs) and len(recs) > 1:
                self.warnings.append(f"{name}: a CNAME cannot sit beside other records; serving the CNAME only")
                recs = [next(r for r in recs if r.rtype == "CNAME")]
            if name in self.hosts:
                clash = [r for r in recs if r.rtype in SHADOWING_TYPES]
                if clash and not all(r.override for r in clash):
                    self.warnings.append(f"{name}: records would shadow a node name; ignored "
                                         "(add them with override to shadow it)")
                    recs = [r for r in recs if r.rtype not in SHADOWING_TYPES]
                elif clash:
                    self.shadowed.add(name)
            if recs:
                self.records[name] = recs
        for w in self.warnings:
            log.warning("view %s: %s", self.serial, w)

    def _empty_non_terminals(self) -> set[str]:
        ents: set[str] = set()
        for name in self.records:
            labels = name.split(".")
            for i in range(1, len(labels)):
                parent = ".".join(labels[i:])
                if parent in self.records or parent in self.hosts:
                    continue
                ents.add(parent)
        return ents

    def _add_routes(self, view: DnsView, fallback: tuple[Upstream, ...]) -> None:
        self.routes[self.domain] = LocalZone(self.domain, "tailnet")
        for apex in V4_REVERSE_APEXES:
            self.routes[apex] = LocalZone(apex, "reverse4")
        self.routes[V6_REVERSE_APEX] = LocalZone(V6_REVERSE_APEX, "reverse6")
        for suffix, ups in view.dns.routes.items():
            if not ups:
                if not is_subdomain(suffix, self.domain):
                    self.routes[suffix] = LocalZone(suffix, "local")
                continue
            allow = any(u.host and in_tailnet(ipaddress.ip_address(u.host)) for u in ups)  # by name: not in the tailnet
            self.routes[suffix] = ForwardRoute(suffix, ups, allow)
        default = view.dns.nameservers or fallback
        self.default_route = ForwardRoute("", default, False) if default else None

    def _exact_names(self) -> dict[str, LocalZone]:
        """Record owners outside every zone we serve ('outside.example.'): served locally for that
        exact name, as Tailscale's extra records are, while the rest of the domain (names below it
        too) still follows its route."""
        exact = {}
        for name in self.records:
            if not isinstance(self.route_for(name)[0], LocalZone):
                exact[name] = LocalZone(name, "exact")
        return exact

    def local_apexes(self) -> list[str]:
        """The apexes of every zone we answer with authority (the tailnet, reverse and local routes)."""
        return [suffix for suffix, target in self.routes.items() if isinstance(target, LocalZone)]

    # -- lookups ------------------------------------------------------------------------------

    def route_for(self, name: str) -> tuple[LocalZone | ForwardRoute | None, str]:
        """The most specific route for `name` and the suffix it matched."""
        exact = self.exact
        if exact and name in exact:
            return exact[name], name
        return self.route_under(name)

    def route_under(self, name: str) -> tuple[LocalZone | ForwardRoute | None, str]:
        """The most specific route among the suffixes of `name`, exact names aside: the route of
        `name` itself when it is not an exact name, and of every name below it that is neither an
        exact name nor a route's suffix."""
        labels = name.split(".") if name else []
        start = max(0, len(labels) - self.max_route_labels)
        for i in range(start, len(labels)):
            suffix = ".".join(labels[i:])
            target = self.routes.get(suffix)
            if target is not None:
                return target, suffix
        return self.default_route, ""

    def local_zone_of(self, name: str) -> LocalZone | None:
        target, _ = self.route_for(name)
        return target if isinstance(target, LocalZone) else None

    def host_for_short_name(self, name: str) -> str | None:
        """'my-server' -> 'my-server.tailnet' when that node exists (short names of this tailnet)."""
        if "." in name or not name:
            return None
        fqdn = f"{name}.{self.domain}"
        return fqdn if fqdn in self.hosts or fqdn in self.records else None

    def soa(self, apex: str) -> RR:
        return RR(apex + ".", QTYPE.SOA, ttl=NEGATIVE_TTL, rdata=SOA(
            self.ns_name + ".", f"hostmaster.{self.domain}.",
            (self.serial, 10800, 3600, 604800, NEGATIVE_TTL)))

    def exists(self, name: str, zone: LocalZone) -> bool:
        """True when `name` owns data or is an empty non-terminal (so NODATA, not NXDOMAIN)."""
        if name == zone.apex or name in self.records or name in self.ents:
            return True
        if zone.kind == "tailnet":
            return name in self.hosts or name == self.ns_name
        if zone.kind in ("reverse4", "reverse6"):
            return self._reverse_exists(name, zone)
        return False

    def rrsets(self, name: str, zone: LocalZone) -> dict[int, list[RR]]:
        """Every RRset owned by `name` (empty when it owns none)."""
        out: dict[int, list[RR]] = {}
        owner = name + "."
        if name == zone.apex and zone.kind != "exact":  # one name is no zone: no SOA/NS of its own
            out[QTYPE.SOA] = [self.soa(zone.apex)]
            out[QTYPE.NS] = [RR(owner, QTYPE.NS, ttl=APEX_TTL, rdata=NS(self.ns_name + "."))]
        host = self.hosts.get(name) if zone.kind == "tailnet" else None
        if host is not None and name not in self.shadowed:
            for addr in host.addresses:
                if addr.version == 4:
                    out.setdefault(QTYPE.A, []).append(RR(owner, QTYPE.A, ttl=NODE_TTL, rdata=A(str(addr))))
                else:
                    out.setdefault(QTYPE.AAAA, []).append(RR(owner, QTYPE.AAAA, ttl=NODE_TTL,
                                                             rdata=AAAA(str(addr))))
        elif name == self.ns_name and zone.kind == "tailnet":
            for addr in self.resolver_addresses:
                qt, cls = (QTYPE.A, A) if addr.version == 4 else (QTYPE.AAAA, AAAA)
                out.setdefault(qt, []).append(RR(owner, qt, ttl=APEX_TTL, rdata=cls(str(addr))))
        if zone.kind in ("reverse4", "reverse6"):
            target = self._ptr_target(name, zone)
            if target is not None:
                out[QTYPE.PTR] = [RR(owner, QTYPE.PTR, ttl=NODE_TTL, rdata=PTR(target + "."))]
        for rec in self.records.get(name, ()):
            out.setdefault(rec.qtype, []).append(RR(owner, rec.qtype, ttl=rec.ttl, rdata=rec.rdata))
        return out

    def wildcard_for(self, name: str, zone: LocalZone) -> str | None:
        """RFC 4592: the wildcard `*.<closest encloser>` that synthesises `name`, if there is one."""
        labels = name.split(".")
        for i in range(1, len(labels)):
            ancestor = ".".join(labels[i:])
            if self.exists(ancestor, zone) or ancestor == zone.apex:
                candidate = "*." + ancestor
                return candidate if candidate in self.records else None
            if not is_subdomain(ancestor, zone.apex):
                break
        return None

    # -- reverse zones ------------------------------------------------------------------------

    def _reverse_key(self, name: str, zone: LocalZone) -> tuple[int, int] | None:
        """(prefix value, number of known bits) of a reverse name, or None if it is not one."""
        labels = name.split(".")
        if zone.kind == "reverse4":
            parts = labels[:-2]  # drop in-addr.arpa
            if len(parts) > 4 or not all(p.isdigit() and int(p) < 256 and str(int(p)) == p for p in parts):
                return None
            value = 0
            for p in reversed(parts):
                value = value << 8 | int(p)
            return value, 8 * len(parts)
        nibbles = labels[:-2]  # drop ip6.arpa
        if len(nibbles) > 32 or not all(len(n) == 1 and n in "0123456789abcdef" for n in nibbles):
            return None
        value = int("".join(reversed(nibbles)), 16) if nibbles else 0
        return value, 4 * len(nibbles)

    def _ptr_target(self, name: str, zone: LocalZone) -> str | None:
        key = self._reverse_key(name, zone)
        if key is None:
            return None
        value, bits = key
        if zone.kind == "reverse4" and bits == 32:
            return self.addr_to_name.get(value)
        if zone.kind == "reverse6" and bits == 128:
            return self.addr_to_name.get(value + (1 << 32))
        return None

    def _reverse_exists(self, name: str, zone: LocalZone) -> bool:
        key = self._reverse_key(name, zone)
        if key is None:
            return False
        value, bits = key
        width = 32 if zone.kind == "reverse4" else 128
        table = self.v4_sorted if zone.kind == "reverse4" else self.v6_sorted
        lo = value << (width - bits)
        hi = lo + (1 << (width - bits))
        i = bisect.bisect_left(table, lo)
        return i < len(table) and table[i] < hi
