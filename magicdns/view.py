"""The network view: everything the resolver needs to know about a tailnet, as one frozen value.

A `DnsView` is what a node derives from its network map and what `magicdns serve --view` reads from
JSON (DESIGN.md section 2). It is validated once, here; everything downstream trusts it.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from .names import NameError_, normalize_domain, normalize_host_label
from .records import Record, RecordError, parse_record
from .upstream import Upstream, UpstreamError, parse_upstream

DEFAULT_DOMAIN = "tailnet"


class ViewError(ValueError):
    """A network view that cannot be used: the message says which field and why."""


@dataclass(frozen=True, slots=True)
class Host:
    """A node of the tailnet: its short name and every address it holds."""

    name: str
    addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    tags: tuple[str, ...] = ()
    online: bool = True


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """Resolver settings pushed by the control server (or read from the view file)."""

    nameservers: tuple[Upstream, ...] = ()
    routes: Mapping[str, tuple[Upstream, ...]] = field(default_factory=dict)
    search_domains: tuple[str, ...] = ()
    records: tuple[Record, ...] = ()
    # Plain upstreams that are well-known public resolvers go over their DoH endpoint (publicdns.py).
    upgrade_public_dns: bool = False


@dataclass(frozen=True, slots=True)
class DnsView:
    """One immutable snapshot of the tailnet as the resolver sees it."""

    domain: str = DEFAULT_DOMAIN
    self_host: Host | None = None
    peers: tuple[Host, ...] = ()
    dns: DnsSettings = field(default_factory=DnsSettings)
    version: int = 0

    @property
    def hosts(self) -> tuple[Host, ...]:
        """Self first, then the peers."""
        return ((self.self_host,) if self.self_host else ()) + self.peers

    def with_records(self, records: Iterable[Record], version: int) -> "DnsView":
        """A copy whose records are `records` (appended to the view's own) and whose version is `version`."""
        dns = DnsSettings(
            nameservers=self.dns.nameservers,
            routes=self.dns.routes,
            search_domains=self.dns.search_domains,
            records=self.dns.records + tuple(records),
            upgrade_public_dns=self.dns.upgrade_public_dns,
        )
        return DnsView(self.domain, self.self_host, self.peers, dns, version)

    def to_json(self) -> dict[str, Any]:
        """The JSON form of DESIGN.md section 2 (round-trips through `view_from_json`)."""

        def host(h: Host) -> dict[str, Any]:
            return {"name": h.name, "addresses": [str(a) for a in h.addresses],
                    "tags": list(h.tags), "online": h.online}

        return {
            "domain": self.domain,
            "self": host(self.self_host) if self.self_host else None,
            "peers": [host(p) for p in self.peers],
            "dns": {
                "nameservers": [u.spec for u in self.dns.nameservers],
                "routes": {d: [u.spec for u in ups] for d, ups in self.dns.routes.items()},
                "search_domains": list(self.dns.search_domains),
                "records": [r.to_json() for r in self.dns.records],
                **({"upgrade_public_dns": True} if self.dns.upgrade_public_dns else {}),
            },
            "version": self.version,
        }


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address from text; inet_pton is several times faster than ipaddress's own parser, which
    matters for views of 100,000 nodes."""
    try:
        if ":" in text:
            return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        raise ValueError(f"{text!r} is not an IP address") from None


def _host_from_json(obj: Any, where: str) -> Host:
    if not isinstance(obj, dict):
        raise ViewError(f"{where}: expected an object")
    try:
        name = normalize_host_label(str(obj.get("name", "")))
    except NameError_ as exc:
        raise ViewError(f"{where}.name: {exc}") from None
    addrs = obj.get("addresses", [])
    if not isinstance(addrs, list):
        raise ViewError(f"{where}.addresses: expected a list")
    try:
        parsed = tuple(map(parse_ip, map(str, addrs)))
    except ValueError:  # find which one, for the message (slow: only on bad input)
        for i, a in enumerate(addrs):
            try:
                parse_ip(str(a))
            except ValueError:
                raise ViewError(f"{where}.addresses[{i}]: {a!r} is not an IP address") from None
        raise
    tags = obj.get("tags", ())
    if not isinstance(tags, (list, tuple)):
        raise ViewError(f"{where}.tags: expected a list")
    return Host(name, parsed, tuple(map(str, tags)) if tags else (), bool(obj.get("online", True)))


def _upstreams(values: Any, where: str) -> tuple[Upstream, ...]:
    if not isinstance(values, list):
        raise ViewError(f"{where}: expected a list of resolvers")
    try:
        return tuple(parse_upstream(str(v)) for v in values)
    except UpstreamError as exc:
        raise ViewError(f"{where}: {exc}") from None


@contextmanager
def paused_gc() -> Iterator[None]:
    """Hold the cyclic garbage collector while building large acyclic structures.

    A 100,000-name view allocates a million objects, none in cycles; letting the collector scan
    them repeatedly more than doubled the build time.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def view_from_json(obj: Any) -> DnsView:
    """Validate and convert the JSON network view; raises `ViewError` naming the bad field."""
    with paused_gc():
        return _view_from_json(obj)


def _view_from_json(obj: Any) -> DnsView:
    if not isinstance(obj, dict):
        raise ViewError("the view must be a JSON object")
    try:
        domain = normalize_domain(str(obj.get("domain", DEFAULT_DOMAIN)))
    except NameError_ as exc:
        raise ViewError(f"domain: {exc}") from None
    self_obj = obj.get("self")
    self_host = _host_from_json(self_obj, "self") if self_obj else None
    peers_obj = obj.get("peers", [])
    if not isinstance(peers_obj, list):
        raise ViewError("peers: expected a list")
    peers = tuple(_host_from_json(p, f"peers[{i}]") for i, p in enumerate(peers_obj))
    dns_obj = obj.get("dns", {}) or {}
    if not isinstance(dns_obj, dict):
        raise ViewError("dns: expected an object")
    routes_obj = dns_obj.get("routes", {}) or {}
    if not isinstance(routes_obj, dict):
        raise ViewError("dns.routes: expected an object")
    routes: dict[str, tuple[Upstream, ...]] = {}
    for dom, ups in routes_obj.items():
        try:
            key = normalize_domain(str(dom))
        except NameError_ as exc:
            raise ViewError(f"dns.routes[{dom!r}]: {exc}") from None
        routes[key] = _upstreams(ups, f"dns.routes[{dom!r}]")
    records = []
    for i, r in enumerate(dns_obj.get("records", []) or []):
        if not isinstance(r, dict):
            raise ViewError(f"dns.records[{i}]: expected an object")
        try:
            records.append(parse_record(str(r.get("name", "")), str(r.get("type", "")),
                                        str(r.get("value", "")), r.get("ttl"), domain,
                                        override=bool(r.get("override", False))))
        except RecordError as exc:
            raise ViewError(f"dns.records[{i}]: {exc}") from None
    search = dns_obj.get("search_domains", []) or []
    try:
        search_t = tuple(normalize_domain(str(s)) for s in search)
    except NameError_ as exc:
        raise ViewError(f"dns.search_domains: {exc}") from None
    version = obj.get("version", 0)
    if not isinstance(version, int) or version < 0 or version > 0xFFFFFFFF:
        raise ViewError("version: expected an integer from 0 to 4294967295")
    upgrade = dns_obj.get("upgrade_public_dns", False)
    if not isinstance(upgrade, bool):
        raise ViewError("dns.upgrade_public_dns: expected true or false")
    settings = DnsSettings(_upstreams(dns_obj.get("nameservers", []) or [], "dns.nameservers"),
                           routes, search_t, tuple(records), upgrade)
    return DnsView(domain, self_host, peers, settings, version)


def load_view(path: str | Path) -> DnsView:
    """Read a view file; raises `ViewError` with the file name on any problem."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ViewError(f"{path}: {exc.strerror}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ViewError(f"{path}: not valid JSON: {exc}") from None
    try:
        return view_from_json(obj)
    except ViewError as exc:
        raise ViewError(f"{path}: {exc}") from None
