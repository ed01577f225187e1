"""The node as a router: subnet routes and exit nodes, on both sides of the tunnel.

Serving side (`up --advertise-routes` / `--advertise-exit-node`, approved on the control server):
IP forwarding on, and an nftables table of our own (`table inet meshnode`) that masquerades
tailnet sources leaving through a real interface (not the TUN, not `lo`: traffic that stays on this
machine, such as the node's own queries to 100.100.100.100, keeps its address, or the resolver
would refuse it as a foreign client), so hosts behind the router answer without knowing the
tailnet. A router serving only subnets drops what arrives from the tunnel for any other
destination: a peer must not use it as an exit node it was never approved as.

Using side (`up --exit-node NAME|IP`): default routes into the TUN in a table of our own (52), used
through policy rules, as wg-quick and Tailscale do, so nothing that must stay outside the tunnel
falls into it:

    5140+ to CONTROL lookup main                    (LAN blocked) the control server, even on the LAN
    5149  fwmark 0x80000/0xff0000 lookup main       (LAN blocked) WireGuard's own UDP, even to the LAN
    5150+ to LAN lookup 52                          (LAN blocked, the default) the local networks go
                                                    into the tunnel too, as Tailscale's exit nodes do
                                                    unless --exit-node-allow-lan-access
                                                    (an inverted rule would invert its `to` as well:
                                                    hence the separate mark rule)
    5200  lookup main suppress_prefixlength 0       LAN, peers, subnet routes: every specific route
    5210+ to CONTROL lookup main                    the control server, even behind the default route
    5250  not fwmark 0x80000/0xff0000 lookup 52     the rest, unless it is the tunnel's own UDP
                                                    (its socket carries the mark, SO_MARK)

`plan_routing` and `nft_ruleset` are pure; `Router` does the I/O (pyroute2 in a worker thread, `nft -f -`,
/proc/sys) and undoes it all on `close`. Everything it installs is recognisable (the table name,
the rule priorities, table 52), so a restart after a crash first removes what the last run left.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

from magicdns.ranges import TAILNET_V4, TAILNET_V6

from ..netmap import MapNode, NetMap

log = logging.getLogger("meshnode.node.router")

BYPASS_MARK = 0x80000           # set on the WireGuard UDP socket: those packets never use table 52
MARK_MASK = 0xFF0000
ROUTE_TABLE = 52
MAIN_TABLE = 254
PRIO_LAN_CONTROL = 5140        # 5140..5148: control server addresses, before the LAN rules
PRIO_LAN_MARK = 5149           # WireGuard's own UDP (marked) before the LAN rules
PRIO_LAN = 5150                # 5150..5199: one rule per local network sent into the tunnel
PRIO_MAIN = 5200
PRIO_CONTROL = 5210             # 5210..5249: one rule per control server address
PRIO_TUNNEL = 5250
NFT_TABLE = "meshnode"
DNS_SERVICE_V4 = "100.100.100.100"  # the node's own resolver: its clients must keep their address
DNS_SERVICE_V6 = "fd7a:115c:a1e0::53"
_EXIT_ROUTES = ("0.0.0.0/0", "::/0")
_SYSCTLS = {4: Path("/proc/sys/net/ipv4/ip_forward"), 6: Path("/proc/sys/net/ipv6/conf/all/forwarding")}


class RouterError(RuntimeError):
    """The kernel or nft refused part of the routing setup; the message says which."""


@dataclass(frozen=True, slots=True)
class RoutingPlan:
    """What this node's routing should look like for one map and one set of prefs."""

    subnets: tuple[str, ...] = ()          # approved routes this node forwards to
    exit_node: bool = False                # approved exit node: forwards anything
    use_exit: bool = False                 # send internet traffic into the tunnel (table 52)
    exit_peer: str | None = None           # the FQDN of the chosen exit node, None if not in the map
    control: tuple[str, ...] = ()          # control server addresses kept on the main table
    lan: tuple[str, ...] = ()              # with use_exit: local networks blocked (sent into the tunnel)

    @property
    def forwarding(self) -> bool:
        return self.exit_node or bool(self.subnets)

    def families(self) -> frozenset[int]:
        """The IP versions forwarded for peers."""
        if self.exit_node:
            return frozenset((4, 6))
        return frozenset(ipaddress.ip_network(s).version for s in self.subnets)


def find_exit_node(netmap: NetMap, ref: str) -> MapNode | None:
    """The approved exit node `ref` (name, FQDN or address) names, if it is in the map."""
    for p in netmap.peers:
        if p.exit_node and ref in (p.name, p.fqdn, *p.addresses):
            return p
    return None


def plan_routing(netmap: NetMap | None, exit_node: str = "",
                 control: Iterable[str] = (), lan: Iterable[str] = ()) -> RoutingPlan:
    """The routing plan for `netmap`: what this node serves (its approved routes, exit node
    approval) and whether it uses an exit node (the `--exit-node` pref, kept even when that node
    is missing from the map: internet traffic then goes nowhere rather than around the exit node,
    as with Tailscale)."""
    control_ips = tuple(dict.fromkeys(str(ipaddress.ip_address(a)) for a in control))
    lan_nets = tuple(dict.fromkeys(str(ipaddress.ip_network(n, strict=False)) for n in lan)) if exit_node else ()
    if netmap is None:
        return RoutingPlan(use_exit=bool(exit_node), control=control_ips, lan=lan_nets)
    me = netmap.self_node
    subnets = tuple(r for r in me.approved_routes if r not in _EXIT_ROUTES)
    peer = find_exit_node(netmap, exit_node) if exit_node else None
    return RoutingPlan(subnets=subnets, exit_node=me.exit_node, use_exit=bool(exit_node),
                       exit_peer=peer.fqdn if peer else None, control=control_ips, lan=lan_nets)


def _quote(name: str) -> str:
    if not name or any(c in name for c in '"\\\n '):
        raise ValueError(f"unusable interface name {name!r}")
    return f'"{name}"'


def nft_ruleset(plan: RoutingPlan, tun: str) -> str:
    """The `nft -f -` script that replaces our table with what `plan` needs (empty when the node
    forwards nothing: see `nft_delete`). Declaring the table before deleting it makes the delete
    succeed on a first run, and one script is one transaction: no moment without masquerading."""
    if not plan.forwarding:
        return ""
    tun_q = _quote(tun)
    forward: list[str] = []
    if not plan.exit_node:
        # Only to the subnets we serve: anything else from the tunnel is not ours to forward.
        nets = {4: [], 6: []}  # type: dict[int, list[str]]
        for s in plan.subnets:
            net = ipaddress.ip_network(s)
            nets[net.version].append(str(net))
        for version, keyword in ((4, "ip"), (6, "ip6")):
            if nets[version]:
                forward.append(f"iifname {tun_q} oifname != {tun_q} {keyword} daddr != "
                               f"{{ {', '.join(nets[version])} }} drop")
            else:
                forward.append(f"iifname {tun_q} oifname != {tun_q} meta nfproto "
                               f"ipv{version} drop")
    lines = [f"table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}", f"table inet {NFT_TABLE} {{",
             "\tchain forward {", "\t\ttype filter hook forward priority filter; policy accept;",
             *(f"\t\t{r}" for r in forward), "\t}",
             "\tchain postrouting {", "\t\ttype nat hook postrouting priority srcnat; policy accept;",
             f"\t\toifname {{ {tun_q}, \"lo\" }} accept",
             f"\t\tip daddr {DNS_SERVICE_V4} accept",
             f"\t\tip6 daddr {DNS_SERVICE_V6} accept",
             f"\t\tip saddr {TAILNET_V4} masquerade",
             f"\t\tip6 saddr {TAILNET_V6} masquerade",
             "\t}", "}"]
    return "\n".join(lines) + "\n"


def nft_delete() -> str:
    """The `nft -f -` script that removes our table, whether or not it exists."""
    return f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"


def control_addresses(login_server: str) -> tuple[str, ...]:
    """The addresses of the control server's host (blocking: may ask DNS)."""
    host = urlparse(login_server).hostname if login_server else None
    if not host:
        return ()
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("router: cannot resolve the control server %s: %s", host, exc)
        return ()
    return tuple(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))


def local_networks(tun: str) -> tuple[str, ...]:
    """The networks directly attached to this machine (link-scope routes of the main table on
    interfaces other than the tunnel and loopback), which an exit node without LAN access blocks.
    IPv6 link-local and multicast stay: neighbour discovery needs them. Blocking (reads netlink)."""
    from pyroute2 import IPRoute
    out: list[str] = []
    with IPRoute() as ipr:
        skip = set(ipr.link_lookup(ifname=tun)) | set(ipr.link_lookup(ifname="lo"))
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in ipr.get_routes(family=family, table=MAIN_TABLE):
                if msg.get_attr("RTA_OIF") in skip or msg["scope"] != 253 or not msg.get_attr("RTA_DST"):
                    continue
                net = ipaddress.ip_network(f"{msg.get_attr('RTA_DST')}/{msg['dst_len']}", strict=False)
                if net.is_link_local or net.is_multicast or net.prefixlen == 0:
                    continue
                out.append(str(net))
    return tuple(dict.fromkeys(out))


def _run_nft(script: str) -> None:
    try:
        proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RouterError(f"nft: {exc}") from None
    if proc.returncode != 0:
        raise RouterError(f"nft refused the ruleset: {proc.stderr.strip()}")


def _delete_nft_table() -> None:
    # A node that never forwarded has nothing to remove, and may run without nft installed.
    try:
        _run_nft(nft_delete())
    except RouterError as exc:
        log.info("router: removing nft table %s: %s", NFT_TABLE, exc)


def _our_rule(msg: Any) -> bool:
    prio = msg.get_attr("FRA_PRIORITY")
    return prio is not None and PRIO_LAN_CONTROL <= prio <= PRIO_TUNNEL


def _clear_policy_routing(ipr: Any) -> None:
    """Remove our rules and table 52 (both families); what is already gone is fine."""
    from pyroute2.netlink.exceptions import NetlinkError
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_rules(family=family):
            if _our_rule(msg):
                try:
                    ipr.rule("del", family=family, priority=msg.get_attr("FRA_PRIORITY"))
                except NetlinkError as exc:
                    log.debug("router: rule %s already gone: %s", msg.get_attr("FRA_PRIORITY"), exc)
        try:
            ipr.flush_routes(table=ROUTE_TABLE, family=family)
        except NetlinkError as exc:
            log.debug("router: table %d: %s", ROUTE_TABLE, exc)


def _install_policy_routing(ipr: Any, tun: str, control: tuple[str, ...], lan: tuple[str, ...] = ()) -> None:
    """Rules and table 52 as the module docstring draws them."""
    from pyroute2.netlink.exceptions import NetlinkError
    links = ipr.link_lookup(ifname=tun)
    if not links:
        raise RouterError(f"no interface {tun} for the exit routes")
    index = links[0]
    try:
        for family, any_addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            ipr.route("replace", family=family, dst=any_addr, dst_len=0, oif=index, table=ROUTE_TABLE)
            ipr.rule("add", family=family, priority=PRIO_MAIN, table=MAIN_TABLE, suppress_prefixlen=0)
            ipr.rule("add", family=family, priority=PRIO_TUNNEL, table=ROUTE_TABLE,
                     fwmark=BYPASS_MARK, fwmask=MARK_MASK, flags=2)  # FIB_RULE_INVERT: "not fwmark"
        for i, addr in enumerate(control[:PRIO_TUNNEL - PRIO_CONTROL]):
            ip = ipaddress.ip_address(addr)
            family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            ipr.rule("add", family=family, priority=PRIO_CONTROL + i, table=MAIN_TABLE,
                     dst=str(ip), dst_len=ip.max_prefixlen)
        if lan:
            for i, addr in enumerate(control[:PRIO_LAN_MARK - PRIO_LAN_CONTROL]):
                ip = ipaddress.ip_address(addr)
                family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
                ipr.rule("add", family=family, priority=PRIO_LAN_CONTROL + i, table=MAIN_TABLE,
                         dst=str(ip), dst_len=ip.max_prefixlen)
            for family in (socket.AF_INET, socket.AF_INET6):
                ipr.rule("add", family=family, priority=PRIO_LAN_MARK, table=MAIN_TABLE,
                         fwmark=BYPASS_MARK, fwmask=MARK_MASK)
            for i, text in enumerate(lan[:PRIO_MAIN - PRIO_LAN]):
                net = ipaddress.ip_network(text)
                family = socket.AF_INET if net.version == 4 else socket.AF_INET6
                ipr.rule("add", family=family, priority=PRIO_LAN + i, table=ROUTE_TABLE,
                         dst=str(net.network_address), dst_len=net.prefixlen)
    except NetlinkError as exc:
        raise RouterError(f"policy routing for the exit node: {exc}") from None


class Router:
    """Applies `RoutingPlan`s in the daemon's network namespace; `close` undoes everything."""

    def __init__(self, tun: str, saved_sysctls: Path | None = None,
                 proc_sys: dict[int, Path] | None = None) -> None:
        """`saved_sysctls`: where the forwarding settings found before we changed them are kept,
        so that a run after a crash still restores the machine's own values."""
        self.tun = tun
        self._sysctls = proc_sys or _SYSCTLS
        self._applied: RoutingPlan | None = None
        self._nft_text = ""
        self._saved_path = saved_sysctls
        self._saved_sysctls: dict[int, str] = self._load_saved()
        self._dirty = True  # a crashed run may have left rules and a table: clear on first apply

    @property
    def applied(self) -> RoutingPlan | None:
        return self._applied

    async def apply(self, plan: RoutingPlan) -> None:
        """Make forwarding, nftables and policy routing match `plan` (no-op if unchanged)."""
        if plan == self._applied and not self._dirty:
            return
        await asyncio.to_thread(self._apply, plan)

    def _apply(self, plan: RoutingPlan) -> None:
        from pyroute2 import IPRoute
        old = self._applied if not self._dirty else None
        self.set_forwarding(plan.families() if plan.forwarding else frozenset())
        text = nft_ruleset(plan, self.tun)
        if self._dirty or text != self._nft_text:
            if text:
                _run_nft(text)
            else:
                _delete_nft_table()
            self._nft_text = text
        if (self._dirty or old is None
                or (old.use_exit, old.control, old.lan) != (plan.use_exit, plan.control, plan.lan)):
            with IPRoute() as ipr:
                _clear_policy_routing(ipr)
                if plan.use_exit:
                    _install_policy_routing(ipr, self.tun, plan.control, plan.lan)
        if plan.use_exit and plan.exit_peer is None:
            log.warning("router: exit node not in the map (or not approved): internet traffic is blocked")
        self._applied, self._dirty = plan, False
        log.info("router: subnets %s, exit node %s, using exit node %s",
                 ",".join(plan.subnets) or "-", plan.exit_node,
                 plan.exit_peer or ("(unavailable)" if plan.use_exit else "no"))

    def _load_saved(self) -> dict[int, str]:
        if self._saved_path is None:
            return {}
        try:
            return {int(k): str(v) for k, v in json.loads(self._saved_path.read_text()).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            log.error("router: ignoring %s: %s", self._saved_path, exc)
            return {}

    def _store_saved(self) -> None:
        if self._saved_path is None:
            return
        try:
            if self._saved_sysctls:
                self._saved_path.write_text(json.dumps(self._saved_sysctls) + "\n")
            else:
                self._saved_path.unlink(missing_ok=True)
        except OSError as exc:
            log.error("router: cannot record forwarding settings in %s: %s", self._saved_path, exc)

    def set_forwarding(self, families: frozenset[int]) -> None:
        """Forwarding on for `families` (4, 6), and back to what it was for the others."""
        for version, path in self._sysctls.items():
            wanted = version in families
            try:
                current = path.read_text().strip()
                if wanted and current != "1":
                    self._saved_sysctls.setdefault(version, current)
                    self._store_saved()  # before the change: a crash must not lose the old value
                    path.write_text("1\n")
                elif wanted:
                    self._saved_sysctls.setdefault(version, current)
            except OSError as exc:
                raise RouterError(f"cannot enable IPv{version} forwarding ({path}): {exc}") from None
            if not wanted and version in self._saved_sysctls:
                self._restore_sysctl(version)
        self._store_saved()

    def _restore_sysctl(self, version: int) -> None:
        before = self._saved_sysctls.pop(version)
        if before != "1":
            try:
                self._sysctls[version].write_text(before + "\n")
            except OSError as exc:
                log.error("router: cannot restore %s to %s: %s", self._sysctls[version], before, exc)
        self._store_saved()

    async def close(self) -> None:
        """Remove our rules, table 52 and nft table; put forwarding back as we found it."""
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        from pyroute2 import IPRoute
        for version in list(self._saved_sysctls):
            self._restore_sysctl(version)
        if self._nft_text or self._dirty:
            _delete_nft_table()
        try:
            with IPRoute() as ipr:
                _clear_policy_routing(ipr)
        except OSError as exc:
            log.error("router: cannot remove the exit node's policy routing: %s", exc)
        self._applied, self._nft_text, self._dirty = None, "", True
