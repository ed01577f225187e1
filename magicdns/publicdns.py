"""Opt-in upgrade of well-known public resolvers to DNS over HTTPS, as Tailscale's `publicdns` does.

When a plain upstream's address is one of a public resolver's (1.1.1.1, 8.8.8.8, 9.9.9.9,
194.242.2.2 and their siblings), the same provider answers DNS over HTTPS on that address, so the
query can travel encrypted at no extra setup. With the upgrade on, such an upstream becomes
`https://NAME@IP/dns-query` (the certificate is verified against NAME; IP is the one the operator
configured, so no lookup is needed) with plain DNS to the original IP:PORT raced behind it: the
plain query starts `DOH_HEAD_START` seconds later, or at once when DoH fails (upstream_tls.py),
so a network that blocks port 443 costs a short delay, not an outage.

Off by default (`magicdns serve --upgrade-public-dns`, or `upgrade_public_dns` in the DNS settings
of a view or network map): it changes which port and protocol leave the machine, which an operator
must choose.

The table is Tailscale's (net/dns/publicdns/publicdns.go, `populate`), limited to the providers
whose DoH endpoint is served on the same addresses as their plain DNS: Cloudflare, Google, Quad9 and
Mullvad. Providers with per-customer URLs (NextDNS, Control D) are not upgraded.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Iterable, Mapping

from .upstream import Upstream, encrypted_by_name

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DOH_HEAD_START = 0.5  # seconds DoH runs alone before plain DNS joins (Tailscale's dohHeadStart)

_PROVIDERS: dict[str, tuple[str, ...]] = {
    # Cloudflare: https://developers.cloudflare.com/1.1.1.1/ip-addresses/
    "https://cloudflare-dns.com/dns-query": ("1.1.1.1", "1.0.0.1", "2606:4700:4700::1111", "2606:4700:4700::1001"),
    "https://security.cloudflare-dns.com/dns-query": ("1.1.1.2", "1.0.0.2", "2606:4700:4700::1112",
                                                      "2606:4700:4700::1002"),
    "https://family.cloudflare-dns.com/dns-query": ("1.1.1.3", "1.0.0.3", "2606:4700:4700::1113",
                                                    "2606:4700:4700::1003"),
    # Google
    "https://dns.google/dns-query": ("8.8.8.8", "8.8.4.4", "2001:4860:4860::8888", "2001:4860:4860::8844"),
    # Quad9: https://www.quad9.net/service/service-addresses-and-features
    "https://dns.quad9.net/dns-query": ("9.9.9.9", "149.112.112.112", "2620:fe::fe", "2620:fe::9"),
    "https://dns11.quad9.net/dns-query": ("9.9.9.11", "149.112.112.11", "2620:fe::11", "2620:fe::fe:11"),
    "https://dns10.quad9.net/dns-query": ("9.9.9.10", "149.112.112.10", "2620:fe::10", "2620:fe::fe:10"),
    # Mullvad: https://mullvad.net/en/help/dns-over-https-and-dns-over-tls/
    "https://dns.mullvad.net/dns-query": ("194.242.2.2", "2a07:e340::2"),
    "https://adblock.dns.mullvad.net/dns-query": ("194.242.2.3", "2a07:e340::3"),
    "https://base.dns.mullvad.net/dns-query": ("194.242.2.4", "2a07:e340::4"),
    "https://extended.dns.mullvad.net/dns-query": ("194.242.2.5", "2a07:e340::5"),
    "https://family.dns.mullvad.net/dns-query": ("194.242.2.6", "2a07:e340::6"),
    "https://all.dns.mullvad.net/dns-query": ("194.242.2.9", "2a07:e340::9"),
}

# address -> DoH URL of the provider that answers on it
KNOWN_DOH: Mapping[Address, str] = {ipaddress.ip_address(ip): url for url, ips in _PROVIDERS.items() for ip in ips}


def doh_url_of(address: str | Address, table: Mapping[Address, str] = KNOWN_DOH) -> str | None:
    """The DoH URL of the public resolver at `address`, or None when it is not a known one."""
    try:
        addr = ipaddress.ip_address(str(address).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return table.get(addr)


def upgrade_upstream(up: Upstream, table: Mapping[Address, str] = KNOWN_DOH) -> Upstream:
    """`up` as DoH to the same address with plain DNS raced behind it, or `up` unchanged when it is
    not plain DNS to a known public resolver."""
    if up.encrypted or up.plain_behind:
        return up
    url = doh_url_of(up.host, table)
    if url is None:
        return up
    doh = encrypted_by_name(url)
    if doh is None:  # the table holds https://NAME[:PORT]/PATH URLs only; a bad entry is not used
        return up
    return dataclasses.replace(doh, host=str(ipaddress.ip_address(up.host.split("%", 1)[0])),
                               plain_behind=up.port)


def upgrade(upstreams: Iterable[Upstream], table: Mapping[Address, str] = KNOWN_DOH) -> tuple[Upstream, ...]:
    """Every upstream upgraded where it can be (order kept, so the operator's preference holds)."""
    return tuple(upgrade_upstream(u, table) for u in upstreams)


def upgrade_routes(routes: Mapping[str, tuple[Upstream, ...]],
                   table: Mapping[Address, str] = KNOWN_DOH) -> dict[str, tuple[Upstream, ...]]:
    return {suffix: upgrade(ups, table) for suffix, ups in routes.items()}
