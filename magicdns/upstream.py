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
    # Encrypted upstreams (upstream_tls.py): "tls" (DoT) or "https" (DoH), verified against tls_name.
    scheme: str = "dns"
    tls_name: str = ""
    path: str = ""
    # A public resolver upgraded to DoH (publicdns.py): plain DNS to host:plain_behind is raced
    # behind the DoH query (0: none).
    plain_behind: int = 0

    @property
    def encrypted(self) -> bool:
        return self.scheme != "dns"

    @property
    def by_name(self) -> bool:
        """An encrypted upstream given by name only (`tls://NAME`): its addresses come from the
        system's original resolvers when it is connected to (stub.NameCache)."""
        return self.scheme != "dns" and not self.host

    @property
    def spec(self) -> str:
        """The canonical text form, as accepted by `parse_upstream`."""
        if self.scheme != "dns":
            default = 853 if self.scheme == "tls" else 443
            if not self.host:
                port = "" if self.port == default else f":{self.port}"
                return f"{self.scheme}://{self.tls_name}{port}{self.path}"
            addr = f"[{self.host}]" if ":" in self.host else self.host
            where = addr if self.port == default else f"{addr}:{self.port}"
            return f"{self.scheme}://{self.tls_name}@{where}{self.path}"
        if ":" in self.host:
            return self.host if self.port == 53 else f"[{self.host}]:{self.port}"
        return self.host if self.port == 53 else f"{self.host}:{self.port}"

    @property
    def family_v6(self) -> bool:
        return ":" in self.host


def parse_upstream(text: str) -> Upstream:
    """Parse '1.1.1.1', '127.0.0.1:5301', '[::1]:53' or '::1'; resolvers must be IP addresses.
    Encrypted: 'tls://NAME@IP[:PORT]' (DoT, port 853) and 'https://NAME@IP[:PORT]/dns-query' (DoH),
    or by name only, 'tls://NAME[:PORT]' and 'https://NAME[:PORT]/dns-query' (`Upstream.by_name`)."""
    spec = text.strip()
    if "://" in spec:
        return encrypted_by_name(text) or _parse_encrypted(text, spec)
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


def _parse_encrypted(text: str, spec: str) -> Upstream:
    """'tls://NAME@IP[:PORT]' or 'https://NAME@IP[:PORT][/PATH]': the name the certificate must carry,
    and the address to connect to (so the resolver never asks itself for its upstream's address)."""
    from .names import NameError_, normalize_domain

    scheme, _, rest = spec.partition("://")
    scheme = scheme.lower()
    if scheme not in ("tls", "https"):
        raise UpstreamError(f"{text!r}: unknown scheme {scheme!r} (tls:// or https://)")
    path = ""
    if scheme == "https":
        slash = rest.find("/")
        rest, path = (rest, "/dns-query") if slash < 0 else (rest[:slash], rest[slash:])
    elif "/" in rest:
        raise UpstreamError(f"{text!r}: tls:// takes no path")
    name, at, where = rest.partition("@")
    if not at:
        raise UpstreamError(f"{text!r}: write {scheme}://NAME@IP[:PORT]: the server's name for its certificate,"
                            " and its address")
    try:
        name = normalize_domain(name)
    except NameError_ as exc:
        raise UpstreamError(f"{text!r}: {exc}") from None
    default = 853 if scheme == "tls" else 443
    if where.count(":") == 1 or where.startswith("["):
        addr = parse_upstream(where)
        host, port = addr.host, addr.port if ("]:" in where or not where.startswith("[")) else default
    else:
        host, port = parse_upstream(where).host, default
    return Upstream(host, port, scheme, name, path)


def encrypted_by_name(text: str) -> Upstream | None:
    """'tls://NAME[:PORT]' or 'https://NAME[:PORT][/PATH]' without '@IP': the upstream with its host
    left empty, for the stub resolver to fill in with NAME's addresses (stub.resolve_upstreams);
    None when `text` is not of that form. Raises UpstreamError for a malformed one."""
    from .names import NameError_, normalize_domain

    spec = text.strip()
    scheme, sep, rest = spec.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in ("tls", "https") or "@" in rest:
        return None
    path = ""
    if scheme == "https":
        slash = rest.find("/")
        rest, path = (rest, "/dns-query") if slash < 0 else (rest[:slash], rest[slash:])
    port = 853 if scheme == "tls" else 443
    name, colon, port_text = rest.rpartition(":")
    if colon:
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise UpstreamError(f"{text!r}: port must be 1-65535")
        port = int(port_text)
    else:
        name = rest
    try:
        return Upstream(str(ipaddress.ip_address(name)), port, scheme, name, path)  # tls://IP: verified by IP
    except ValueError:
        pass
    try:
        name = normalize_domain(name)
    except NameError_ as exc:
        raise UpstreamError(f"{text!r}: {exc}") from None
    return Upstream("", port, scheme, name, path)
