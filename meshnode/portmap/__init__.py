"""Port mapping: ask the gateway to forward a public UDP port to our WireGuard port.

NAT-PMP (RFC 6886) and PCP (RFC 6887), as Tailscale's net/portmapper does: `pmp` and `pcp` are the
wire codecs, `client` the sans-I/O request/renew/release state machine (time passed in), `runner`
the asyncio glue that finds the default gateway and keeps one mapping alive.
"""

from .client import Mapping, PortMapClient, Protocol

__all__ = ["Mapping", "PortMapClient", "Protocol"]
