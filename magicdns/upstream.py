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
