"""Addresses, MTU and routes of the tunnel interface, through netlink (pyroute2)."""

from __future__ import annotations

import ipaddress
import logging
from typing import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

EEXIST = 17


class NetconfError(OSError):
    """The kernel refused an address, route or link change."""


def configure_interface(name: str, mtu: int,
                        addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
                        routes: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
    """Set MTU, add addresses, bring `name` up and route `routes` into it."""
    with IPRoute() as ipr:
        try:
            (index,) = ipr.link_lookup(ifname=name)
            ipr.link("set", index=index, mtu=mtu)
            for addr in addresses:
                family = 2 if addr.version == 4 else 10
                try:
                    ipr.addr("add", index=index, address=str(addr.ip),
                             prefixlen=addr.network.prefixlen, family=family)
                except NetlinkError as exc:
                    if exc.code != EEXIST:
                        raise
            ipr.link("set", index=index, state="up")
            for net in routes:
                if net.prefixlen == 0:
                    # A default route would swallow the tunnel's own UDP; wg-quick needs policy
                    # routing for that, which this standalone engine leaves to the operator.
                    log.warning("not routing %s into %s (default route)", net, name)
                    continue
                try:
                    ipr.route("add", dst=str(net), oif=index,
                              family=2 if net.version == 4 else 10)
                except NetlinkError as exc:
                    if exc.code != EEXIST:  # already routed here (e.g. the address's subnet)
                        raise
        except (NetlinkError, ValueError) as exc:
            raise NetconfError(f"configuring {name}: {exc}") from None


def sync_routes(name: str, old: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
                new: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
    """Change the routes into `name` from `old` to `new` (peers changed live)."""
    old_s, new_s = set(old), set(new)
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=name)
        for net in old_s - new_s:
            try:
                ipr.route("del", dst=str(net), oif=index, family=2 if net.version == 4 else 10)
            except NetlinkError:
                log.debug("route %s already gone", net)
        for net in new_s - old_s:
            if net.prefixlen == 0:
                continue
            try:
                ipr.route("add", dst=str(net), oif=index, family=2 if net.version == 4 else 10)
            except NetlinkError as exc:
                if exc.code != EEXIST:
                    raise NetconfError(f"route {net} via {name}: {exc}") from None
