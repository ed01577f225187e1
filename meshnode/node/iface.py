"""The MagicDNS service addresses (100.100.100.100, fd7a:115c:a1e0::53) on the node's interface.

With a TUN device the addresses go on it. Without one (DNS-only / userspace mode, until the WireGuard
data plane runs) they go on a dummy interface the daemon creates, or on the loopback interface where
the kernel has no dummy driver (containers often lack it), so the system resolver reaches the server
at the same address either way and nothing else on the machine has to change.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from dataclasses import dataclass

log = logging.getLogger("meshnode.node.iface")

DNS_V4 = "100.100.100.100"
DNS_V6 = "fd7a:115c:a1e0::53"
DUMMY_NAME = "meshnode0"
LOOPBACK = "lo"
IFA_F_NODAD = 0x02  # linux/if_addr.h: skip duplicate address detection, usable at once
RT_SCOPE_HOST = 254  # linux/rtnetlink.h
INFINITY = 0xFFFFFFFF  # an address lifetime that never runs out


class InterfaceError(RuntimeError):
    """The service addresses could not be placed; the message names the interface and the reason."""


@dataclass(frozen=True, slots=True)
class Placed:
    """What `ServiceAddresses.install` achieved."""

    ifname: str
    addresses: tuple[str, ...]
    created: bool  # we created the interface (so we delete it on exit)


class ServiceAddresses:
    """Places the service addresses on `ifname`, creating a dummy interface when `create` is set."""

    def __init__(self, ifname: str = DUMMY_NAME, create: bool = True,
                 addresses: tuple[str, ...] = (DNS_V4, DNS_V6)) -> None:
        self.ifname = ifname
        self.create = create
        self.addresses = addresses
        self._placed: Placed | None = None

    def install(self) -> Placed:
        """Idempotent: an interface and addresses left by a crashed daemon are adopted."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        created = False
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.ifname)
            if not found:
                if not self.create:
                    raise InterfaceError(f"interface {self.ifname} does not exist")
                try:
                    ipr.link("add", ifname=self.ifname, kind="dummy")
                    found = ipr.link_lookup(ifname=self.ifname)
                    created = True
                except NetlinkError as exc:
                    if exc.code != errno.EOPNOTSUPP:
                        raise InterfaceError(f"cannot create dummy interface {self.ifname}: {exc}") from None
                    log.info("iface: no dummy interface support; using %s", LOOPBACK)
                    found = ipr.link_lookup(ifname=LOOPBACK)
            else:
                # A dummy named like ours is ours even if a crashed run created it: remove it on exit.
                created = self.create
            index = found[0]
            ifname = ipr.get_links(index)[0].get_attr("IFLA_IFNAME")
            ipr.link("set", index=index, state="up")
            placed: list[str] = []
            for addr in self.addresses:
                ip = ipaddress.ip_address(addr)
                prefix = 32 if ip.version == 4 else 128
                # The service address must never become the source of tunnel traffic: peers accept
                # only the node's own addresses from it. IPv4: host scope is never picked as a
                # source for routes out of the host. IPv6: a deprecated address (preferred
                # lifetime 0) is avoided as a source (RFC 6724 rule 3), yet still receives.
                kwargs: dict[str, int] = ({"scope": RT_SCOPE_HOST} if ip.version == 4 else
                                          {"flags": IFA_F_NODAD, "preferred_lft": 0, "valid_lft": INFINITY})
                try:
                    ipr.addr("add", index=index, address=addr, prefixlen=prefix, **kwargs)
                except NetlinkError as exc:
                    if exc.code != errno.EEXIST:
                        # IPv6 may be disabled on this host; serve IPv4 alone rather than not at all.
                        log.warning("iface: cannot add %s to %s: %s", addr, ifname, exc)
                        continue
                placed.append(addr)
        if not placed:
            raise InterfaceError(f"no service address could be placed on {ifname}")
        self._placed = Placed(ifname, tuple(placed), created)
        log.info("iface: %s on %s", ", ".join(placed), ifname)
        return self._placed

    def remove(self) -> None:
        """Undo `install`: delete our dummy interface, or just our addresses from someone else's."""
        placed, self._placed = self._placed, None
        if placed is None:
            return
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=placed.ifname)
            if not found:
                return
            try:
                if placed.created:
                    ipr.link("del", index=found[0])
                else:
                    for addr in placed.addresses:
                        prefix = 32 if ":" not in addr else 128
                        ipr.addr("del", index=found[0], address=addr, prefixlen=prefix)
            except NetlinkError as exc:
                log.warning("iface: cleaning up %s: %s", placed.ifname, exc)
