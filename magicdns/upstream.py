"""Upstream resolver addresses: `HOST`, `HOST:PORT`, `[V6]:PORT` or a bare IPv6 address."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


class UpstreamError(ValueError):
    """An upstream resolver spec that is not an IP address with an optional port."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One resolver to forward to."""

    host: str
    port: int = 53

    @property
    def spec(self) -> str:
        """The canonical text form, as accepted by `parse_upstream`."""
        if ":" in self.host:
            return self.host if self.port == 53 else f"[{self.host}]:{self.port}"
        return self.host if self.port == 53 else f"{self.host}:{self.port}"

    @property
    def family_v6(self) -> bool:
        return ":" in self.host


def parse_upstream(text: str) -> Upstream:
    """Parse '1.1.1.1', '127.0.0.1:5301', '[::1]:53' or '::1'; resolvers must be IP addresses."""
    spec = text.strip()
    host, port = spec, "53"
    if spec.startswith("["):
        end = spec.find("]")
        if end < 0:
            raise UpstreamError(f"{text!r}: missing ']'")
        host, rest = spec[1:end], spec[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise UpstreamError(f"{text!r}: expected ':PORT' after ']'")
            port = rest[1:]
    elif spec.count(":") == 1:
        host, port = spec.split(":")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise UpstreamError(f"{text!r}: a resolver must be an IP address, optionally with a port") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UpstreamError(f"{text!r}: port must be 1-65535")
    return Upstream(str(addr), int(port))


def split_host_port(text: str) -> tuple[str, int]:
    """'dns.example' or 'dns.example:5353' as (host name, port), for upstreams given by name (they
    are resolved through the stub resolver, stub.py). Raises UpstreamError when it is neither."""
    spec = text.strip()
    host, port = spec, "53"
    if spec.count(":") == 1:
        host, port = spec.split(":")
    name = host.rstrip(".")
    labels = name.split(".")
    if (not name or len(name) > 253 or any(not 0 < len(label) < 64 for label in labels)
            or not all(c.isascii() and (c.isalnum() or c in "-_") for label in labels for c in label)
            or labels[-1].isdigit()):
        raise UpstreamError(f"{text!r}: a resolver must be an IP address or a host name, optionally with a port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UpstreamError(f"{text!r}: port must be 1-65535")
    return name, int(port)
