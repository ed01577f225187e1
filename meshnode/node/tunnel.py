"""The node's WireGuard data plane (`meshnode daemon --tun NAME`): a `meshnode.wg` device whose
peers, addresses and routes follow the network map.

`peer_configs` and `self_interfaces` are pure (map in, WireGuard config out); `Tunnel` does the I/O.
Every call that touches netlink runs in a worker thread: pyroute2's synchronous API runs its own
event loop and must stay off the daemon's.

The map's packet filter (`TunnelFilter`) checks every packet arriving from the tunnel and tracks the
connections this node opens, so that their replies pass; new rules replace the old ones on the
device's receive thread, keeping the tracked connections.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import ipaddress
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from magicdns.ranges import TAILNET_RANGES

from ..netmap import MapNode, NetMap

log = logging.getLogger("meshnode.node.tunnel")

DEFAULT_PORT = 41641
IFF_UP = 0x1
KEEPALIVE = 25  # seconds: keeps NAT mappings open, as Tailscale does
_EXIT_ROUTES = frozenset({"0.0.0.0/0", "::/0"})

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class TunnelError(RuntimeError):
    """The tunnel could not be created or configured; the message says why."""


# Texts parsed once per process, not once per map: every peer's allowed IPs and endpoints were
# parsed again on each map applied (~40 us a peer with the ipaddress module), though a delta
# changes one peer's, or none. The parsed values are immutable; the caches are bounded.
@functools.lru_cache(maxsize=1 << 16)
def _network(cidr: str) -> Any:
    return ipaddress.ip_network(cidr, strict=False)


@functools.lru_cache(maxsize=1 << 16)
def _parsed_endpoint(text: str) -> tuple[str, int, Any] | None:
    from ..wg.config import parse_endpoint
    try:
        host, port = parse_endpoint(text)
        return host, port, ipaddress.ip_address(host)
    except ValueError:
        return None


def _endpoint(texts: tuple[str, ...], tunneled: tuple[Any, ...] = ()) -> tuple[str, int] | None:
    """The first usable endpoint, preferring one outside the subnet routes we send into the tunnel:
    a subnet router reports its address on the subnet too, and WireGuard's own UDP to it would
    loop into the tunnel."""
    first = None
    for text in texts:
        parsed = _parsed_endpoint(text) if isinstance(text, str) else None
        if parsed is None:
            continue
        host, port, ip = parsed
        if not any(ip in net for net in tunneled):
            return host, port
        first = first or (host, port)
    return first


def candidate_order(texts: tuple[str, ...], tunneled: tuple[Any, ...] = ()) -> list[tuple[str, int]]:
    """A peer's reported endpoints as path candidates, in the order to guess before any answers:
    as reported, except that those inside subnet routes we send into the tunnel come last (their
    UDP would loop into the tunnel). Unparsable ones are left out."""
    from ..paths import parse_endpoint
    outside, inside = [], []
    for text in texts:
        try:
            ep = parse_endpoint(text)
        except ValueError:
            continue
        ip = ipaddress.ip_address(ep[0])
        (inside if any(ip in net for net in tunneled) else outside).append(ep)
    return outside + inside


def tunneled_subnets(configs: list[Any]) -> tuple[Any, ...]:
    """The subnet routes (not host routes, not default routes) the configs send into the tunnel."""
    return tuple(net for c in configs for net in c.allowed_ips
                 if 0 < net.prefixlen < net.max_prefixlen)


HOME_FIRST = 3.0        # seconds after the first map with a relay map before measuring the regions
HOME_INTERVAL = 60.0    # seconds between measurements (Tailscale's netcheck runs every 20-26 s)


def relay_choice(netmap: NetMap, login_server: str = "") -> tuple[int, list[str]] | None:
    """(region id, server URLs) of the relay region to home on, from the map's relay map (the
    first region, servers in the map's order), or None when the map has no relay."""
    derp_map = getattr(netmap, "derp_map", None)
    regions = getattr(derp_map, "regions", ()) if derp_map is not None else ()
    for region in regions:
        urls = []
        for node in getattr(region, "nodes", ()):
            try:
                urls.append(node.url(login_server))
            except (TypeError, ValueError):
                continue
        if urls:
            return int(region.region_id), urls
    return None


def relay_regions(netmap: NetMap, login_server: str = "") -> dict[int, list[str]]:
    """Every region of the map's relay map with its server URLs (regions without usable ones left
    out): where peers that home elsewhere are reached."""
    derp_map = getattr(netmap, "derp_map", None)
    out: dict[int, list[str]] = {}
    for region in getattr(derp_map, "regions", ()) if derp_map is not None else ():
        urls = []
        for node in getattr(region, "nodes", ()):
            try:
                urls.append(node.url(login_server))
            except (TypeError, ValueError):
                continue
        if urls:
            out[int(region.region_id)] = urls
    return out


def stun_servers(netmap: NetMap, login_server: str = "", region: int | None = None) -> list[tuple[str, int]]:
    """(host, port) of the STUN servers of the relay region we home on (`region`, or the first one
    when None; hosts may be names)."""
    from urllib.parse import urlsplit
    derp_map = getattr(netmap, "derp_map", None)
    chosen = relay_choice(netmap, login_server) if region is None else (region, [])
    if derp_map is None or chosen is None:
        return []
    out = []
    for region in getattr(derp_map, "regions", ()):
        if int(region.region_id) != chosen[0]:
            continue
        for node in region.nodes:
            port = int(getattr(node, "stun_port", -1))
            host = getattr(node, "ipv4", "") or node.host or (urlsplit(login_server).hostname or "")
            if port > 0 and host:
                out.append((host, port))
    return out


def _resolve(servers: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Names to addresses (blocking); unresolvable ones are left out."""
    import socket
    out = []
    for host, port in servers:
        try:
            ipaddress.ip_address(host)
            out.append((host, port))
            continue
        except ValueError:
            pass
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            log.warning("tunnel: STUN server %s: %s", host, exc)
            continue
        out.append((str(info[0][4][0]), port))
    return out


def peer_configs(netmap: NetMap, exit_node: str = "", accept_routes: bool = False) -> list[Any]:
    """One WireGuard peer per map peer: its node key, first usable endpoint and allowed IPs.

    A peer's default routes (an approved exit node) are only taken for the exit node the user
    chose: two peers claiming 0.0.0.0/0 would otherwise fight over all traffic. Its subnet routes
    are only taken with `accept_routes` (`up --accept-routes`), as with Tailscale.
    """
    return PeerConfigBuilder().build(netmap, exit_node, accept_routes)


class PeerConfigBuilder:
    """`peer_configs` that remembers what each peer gave: when the next map reuses the same
    `MapNode` objects (as `MapAssembler` does for peers a delta did not touch), only the changed
    peers are converted again (an endpoint change seen by a node with 9,999 peers cost it ~0.15 s
    of conversions). The PeerConfigs it returns are immutable and may be the previous call's.
    One builder per tunnel; not thread-safe."""

    def __init__(self) -> None:
        # peer id -> (the MapNode, exit_node, accept_routes, its parts or None: skipped, its config)
        self._peers: dict[int, tuple[MapNode, str, bool, _Parts | None, Any]] = {}
        self._tunneled: tuple[Any, ...] = ()

    def build(self, netmap: NetMap, exit_node: str = "", accept_routes: bool = False) -> list[Any]:
        from ..wg.peer import PeerConfig
        cache = self._peers
        fresh: dict[int, tuple[MapNode, str, bool, _Parts | None, Any]] = {}
        entries = []
        subnets: list[Any] = []  # accepted subnet routes (of every peer): endpoints there would loop
        for p in netmap.peers:
            hit = cache.get(p.id)
            if hit is None or hit[0] is not p or hit[1] != exit_node or hit[2] != accept_routes:
                hit = (p, exit_node, accept_routes, _peer_parts(p, exit_node, accept_routes), None)
            fresh[p.id] = hit
            entries.append(hit)
            if hit[3] is not None:
                subnets.extend(hit[3][3])
        tunneled = tuple(subnets)
        same_tunneled = tunneled == self._tunneled
        out = []
        for i, (p, ex, acc, parts, config) in enumerate(entries):
            if parts is None:
                continue
            if config is None or not same_tunneled:
                endpoints, key, allowed, _ = parts
                config = PeerConfig(public_key=key, endpoint=_endpoint(endpoints, tunneled), allowed_ips=allowed,
                                    persistent_keepalive=KEEPALIVE)
                fresh[p.id] = (p, ex, acc, parts, config)
            out.append(config)
        self._peers, self._tunneled = fresh, tunneled
        return out


# (endpoint texts, 32-byte key, allowed networks, the accepted subnet routes among them)
_Parts = tuple[tuple[str, ...], bytes, tuple[Any, ...], tuple[Any, ...]]


def _peer_parts(p: MapNode, exit_node: str, accept_routes: bool) -> _Parts | None:
    """What `peer_configs` takes from one peer; None (with a warning) for an unusable key."""
    try:
        key = base64.b64decode(p.node_key, validate=True)
    except (binascii.Error, ValueError):
        log.warning("tunnel: peer %s has an unusable node key; skipped", p.fqdn)
        return None
    if len(key) != 32:
        log.warning("tunnel: peer %s has a %d-byte node key; skipped", p.fqdn, len(key))
        return None
    chosen = bool(exit_node) and exit_node in (p.name, p.fqdn, *p.addresses)
    own = {f"{a}/{128 if ':' in a else 32}" for a in p.addresses}
    allowed = []
    subnets = []
    for cidr in p.allowed_ips:
        if cidr in _EXIT_ROUTES and not chosen:
            continue
        if cidr not in own and cidr not in _EXIT_ROUTES and not accept_routes:
            continue
        try:
            allowed.append(_network(cidr))
        except (ValueError, TypeError):   # TypeError: not text (unhashable for the cache)
            log.warning("tunnel: peer %s: bad allowed IP %r ignored", p.fqdn, cidr)
            continue
        if cidr not in own and cidr not in _EXIT_ROUTES:
            subnets.append(allowed[-1])
    return p.endpoints, key, tuple(allowed), tuple(subnets)


def self_interfaces(netmap: NetMap) -> tuple[Interface, ...]:
    """This node's tailnet addresses as host routes (/32, /128) on the TUN."""
    out: list[Interface] = []
    for a in netmap.self_node.addresses:
        ip = ipaddress.ip_address(a)
        out.append(ipaddress.ip_interface(f"{ip}/{32 if ip.version == 4 else 128}"))
    return tuple(out)


def local_endpoints(port: int, exclude_ifname: str) -> list[str]:
    """`ip:port` for every global address of this machine outside the tailnet (blocking)."""
    from pyroute2 import IPRoute
    found: list[str] = []
    with IPRoute() as ipr:
        links = ipr.get_links()
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        down = {link["index"] for link in links if not link["flags"] & IFF_UP}
        for msg in ipr.get_addr():
            if names.get(msg["index"]) in (exclude_ifname, "lo") or msg["index"] in down:
                continue  # an interface set down no longer reaches anyone
            ip = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            if ip.is_loopback or ip.is_link_local or ip.is_multicast or any(ip in n for n in TAILNET_RANGES):
                continue
            found.append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    return sorted(found)


class TunnelFilter:
    """The ACL packet filter of one device: a `policy.PacketFilter` behind the device's hooks.

    The filter is not thread-safe, so after installation only the device's receive thread touches
    it (`call_soon_dataplane`); the daemon only reads its counters."""

    def __init__(self) -> None:
        from ..policy import PacketFilter
        self.filter = PacketFilter(())  # no rules until a map gives some: only replies pass
        self.rule_count = 0
        self.version: int | None = None  # the map version whose rules are in force
        self.error: str | None = None    # why the last map's rules were refused
        self._source: tuple[Any, ...] | None = None
        self._rules: tuple[Any, ...] = ()  # the map's rules, kept while shields are up
        self.shields_up = False          # `up --shields-up`: no rule in force, only replies pass

    flows: Any = None   # a flowlog.FlowCounter while flow logs are on (set before `hooks`)

    def hooks(self) -> tuple[Callable[[bytes, bytes, float], bool], Callable[[bytes, bytes, float], None]]:
        """(inbound check, outbound tap) for `Device.set_packet_filter`; both take the batch's `now`."""
        check, note = self.filter.check, self.filter.note_outbound
        if self.flows is not None:
            from .flowlog import counting_hooks
            return counting_hooks(self.filter, self.flows)

        def inbound(packet: bytes, peer_key: bytes, now: float) -> bool:
            return check(packet, now)

        def outbound(packet: bytes, peer_key: bytes, now: float) -> None:
            note(packet, now)

        return inbound, outbound

    def rules_update(self, netmap: NetMap) -> Callable[[], None] | None:
        """What to run on the data-plane thread to put `netmap`'s rules in force, or None when they
        are unchanged or unusable (then the rules in force stay and `error` says why)."""
        from ..policy import PolicyError, rules_from_json
        source = netmap.packet_filter
        if source == self._source:
            return None
        try:
            rules = rules_from_json([dict(r) for r in source])
        except PolicyError as exc:
            self.error = f"packet filter of map version {netmap.version} refused ({exc}); " + (
                f"keeping the rules of version {self.version}" if self.version is not None
                else "only replies to this node's connections pass")
            log.error("tunnel: %s", self.error)
            return None
        self._source, self.error = source, None
        self.rule_count, self.version = len(rules), netmap.version
        self._rules = tuple(rules)
        return self._in_force()

    def shields_update(self, on: bool) -> Callable[[], None] | None:
        """What to run on the data-plane thread to raise (or lower) the shields, or None if unchanged.
        Raised, no rule is in force: new connections from the tailnet are dropped, replies of this
        node's own connections still pass through the flow table."""
        if on == self.shields_up:
            return None
        self.shields_up = on
        return self._in_force()

    def _in_force(self) -> Callable[[], None]:
        pf, rules = self.filter, (() if self.shields_up else self._rules)

        def update() -> None:
            pf.set_rules(rules)
            pf.expire(time.monotonic())
        return update

    def status(self) -> FilterStatus:
        pf = self.filter
        return FilterStatus(self.rule_count, self.version,
                            {r.name.lower(): n for r, n in pf.drops.items()},
                            {r.name.lower(): n for r, n in pf.accepts.items()},
                            pf.flow_count, self.error, self.shields_up)


@dataclass(frozen=True)
class FilterStatus:
    """The packet filter in force: how many rules from which map, and what it did."""

    rules: int
    map_version: int | None
    dropped: Mapping[str, int]
    accepted: Mapping[str, int]
    flows: int
    error: str | None
    shields_up: bool

    def to_json(self) -> dict[str, Any]:
        return {"rules": self.rules, "map_version": self.map_version, "dropped": dict(self.dropped),
                "accepted": dict(self.accepted), "flows": self.flows, "error": self.error,
                "shields_up": self.shields_up}


@dataclass(frozen=True)
class TunnelPeerStatus:
    """One WireGuard peer as the device sees it."""

    public_key: str                  # base64, as node keys are written in maps
    endpoint: str | None             # "IP:PORT" of the current path, None when unknown
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    path: Mapping[str, Any] | None   # the path layer's view (pathrunner.path_json)

    def to_json(self) -> dict[str, Any]:
        return {"public_key": self.public_key, "endpoint": self.endpoint, "last_handshake": self.last_handshake,
                "rx_bytes": self.rx_bytes, "tx_bytes": self.tx_bytes, "path": self.path}


@dataclass(frozen=True)
class TunnelStatus:
    """The tunnel, handed across module boundaries as values and rendered to JSON at the edge."""

    running: bool
    interface: str | None = None
    listen_port: int | None = None
    peers: tuple[TunnelPeerStatus, ...] = ()
    drops: Mapping[str, int] | None = None
    paths: Mapping[str, Any] | None = None
    filter: FilterStatus | None = None
    failure: str | None = None
    exists: bool = True  # False: no device at all (then the JSON is only {"running": false})

    def peer(self, public_key: str) -> TunnelPeerStatus | None:
        return next((p for p in self.peers if p.public_key == public_key), None)

    def to_json(self) -> dict[str, Any]:
        if not self.exists:
            return {"running": False}
        return {"running": self.running, "interface": self.interface, "listen_port": self.listen_port,
                "peers": [p.to_json() for p in self.peers], "drops": self.drops, "paths": self.paths,
                "filter": self.filter.to_json() if self.filter is not None else None, "failure": self.failure}


class Tunnel:
    """The WireGuard device of one node."""

    def __init__(self, ifname: str, port: int = DEFAULT_PORT) -> None:
        self.ifname = ifname
        self.port = port
        self._device: Any = None
        self._addresses: tuple[Interface, ...] = ()
        self._filter: TunnelFilter | None = None
        self.paths: Any = None  # the PathRunner while the device runs
        # The home relay region by measured latency (paths/home.py), re-measured every HOME_INTERVAL
        # with a netcheck of the relay map; the map and login server of the last apply().
        from ..paths.home import HomeRegion
        self.home = HomeRegion()
        self._home_task: asyncio.Task[None] | None = None
        self._relay_of: tuple[NetMap, str] | None = None
        self._relay_lock = asyncio.Lock()  # a map apply and a measurement never set the relay at once
        # What the WireGuard peers were last set from, in full (see _peers_unchanged); None: unknown.
        self._peers_from: tuple[Any, ...] | None = None
        self._configs = PeerConfigBuilder()   # converts only the peers a map changed

    @property
    def running(self) -> bool:
        return self._device is not None

    async def start(self, private_key: bytes) -> str:
        """Create the TUN and start the engine; returns the interface name."""
        if self._device is not None:
            return self._device.ifname
        from ..wg.device import create_device
        from ..wg.netconf import NetconfError
        from ..wg.tun import TunError
        try:
            self._device = await asyncio.to_thread(create_device, private_key, self.ifname,
                                                   listen_port=self.port)
        except (TunError, NetconfError) as exc:
            raise TunnelError(f"cannot create tunnel {self.ifname}: {exc}") from None
        except OSError as exc:
            raise TunnelError(f"cannot listen on UDP port {self.port}: {exc.strerror or exc}") from None
        from .router import BYPASS_MARK
        self._device.set_fwmark(BYPASS_MARK)  # exit node routing must never take our own UDP
        # Before any peer exists: no packet from the tunnel ever bypasses the filter.
        self._filter = TunnelFilter()
        self._device.set_packet_filter(*self._filter.hooks())
        from .pathrunner import PathRunner
        self.paths = PathRunner(self._device, private_key)
        self.paths.start()
        log.info("tunnel: %s up, UDP port %d", self._device.ifname, self._device.listen_port)
        return self._device.ifname

    async def apply(self, netmap: NetMap, exit_node: str = "", accept_routes: bool = False,
                    login_server: str = "") -> None:
        """Make addresses, peers, routes and the relay match `netmap` (and the `--exit-node`,
        `--accept-routes` prefs; `login_server` completes relay URLs without a host)."""
        device = self._device
        if device is None:
            return
        addresses = self_interfaces(netmap)
        if addresses != self._addresses:
            from ..wg.engine import DEFAULT_MTU
            from ..wg.netconf import Netns, configure_interface
            ifname = device.ifname

            def configure() -> None:
                ns = Netns()
                try:
                    ns.run(lambda ipr: configure_interface(ipr, ifname, DEFAULT_MTU, addresses, ()))
                finally:
                    ns.close()
            await asyncio.to_thread(configure)
            self._addresses = addresses
        await self._apply_filter(device, netmap)
        applied = (netmap.peers, getattr(netmap, "derp_map", None), exit_node, accept_routes, login_server)
        if self._peers_unchanged(applied):
            # A policy change or a record (every node gets one) leaves the peers tuple as it was
            # (MapAssembler reuses it): the filter above is all it changes. Converting and setting
            # every peer again cost a node ~20 us a peer per frame.
            self._relay_of = (netmap, login_server)
            return
        self._peers_from = None   # until the peers below are all set: a failure halfway is unknown state
        configs = self._configs.build(netmap, exit_node, accept_routes)
        if self.paths is not None:
            # The path layer owns each known peer's endpoint: a map update (a record, a policy,
            # a tag) must not send a peer back to its first reported endpoint.
            known = {s.public_key for s in device.stats()}
            configs = [replace(c, endpoint=None) if c.public_key in known else c for c in configs]
        await asyncio.to_thread(device.set_peers, configs)
        if self.paths is not None:
            tunneled = tunneled_subnets(configs)
            self.paths.set_relay_regions(relay_regions(netmap, login_server))
            self.paths.set_peers(netmap.peers, lambda texts: candidate_order(texts, tunneled))
            self._relay_of = (netmap, login_server)
            await self._apply_relay()
            if self._home_task is None and getattr(netmap, "derp_map", None) is not None:
                self._home_task = asyncio.create_task(self._measure_home(), name="home-region")
        self._peers_from = applied

    def _peers_unchanged(self, applied: tuple[Any, ...]) -> bool:
        """The peers, relay map and prefs are the very ones the device's peers were set from."""
        last = self._peers_from
        return (last is not None and last[0] is applied[0] and last[1] is applied[1]
                and last[2:] == applied[2:])

    @property
    def home_region(self) -> int | None:
        """The relay region we home on (reported to the control server), None without a relay."""
        return self.paths.relay_region if self.paths is not None else None

    async def _apply_relay(self) -> None:
        """The DERP client and STUN servers of the home region: the fastest measured one (with
        hysteresis), or the map's first region until a measurement exists."""
        async with self._relay_lock:
            if self.paths is None or self._relay_of is None:  # closed while we waited
                return
            netmap, login_server = self._relay_of
            paths = self.paths
            regions = relay_regions(netmap, login_server)
            home = self.home.choose(list(regions), time.monotonic())
            await paths.set_relay(home, regions.get(home, ()) if home is not None else ())
            stun = stun_servers(netmap, login_server, home) if home is not None else []
            paths.set_stun_servers(await asyncio.to_thread(_resolve, stun) if stun else [])

    async def _measure_home(self) -> None:
        """Every HOME_INTERVAL (the first soon after start): a netcheck of the relay map's STUN
        servers; its per-region latency may move the home region."""
        from ..netcheck import run_netcheck
        delay = HOME_FIRST
        while True:
            await asyncio.sleep(delay)
            delay = HOME_INTERVAL
            if self._relay_of is None or self.paths is None:
                continue
            netmap, login_server = self._relay_of
            derp_map = getattr(netmap, "derp_map", None)
            if derp_map is None:
                continue
            try:
                report = await run_netcheck(derp_map, control_url=login_server, timeout=2.0,
                                            previous_home=self.home.home, check_captive_portal=False)
            except (OSError, ValueError) as exc:
                log.info("tunnel: home region measurement failed: %s", exc)
                continue
            before = self.home.home
            self.home.measured(report.relay_latency_ms, time.monotonic())
            try:
                await self._apply_relay()
            except Exception:  # a bug must not end the measurements silently
                log.exception("tunnel: applying the home region failed")
                continue
            if self.home.home != before:
                log.info("tunnel: home relay region %s -> %s (latency %s ms)", before, self.home.home,
                         {k: round(v, 1) for k, v in report.relay_latency_ms.items()})

    async def _apply_filter(self, device: Any, netmap: NetMap) -> None:
        # Rules first, then peers: a peer the new map adds is never seen under older rules.
        if self._filter is None:
            return
        update = self._filter.rules_update(netmap)
        if update is not None:
            await asyncio.wrap_future(device.call_soon_dataplane(update))
            log.info("tunnel: packet filter of map version %d in force (%d rules)", netmap.version,
                     self._filter.rule_count)

    async def set_flow_counter(self, counter: Any) -> None:
        """Count flows into `counter` (a flowlog.FlowCounter), or stop (None); from the next batch."""
        if self._filter is None or self._device is None or self._filter.flows is counter:
            return
        self._filter.flows = counter
        device, hooks = self._device, self._filter.hooks()
        await asyncio.wrap_future(device.call_soon_dataplane(lambda: device.set_packet_filter(*hooks)))

    async def set_shields(self, on: bool) -> None:
        """`--shields-up`: drop new inbound connections from the tailnet (replies still pass)."""
        device, filt = self._device, self._filter
        if device is None or filt is None:
            return
        update = filt.shields_update(on)
        if update is not None:
            await asyncio.wrap_future(device.call_soon_dataplane(update))
            log.info("tunnel: shields %s", "up: new inbound connections are dropped" if on else "down")

    async def endpoints(self) -> list[str]:
        """Where peers can reach us (to report to the control server)."""
        if self._device is None:
            return []
        found = await asyncio.to_thread(local_endpoints, self._device.listen_port, self._device.ifname)
        if self.paths is not None:
            self.paths.set_local_endpoints(found)
            # Our address as peers see it through a NAT (from their pongs), like a STUN result.
            found = found + [e for e in sorted(self.paths.discovered_endpoints()) if e not in found]
        return found

    @property
    def disco_key(self) -> str:
        """This run's disco public key (base64), or "" without a running device."""
        if self.paths is None:
            return ""
        return base64.b64encode(self.paths.disco_key.public).decode()

    def status(self) -> TunnelStatus:
        device = self._device
        if device is None:
            return TunnelStatus(running=False, exists=False)
        from ..wg.device import display_endpoint
        peers = []
        for s in device.stats():
            ep = display_endpoint(s.endpoint)
            peers.append(TunnelPeerStatus(base64.b64encode(s.public_key).decode(),
                                          f"{ep[0]}:{ep[1]}" if ep else None, s.last_handshake,
                                          s.rx_bytes, s.tx_bytes,
                                          self.paths.path_json(s.public_key) if self.paths is not None else None))
        return TunnelStatus(device.running, device.ifname, device.listen_port, tuple(peers), device.drops(),
                            self.paths.metrics() if self.paths is not None else None,
                            self._filter.status() if self._filter is not None else None,
                            str(device.failure) if device.failure else None)

    async def close(self) -> None:
        """Stop the engine; closing the TUN removes the interface, its addresses and routes."""
        device, self._device = self._device, None
        self._addresses = ()
        self._filter = None
        task, self._home_task = self._home_task, None
        if task is not None:
            task.cancel()
        self._relay_of = None
        self._peers_from = None
        paths, self.paths = self.paths, None
        if paths is not None:
            await paths.close()
        if device is not None:
            await asyncio.to_thread(device.close)
            log.info("tunnel: %s down", device.ifname)
