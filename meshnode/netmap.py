"""The network map a node receives from the control server, and its conversion to a `DnsView`.

A `NetMap` is one immutable snapshot: the node itself, the peers the ACL policy lets it see, the
DNS settings and records, and the packet filter for this node. The control server builds it, the
client library (`meshnode.control.client`) rebuilds it from the streamed frames, and the node daemon
hands it to the WireGuard engine, the router and (through `netmap_to_view`) the resolver.

JSON form (what `NetMap.to_json` writes and `NetMap.from_json` reads; a node keeps it in its state dir):

    {"version": 7, "domain": "tailnet",
     "self": {MapNode}, "peers": [{MapNode}, ...],
     "dns": {"nameservers": ["1.1.1.1"], "routes": {"corp.example": ["10.0.0.53"]},
             "search_domains": ["tailnet"],
             "records": [{"name": "web.tailnet", "type": "A", "value": "10.1.1.1", "ttl": 300}]},
     "packet_filter": [{rule}, ...], "derp": {}, "collected_at": 1700000000.0,
     "derp_map": {"regions": [{"region_id": 999, "code": "control", "name": "Control server",
                               "nodes": [{"name": "999a", "host": "", "port": 8080, "stun_port": 3478,
                                          "tls": false}]}]}}      (derp_map: only when relays are configured)

A MapNode: {"id": 3, "name": "laptop", "fqdn": "laptop.tailnet", "user": "alice",
            "addresses": ["100.64.0.3", "fd7a:115c:a1e0::3"], "node_key": "<base64 Curve25519>",
            "endpoints": ["192.0.2.1:41641"], "allowed_ips": ["100.64.0.3/32", "fd7a:115c:a1e0::3/128"],
            "advertised_routes": ["10.0.0.0/24"], "approved_routes": ["10.0.0.0/24"],
            "exit_node": false, "advertises_exit_node": false, "tags": ["tag:server"],
            "online": true, "os": "linux", "last_seen": 1700000000.0, "ephemeral": false}
(empty lists, false flags and a null last_seen may be omitted; readers default them.)

Packet-filter rules are carried as the JSON the policy engine produces for this node (Tailscale's
FilterRule shape); the map does not interpret them.
"""

from __future__ import annotations

import gc
import ipaddress
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterator, Mapping

from magicdns.records import Record, RecordError, parse_record
from magicdns.upstream import UpstreamError, parse_upstream
from magicdns.view import DnsSettings, DnsView, Host

from .derp.derpmap import RelayMap, RelayMapError



class NetMapError(ValueError):
    """A network map (JSON) that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class MapNode:
    """One node as it appears in a map: itself or a peer."""

    id: int
    name: str                      # short host label, e.g. "laptop"
    fqdn: str                      # "laptop.tailnet"
    user: str
    addresses: tuple[str, ...]     # IPv4 first, then IPv6, as text
    node_key: str                  # WireGuard public key, standard base64 (44 chars)
    endpoints: tuple[str, ...] = ()        # "ip:port" / "[v6]:port" the node reported
    allowed_ips: tuple[str, ...] = ()      # CIDRs to route to this peer (addresses + approved routes)
    advertised_routes: tuple[str, ...] = ()
    approved_routes: tuple[str, ...] = ()
    exit_node: bool = False                # approved as exit node (0.0.0.0/0 and ::/0 usable)
    advertises_exit_node: bool = False
    tags: tuple[str, ...] = ()
    online: bool = False
    os: str = ""
    last_seen: float | None = None         # unix seconds; None when never seen
    ephemeral: bool = False
    disco_key: str = ""                    # disco public key of the node's current run (base64)
    key_signature: str = ""                # Tailnet Lock signature of node_key (base64), if any
    lock_key: str = ""                     # the node's Tailnet Lock public key (tlpub:HEX), if it reported one
    home_region: int | None = None         # the relay (DERP) region the node homes on, if known

    def to_json(self, domain: str | None = None) -> dict[str, Any]:
        """JSON form. Empty lists, false flags and a None last_seen are left out, and so are `fqdn`
        and `allowed_ips` when `domain` is given and they are what `from_json` would derive: a 10k-peer
        map is then ~half the size, and parses in half the time on the node."""
        out: dict[str, Any] = {"id": self.id, "name": self.name}
        if domain is None or self.fqdn != f"{self.name}.{domain}":
            out["fqdn"] = self.fqdn
        out.update(user=self.user, addresses=list(self.addresses), node_key=self.node_key)
        if domain is None or self.allowed_ips != default_allowed_ips(self.addresses, self.approved_routes,
                                                                     self.exit_node):
            out["allowed_ips"] = list(self.allowed_ips)
        out["online"] = self.online
        if self.os:
            out["os"] = self.os
        if self.disco_key:
            out["disco_key"] = self.disco_key
        if self.key_signature:
            out["key_signature"] = self.key_signature
        if self.lock_key:
            out["lock_key"] = self.lock_key
        if self.home_region is not None:
            out["home_region"] = self.home_region
        for key, value in (("endpoints", self.endpoints), ("advertised_routes", self.advertised_routes),
                           ("approved_routes", self.approved_routes), ("tags", self.tags)):
            if value:
                out[key] = list(value)
        for key, flag in (("exit_node", self.exit_node), ("advertises_exit_node", self.advertises_exit_node),
                          ("ephemeral", self.ephemeral)):
            if flag:
                out[key] = True
        if self.last_seen is not None:
            out["last_seen"] = self.last_seen
        return out

    @staticmethod
    def from_json(obj: Any, domain: str | None = None) -> "MapNode":
        """Read one node; raises `NetMapError` on a missing or mistyped field. `domain` fills in an
        omitted `fqdn`."""
        if not isinstance(obj, dict):
            raise NetMapError("node: expected an object")
        try:
            name = str(obj["name"])
            fqdn = obj.get("fqdn")
            if fqdn is None:
                if domain is None:
                    raise KeyError("fqdn")
                fqdn = f"{name}.{domain}"
            addresses = tuple(obj["addresses"])
            approved = tuple(obj.get("approved_routes") or ())
            exit_node = bool(obj.get("exit_node", False))
            allowed = obj.get("allowed_ips")
            last_seen = obj.get("last_seen")
            home = obj.get("home_region")
            if home is not None and (isinstance(home, bool) or not isinstance(home, int) or home <= 0):
                raise NetMapError(f"node {obj.get('id', '?')}: home_region must be a positive integer")
            return MapNode(
                int(obj["id"]), name, str(fqdn), str(obj.get("user", "")), addresses, str(obj["node_key"]),
                tuple(obj.get("endpoints") or ()),
                tuple(allowed) if allowed is not None else default_allowed_ips(addresses, approved, exit_node),
                tuple(obj.get("advertised_routes") or ()), approved, exit_node,
                bool(obj.get("advertises_exit_node", False)), tuple(obj.get("tags") or ()),
                bool(obj.get("online", False)), str(obj.get("os", "")),
                float(last_seen) if last_seen is not None else None, bool(obj.get("ephemeral", False)),
                str(obj.get("disco_key") or ""), str(obj.get("key_signature") or ""),
                str(obj.get("lock_key") or ""), home)
        except KeyError as exc:
            raise NetMapError(f"node {obj.get('id', '?')}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise NetMapError(f"node {obj.get('id', '?')}: {exc}") from None


_EXIT_ROUTES = ("0.0.0.0/0", "::/0")


def default_allowed_ips(addresses: tuple[str, ...], approved_routes: tuple[str, ...],
                        exit_node: bool) -> tuple[str, ...]:
    """What a peer's WireGuard AllowedIPs are: its addresses, its approved routes, and the default
    routes when it is an approved exit node (the node picks whether to use them)."""
    own = tuple(f"{a}/128" if ":" in a else f"{a}/32" for a in addresses)
    return own + approved_routes + (_EXIT_ROUTES if exit_node else ())


@dataclass(frozen=True, slots=True)
class DnsConfig:
    """DNS settings of the tailnet as pushed to nodes; resolvers are `HOST[:PORT]` text."""

    nameservers: tuple[str, ...] = ()
    routes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # split DNS; [] = answer locally
    search_domains: tuple[str, ...] = ()
    records: tuple[Record, ...] = ()
    upgrade_public_dns: bool = False  # public resolvers over their DoH endpoint (magicdns/publicdns.py)

    def to_json(self) -> dict[str, Any]:
        return {"nameservers": list(self.nameservers),
                "routes": {d: list(r) for d, r in self.routes.items()},
                "search_domains": list(self.search_domains),
                "records": [r.to_json() for r in self.records],
                **({"upgrade_public_dns": True} if self.upgrade_public_dns else {})}

    @staticmethod
    def from_json(obj: Any, domain: str, known: dict[tuple, Record] | None = None) -> "DnsConfig":
        """Read the `dns` object. `known` (record_key -> Record) holds records parsed before: they are
        reused, and the ones parsed now are added (parsing a record costs ~0.1 ms, dnslib's zone
        lexer, and a DNS delta carries every record of the tailnet, usually all but one unchanged)."""
        if not isinstance(obj, dict):
            raise NetMapError("dns: expected an object")
        routes = obj.get("routes") or {}
        if not isinstance(routes, dict):
            raise NetMapError("dns.routes: expected an object")
        records = []
        for i, r in enumerate(obj.get("records") or ()):
            if not isinstance(r, dict):
                raise NetMapError(f"dns.records[{i}]: expected an object")
            key = record_key(r, domain) if known is not None else None
            rec = known.get(key) if key is not None else None  # type: ignore[union-attr]
            if rec is None:
                try:
                    # Names are absolute in the map; the trailing dot keeps parse_record from re-qualifying.
                    name = str(r.get("name", ""))
                    rec = parse_record(name if name.endswith(".") else name + ".",
                                       str(r.get("type", "")), str(r.get("value", "")),
                                       r.get("ttl"), domain, bool(r.get("override", False)))
                except RecordError as exc:
                    raise NetMapError(f"dns.records[{i}]: {exc}") from None
                if key is not None:
                    known[key] = rec  # type: ignore[index]
            records.append(rec)
        return DnsConfig(tuple(str(n) for n in obj.get("nameservers") or ()),
                         MappingProxyType({str(d): tuple(str(u) for u in ups) for d, ups in routes.items()}),
                         tuple(str(s) for s in obj.get("search_domains") or ()),
                         tuple(records), obj.get("upgrade_public_dns") is True)


def record_key(obj: dict[str, Any], domain: str) -> tuple | None:
    """What a record's JSON says, as a key for reusing its parsed `Record`; None (parse it, no reuse)
    unless every field has its usual type, so that no two JSON texts that parse differently share a
    key (1 == True in Python)."""
    name, rtype, value, ttl, override = (obj.get("name"), obj.get("type"), obj.get("value"), obj.get("ttl"),
                                         obj.get("override", False))
    if (type(name) is str and type(rtype) is str and type(value) is str
            and (ttl is None or type(ttl) is int) and type(override) is bool):
        return (domain, name, rtype, value, ttl, override)
    return None


@dataclass(frozen=True, slots=True)
class NetMap:
    """Everything one node knows about its tailnet, as of `version` (monotonic; the SOA serial)."""

    version: int
    domain: str
    self_node: MapNode
    peers: tuple[MapNode, ...] = ()
    dns: DnsConfig = field(default_factory=DnsConfig)
    packet_filter: tuple[Mapping[str, Any], ...] = ()
    derp: Mapping[str, Any] = field(default_factory=dict)  # relay map placeholder; empty until relays exist
    derp_map: RelayMap | None = None       # relay regions and servers (meshnode.derp.derpmap), if any
    tailnet_ca: str = ""  # PEM of the tailnet CA (control/ca.py); "" from servers without one
    tka_head: str | None = None            # the control server's Tailnet Lock head; None: lock off
    flow_logs: bool = False                # the admin turned connection logs on (`settings flow-logs`)

    def peer_by_name(self, name: str) -> MapNode | None:
        """The peer whose short name or FQDN is `name` (case-insensitive), if visible."""
        key = name.lower().rstrip(".")
        for p in self.peers:
            if p.name == key or p.fqdn == key:
                return p
        return None

    def to_json(self, peers: bool = True) -> dict[str, Any]:
        """JSON form (`peers=False`: an empty peer list, for JsonBuilder to fill)."""
        return {"version": self.version, "domain": self.domain,
                "self": self.self_node.to_json(self.domain),
                "peers": [p.to_json(self.domain) for p in self.peers] if peers else [],
                "dns": self.dns.to_json(),
                "packet_filter": [dict(r) for r in self.packet_filter],
                "derp": dict(self.derp),
                **({"derp_map": self.derp_map.to_json()} if self.derp_map is not None else {}),
                **({"tailnet_ca": self.tailnet_ca} if self.tailnet_ca else {}),
                **({"tka_head": self.tka_head} if self.tka_head is not None else {}),
                **({"flow_logs": True} if self.flow_logs else {})}

    @staticmethod
    def from_json(obj: Any) -> "NetMap":
        """Read a map as written by `to_json`; raises `NetMapError` naming the bad field."""
        if not isinstance(obj, dict):
            raise NetMapError("the network map must be a JSON object")
        try:
            version = int(obj["version"])
            domain = str(obj["domain"])
            self_obj = obj["self"]
        except KeyError as exc:
            raise NetMapError(f"missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise NetMapError(f"version: {exc}") from None
        peers_obj = obj.get("peers") or []
        if not isinstance(peers_obj, list):
            raise NetMapError("peers: expected a list")
        pf = obj.get("packet_filter") or []
        if not isinstance(pf, list):
            raise NetMapError("packet_filter: expected a list")
        try:
            derp_map = RelayMap.from_json(obj["derp_map"]) if obj.get("derp_map") is not None else None
        except RelayMapError as exc:
            raise NetMapError(str(exc)) from None
        with gc_paused(len(peers_obj)):
            peers = tuple([MapNode.from_json(p, domain) for p in peers_obj])
        return NetMap(version, domain, MapNode.from_json(self_obj, domain), peers,
                      DnsConfig.from_json(obj.get("dns") or {}, domain),
                      tuple(MappingProxyType(r) for r in pf),
                      MappingProxyType(dict(obj.get("derp") or {})), derp_map, _ca_text(obj.get("tailnet_ca")),
                      str(obj["tka_head"]) if obj.get("tka_head") else None, bool(obj.get("flow_logs")))


class JsonBuilder:
    """`NetMap.to_json` that remembers the JSON of every peer it wrote: when the next map reuses the
    same `MapNode` objects (as `MapAssembler` does for peers a delta did not touch), only the changed
    peers are written again (the node daemon saves every map it applies; a policy change or a record
    reaches every node). The dicts it returns share the peers' dicts with the next call's: read them,
    never change them. One builder per node; not thread-safe."""

    def __init__(self) -> None:
        self._peers: dict[int, tuple[MapNode, dict[str, Any]]] = {}
        self._domain: str | None = None

    def build(self, netmap: NetMap) -> dict[str, Any]:
        """What `netmap.to_json()` gives (equal, not a copy)."""
        cache = self._peers if netmap.domain == self._domain else {}
        fresh: dict[int, tuple[MapNode, dict[str, Any]]] = {}
        peers = []
        for p in netmap.peers:
            hit = cache.get(p.id)
            if hit is None or hit[0] is not p:
                hit = (p, p.to_json(netmap.domain))
            fresh[p.id] = hit
            peers.append(hit[1])
        self._peers, self._domain = fresh, netmap.domain
        out = netmap.to_json(peers=False)
        out["peers"] = peers
        return out


def _ca_text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or (value and "-----BEGIN CERTIFICATE-----" not in value):
        raise NetMapError("tailnet_ca: expected a PEM certificate")
    return value


@contextmanager
def gc_paused(count: int) -> Iterator[None]:
    """Pause the cyclic GC while decoding or building a big map (`count` objects; no-op under 1000):
    the ~100k young objects of a 10k-peer map
    trigger repeated full collections that walk the whole heap and can double the build time.
    Nothing built here forms cycles, so nothing is lost by collecting later."""
    if count < 1000 or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # inet_pton + packed bytes is ~4x faster than parsing the text in `ipaddress`, which matters
    # for 20,000 addresses per map (the view of a 10k-node tailnet must build in well under 100 ms).
    try:
        if ":" in text:
            return ipaddress.IPv6Address(socket.inet_pton(socket.AF_INET6, text))
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError, TypeError):
        raise NetMapError(f"{text!r} is not an IP address") from None


def _host(node: MapNode) -> Host:
    return Host(node.name, tuple([_address(a) for a in node.addresses]), node.tags, node.online)


def netmap_to_view(netmap: NetMap) -> DnsView:
    """The resolver's view of a map: self and visible peers as hosts, DNS settings, records.

    Records keep their `override` flags. The version is the map version (the SOA serial), clamped to
    32 bits as DNS requires. Raises `NetMapError` if an address or resolver in the map is invalid.
    """
    return ViewBuilder().build(netmap)


class ViewBuilder:
    """`netmap_to_view` that remembers the `Host` of every peer it converted: when the next map
    reuses the same `MapNode` objects (as `MapAssembler` does for peers a delta did not touch), only
    the changed peers are converted again. One builder per node; not thread-safe."""

    def __init__(self) -> None:
        self._hosts: dict[int, tuple[MapNode, Host]] = {}

    def build(self, netmap: NetMap) -> DnsView:
        """The view of `netmap` (see `netmap_to_view`)."""
        cache = self._hosts
        fresh: dict[int, tuple[MapNode, Host]] = {}
        hosts = []
        with gc_paused(len(netmap.peers)):
            for p in netmap.peers:
                hit = cache.get(p.id)
                if hit is None or hit[0] is not p:
                    hit = (p, _host(p))
                fresh[p.id] = hit
                hosts.append(hit[1])
        self._hosts = fresh
        return self._view(netmap, tuple(hosts))

    @staticmethod
    def _view(netmap: NetMap, peers: tuple[Host, ...]) -> DnsView:
        try:
            nameservers = tuple(parse_upstream(s) for s in netmap.dns.nameservers)
            routes = {d: tuple(parse_upstream(s) for s in ups) for d, ups in netmap.dns.routes.items()}
        except UpstreamError as exc:
            raise NetMapError(f"dns: {exc}") from None
        settings = DnsSettings(nameservers, routes, netmap.dns.search_domains, netmap.dns.records,
                               netmap.dns.upgrade_public_dns)
        return DnsView(netmap.domain, _host(netmap.self_node), peers, settings, netmap.version & 0xFFFFFFFF)
