"""Addresses, MTU and routes of the tunnel interface, through netlink (pyroute2).

A device remembers the network namespace it was created in (`Netns`) and makes later route
changes there, whichever thread (in whichever namespace) asks for them."""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import threading
from typing import Callable, Iterable, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

EEXIST = 17
CLONE_NEWNET = 0x40000000
T = TypeVar("T")
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NetconfError(OSError):
    """The kernel refused an address, route or link change."""


class Netns:
    """A handle on the calling thread's network namespace, to run netlink calls in it later."""

    def __init__(self) -> None:
        self._fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._inode = os.fstat(self._fd).st_ino

    def run(self, fn: Callable[[IPRoute], T]) -> T:
        """`fn(ipr)` with an IPRoute opened inside the namespace."""
        if os.stat("/proc/thread-self/ns/net").st_ino == self._inode:
            with IPRoute() as ipr:
                return fn(ipr)
        # setns() moves only the calling thread: use a short-lived one, never the caller.
        result: list[T] = []
        error: list[BaseException] = []

        def body() -> None:
            try:
                if ctypes.CDLL(None, use_errno=True).setns(self._fd, CLONE_NEWNET) != 0:
                    raise NetconfError(ctypes.get_errno(), "setns into the device's namespace")
                with IPRoute() as ipr:
                    result.append(fn(ipr))
            except BaseException as exc:  # re-raised in the caller's thread
                error.append(exc)

        t = threading.Thread(target=body, name="wg-netns")
        t.start()
        t.join()
        if error:
            raise error[0]
        return result[0]

    def close(self) -> None:
        os.close(self._fd)


def _index(ipr: IPRoute, name: str) -> int:
    links = ipr.link_lookup(ifname=name)
    if not links:
        raise NetconfError(f"no interface {name}")
    return int(links[0])


def _add_route(ipr: IPRoute, index: int, name: str, net: Network) -> None:
    if net.prefixlen == 0:
        # A default route would swallow the tunnel's own UDP; wg-quick needs policy routing for
        # that, which this engine leaves to the node's router (exit nodes) or the operator.
        log.warning("not routing %s into %s (default route)", net, name)
        return
    try:
        ipr.route("add", dst=str(net), oif=index, family=2 if net.version == 4 else 10)
    except NetlinkError as exc:
        if exc.code != EEXIST:  # already routed here (e.g. the address's own subnet)
            raise NetconfError(f"route {net} into {name}: {exc}") from None


def configure_interface(ipr: IPRoute, name: str, mtu: int,
                        addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
                        routes: Iterable[Network]) -> None:
    """Set MTU, add addresses, bring `name` up and route `routes` into it."""
    index = _index(ipr, name)
    try:
        ipr.link("set", index=index, mtu=mtu)
        for addr in addresses:
            try:
                ipr.addr("add", index=index, address=str(addr.ip),
                         prefixlen=addr.network.prefixlen, family=2 if addr.version == 4 else 10)
            except NetlinkError as exc:
                if exc.code != EEXIST:
                    raise
        ipr.link("set", index=index, state="up")
    except NetlinkError as exc:
        raise NetconfError(f"configuring {name}: {exc}") from None
    for net in routes:
        _add_route(ipr, index, name, net)


def sync_routes(ipr: IPRoute, name: str, old: Iterable[Network], new: Iterable[Network]) -> None:
    """Change the routes into `name` from `old` to `new` (peers changed live)."""
    old_s, new_s = set(old), set(new)
    index = _index(ipr, name)
    for net in old_s - new_s:
        if net.prefixlen == 0:
            continue
        try:
            ipr.route("del", dst=str(net), oif=index, family=2 if net.version == 4 else 10)
        except NetlinkError:
            log.debug("route %s into %s already gone", net, name)
    for net in new_s - old_s:
        _add_route(ipr, index, name, net)
