"""IP protocol numbers and names as the policy file spells them."""

from __future__ import annotations

import enum


class IPProto(enum.IntEnum):
    """The IANA protocol numbers the filter knows by name."""

    ICMP = 1
    IGMP = 2
    IPV4 = 4
    TCP = 6
    EGP = 8
    IGP = 9
    UDP = 17
    GRE = 47
    ESP = 50
    AH = 51
    ICMPV6 = 58
    SCTP = 132


# Tailscale's default when an ACL names no protocol.
DEFAULT_PROTOS: tuple[int, ...] = (IPProto.TCP, IPProto.UDP, IPProto.ICMP, IPProto.ICMPV6)

# Only these carry ports; for the others an ACL's ports must be `*` and are not checked.
PORT_PROTOS = frozenset({IPProto.TCP, IPProto.UDP, IPProto.SCTP})

_NAMES: dict[str, tuple[int, ...]] = {
    "tcp": (IPProto.TCP,),
    "udp": (IPProto.UDP,),
    "sctp": (IPProto.SCTP,),
    # Tailscale's "icmp" covers both families, so a ping rule works over IPv6 too.
    "icmp": (IPProto.ICMP, IPProto.ICMPV6),
    "ipv6-icmp": (IPProto.ICMPV6,),
    "icmpv6": (IPProto.ICMPV6,),
    "igmp": (IPProto.IGMP,),
    "ipv4": (IPProto.IPV4,),
    "ip-in-ip": (IPProto.IPV4,),
    "egp": (IPProto.EGP,),
    "igp": (IPProto.IGP,),
    "gre": (IPProto.GRE,),
    "esp": (IPProto.ESP,),
    "ah": (IPProto.AH,),
}


def parse_proto(text: str) -> tuple[int, ...]:
    """Protocol numbers for a policy's `proto` value (a name or 0-255); ValueError if unknown."""
    key = text.strip().lower()
    if key in _NAMES:
        return _NAMES[key]
    if key.isdigit():
        number = int(key)
        if 0 <= number <= 255:
            return (number,)
    raise ValueError(f"unknown protocol {text!r} (a name like tcp, udp, icmp, sctp or a number 0-255)")
