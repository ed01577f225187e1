"""The public-resolver address table and the upgrade of plain upstreams (publicdns.py)."""

from __future__ import annotations

import ipaddress

import pytest

from magicdns.publicdns import KNOWN_DOH, doh_url_of, upgrade, upgrade_routes, upgrade_upstream
from magicdns.upstream import Upstream, parse_upstream


@pytest.mark.parametrize("address,url", [
    ("1.1.1.1", "https://cloudflare-dns.com/dns-query"),
    ("1.0.0.1", "https://cloudflare-dns.com/dns-query"),
    ("2606:4700:4700::1111", "https://cloudflare-dns.com/dns-query"),
    ("1.1.1.2", "https://security.cloudflare-dns.com/dns-query"),
    ("1.0.0.3", "https://family.cloudflare-dns.com/dns-query"),
    ("8.8.8.8", "https://dns.google/dns-query"),
    ("8.8.4.4", "https://dns.google/dns-query"),
    ("2001:4860:4860::8844", "https://dns.google/dns-query"),
    ("9.9.9.9", "https://dns.quad9.net/dns-query"),
    ("149.112.112.112", "https://dns.quad9.net/dns-query"),
    ("2620:fe::fe", "https://dns.quad9.net/dns-query"),
    ("9.9.9.11", "https://dns11.quad9.net/dns-query"),
    ("2620:fe::fe:10", "https://dns10.quad9.net/dns-query"),
    ("194.242.2.2", "https://dns.mullvad.net/dns-query"),
    ("2a07:e340::3", "https://adblock.dns.mullvad.net/dns-query"),
    ("194.242.2.9", "https://all.dns.mullvad.net/dns-query"),
    ("::ffff:8.8.8.8", "https://dns.google/dns-query"),  # a v4-mapped address is the v4 one
    ("2606:4700:4700:0:0:0:0:1111", "https://cloudflare-dns.com/dns-query"),  # any spelling
])
def test_known_public_resolvers_map_to_their_doh_endpoint(address: str, url: str) -> None:
    assert doh_url_of(address) == url


@pytest.mark.parametrize("address", ["192.0.2.1", "1.1.1.4", "8.8.8.9", "208.67.222.222", "100.100.100.100",
                                     "not an address", "", "fe80::1%eth0"])
def test_other_addresses_are_not_upgraded(address: str) -> None:
    assert doh_url_of(address) is None


def test_the_table_covers_four_providers_and_every_url_parses() -> None:
    hosts = {parse_upstream(url).tls_name for url in KNOWN_DOH.values()}
    assert {"cloudflare-dns.com", "dns.google", "dns.quad9.net", "dns.mullvad.net"} <= hosts
    for url in set(KNOWN_DOH.values()):
        up = parse_upstream(url)
        assert up.scheme == "https" and up.port == 443 and up.path == "/dns-query" and up.by_name


def test_upgrade_keeps_order_and_the_plain_port_and_leaves_the_rest() -> None:
    ups = (Upstream("192.0.2.1"), Upstream("8.8.8.8"), Upstream("2620:fe::fe", 5353),
           parse_upstream("tls://dns.example@192.0.2.2"), Upstream("1.1.1.1"))
    got = upgrade(ups)
    assert got[0] == Upstream("192.0.2.1")
    assert got[1] == Upstream("8.8.8.8", 443, "https", "dns.google", "/dns-query", plain_behind=53)
    assert got[2] == Upstream("2620:fe::fe", 443, "https", "dns.quad9.net", "/dns-query", plain_behind=5353)
    assert got[3] == ups[3]  # already encrypted: as the operator wrote it
    assert got[4].spec == "https://cloudflare-dns.com@1.1.1.1/dns-query" and got[4].plain_behind == 53
    assert upgrade(got) == got  # idempotent
    assert upgrade_routes({"corp.example": (Upstream("9.9.9.9"),)})["corp.example"][0].tls_name == "dns.quad9.net"


def test_an_injected_table_stands_in_for_the_public_one() -> None:
    table = {ipaddress.ip_address("127.0.0.1"): "https://dns.test:8443/q"}
    got = upgrade_upstream(Upstream("127.0.0.1", 5353), table)
    assert got == Upstream("127.0.0.1", 8443, "https", "dns.test", "/q", plain_behind=5353)
    assert upgrade_upstream(Upstream("1.1.1.1"), table) == Upstream("1.1.1.1")  # only the given table
    bad = {ipaddress.ip_address("127.0.0.1"): "not a url"}
    assert upgrade_upstream(Upstream("127.0.0.1"), bad) == Upstream("127.0.0.1")
