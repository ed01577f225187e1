"""The sans-I/O parts of DoH (magicdns/doh.py) and the encrypted upstream specs (magicdns/upstream.py)."""

from __future__ import annotations

import base64

import pytest
from dnslib import RR, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from magicdns.doh import DohError, DohRequest, HttpStatus, dns_query, min_ttl, response_headers
from magicdns.upstream import Upstream, UpstreamError, parse_upstream

QUERY = bytes(DNSRecord.question("example.test", "A").pack())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def test_rfc8484_example_get_decodes() -> None:
    # RFC 8484 section 4.1.1: the query for www.example.com A, ID 0, as the RFC prints it.
    target = "/dns-query?dns=AAABAAABAAAAAAAAA3d3dwdleGFtcGxlA2NvbQAAAQAB"
    q = dns_query(DohRequest("GET", target, None, None), b"")
    assert q == bytes.fromhex("00000100000100000000000003777777076578616d706c6503636f6d0000010001")


def test_post_and_get_carry_the_same_query() -> None:
    assert dns_query(DohRequest("POST", "/dns-query", "application/dns-message", len(QUERY)), QUERY) == QUERY
    assert dns_query(DohRequest("GET", f"/dns-query?dns={b64(QUERY)}", None, None), b"") == QUERY
    padded = base64.urlsafe_b64encode(QUERY).decode()
    assert dns_query(DohRequest("GET", f"/dns-query?dns={padded}", None, None), b"") == QUERY


@pytest.mark.parametrize("req,body,status", [
    (DohRequest("GET", "/other?dns=AAAA", None, None), b"", HttpStatus.NOT_FOUND),
    (DohRequest("PUT", "/dns-query", "application/dns-message", 12), QUERY, HttpStatus.METHOD_NOT_ALLOWED),
    (DohRequest("POST", "/dns-query", "text/plain", 12), QUERY, HttpStatus.UNSUPPORTED_MEDIA_TYPE),
    (DohRequest("POST", "/dns-query", "application/dns-message", 70000), b"", HttpStatus.PAYLOAD_TOO_LARGE),
    (DohRequest("GET", "/dns-query", None, None), b"", HttpStatus.BAD_REQUEST),
    (DohRequest("GET", "/dns-query?dns=a&dns=b", None, None), b"", HttpStatus.BAD_REQUEST),
    (DohRequest("GET", "/dns-query?dns=***", None, None), b"", HttpStatus.BAD_REQUEST),
    (DohRequest("GET", "/dns-query?dns=AAAA", None, None), b"", HttpStatus.BAD_REQUEST),  # 3 bytes: no header
    (DohRequest("GET", "/dns-query?dns=" + "A" * 200000, None, None), b"", HttpStatus.URI_TOO_LONG),
])
def test_bad_requests_get_the_right_status(req: DohRequest, body: bytes, status: HttpStatus) -> None:
    with pytest.raises(DohError) as err:
        dns_query(req, body)
    assert err.value.status == status


@settings(max_examples=300)
@given(method=st.sampled_from(["GET", "POST", "HEAD", ""]), target=st.text(max_size=200),
       ctype=st.one_of(st.none(), st.text(max_size=40)), body=st.binary(max_size=300))
def test_any_request_is_a_query_or_a_doh_error(method: str, target: str, ctype: str | None, body: bytes) -> None:
    try:
        q = dns_query(DohRequest(method, target, ctype, None), body)
    except DohError as exc:
        assert 400 <= exc.status < 500
    else:
        assert 12 <= len(q) <= 65535


def test_cache_control_is_the_smallest_ttl_without_opt() -> None:
    reply = DNSRecord.question("a.test", "A").reply()
    reply.add_answer(*RR.fromZone("a.test. 300 IN CNAME b.test.\nb.test. 42 IN A 192.0.2.1"))
    reply.add_ar(*RR.fromZone("a.test. 7 IN TXT x"))
    wire = bytes(reply.pack())
    assert min_ttl(wire) == 7
    assert ("cache-control", "max-age=7") in response_headers(wire)
    empty = bytes(DNSRecord.question("a.test", "A").reply().pack())
    assert min_ttl(empty) == 0 and min_ttl(b"garbage") == 0


@pytest.mark.parametrize("text,want", [
    ("tls://dns.test@192.0.2.1", Upstream("192.0.2.1", 853, "tls", "dns.test")),
    ("tls://Dns.Test.@192.0.2.1:8853", Upstream("192.0.2.1", 8853, "tls", "dns.test")),
    ("tls://dns.test@[2001:db8::1]:8853", Upstream("2001:db8::1", 8853, "tls", "dns.test")),
    ("https://dns.test@192.0.2.1/dns-query", Upstream("192.0.2.1", 443, "https", "dns.test", "/dns-query")),
    ("https://dns.test@192.0.2.1:8443/q", Upstream("192.0.2.1", 8443, "https", "dns.test", "/q")),
    ("https://dns.test@192.0.2.1", Upstream("192.0.2.1", 443, "https", "dns.test", "/dns-query")),
])
def test_encrypted_upstream_specs_round_trip(text: str, want: Upstream) -> None:
    up = parse_upstream(text)
    assert up == want and up.encrypted
    assert parse_upstream(up.spec) == up


@pytest.mark.parametrize("text", ["tls://dns.test@", "tls://dns.test@host.name",
                                  "tls://dns.test@192.0.2.1/path", "quic://dns.test@192.0.2.1",
                                  "tls://bad..name", "tls://bad..name@192.0.2.1",
                                  "tls://dns.test@192.0.2.1:0"])
def test_bad_encrypted_specs_are_clear_errors(text: str) -> None:
    with pytest.raises(UpstreamError):
        parse_upstream(text)


def test_encrypted_upstreams_by_name_leave_the_address_to_the_stub() -> None:
    from magicdns.upstream import encrypted_by_name
    assert encrypted_by_name("https://Dns.Example/dns-query") == Upstream("", 443, "https", "dns.example", "/dns-query")
    assert encrypted_by_name("tls://dns.example:8853") == Upstream("", 8853, "tls", "dns.example", "")
    assert encrypted_by_name("https://dns.example") == Upstream("", 443, "https", "dns.example", "/dns-query")
    for not_this_form in ("tls://dns.example@192.0.2.1", "8.8.8.8", "dns.example:53"):
        assert encrypted_by_name(not_this_form) is None
    for bad in ("tls://dns.example:0", "tls://bad..name", "https://:443/x"):
        with pytest.raises(UpstreamError):
            encrypted_by_name(bad)


def test_encrypted_upstreams_travel_in_network_maps_and_the_control_store(tmp_path) -> None:  # noqa: ANN001
    """An admin's `tls://` route reaches a node's view as an encrypted upstream (store -> map -> view)."""
    from meshnode.control.store import ControlStore, InvalidValue
    from meshnode.netmap import DnsConfig, NetMap, netmap_to_view
    store = ControlStore(tmp_path / "c.db")
    store.add_route("corp.example", ["tls://ns.corp.example@10.0.0.53"])
    store.set_nameservers(["https://dns.example@192.0.2.53/dns-query"])
    settings = store.dns_settings()
    nm = NetMap(1, "tailnet", _self_node(), dns=DnsConfig(tuple(settings.nameservers), dict(settings.routes)))
    view = netmap_to_view(NetMap.from_json(nm.to_json()))
    assert view.dns.routes["corp.example"] == (Upstream("10.0.0.53", 853, "tls", "ns.corp.example"),)
    assert view.dns.nameservers == (Upstream("192.0.2.53", 443, "https", "dns.example", "/dns-query"),)
    # By name: the node resolves it through its original resolvers when it connects (stub.NameCache).
    store.add_route("by-name.example", ["tls://ns.corp.example"])
    settings = store.dns_settings()
    nm = NetMap(1, "tailnet", _self_node(), dns=DnsConfig(tuple(settings.nameservers), dict(settings.routes)))
    view = netmap_to_view(NetMap.from_json(nm.to_json()))
    assert view.dns.routes["by-name.example"] == (Upstream("", 853, "tls", "ns.corp.example"),)
    with pytest.raises(InvalidValue):
        store.add_route("corp.example", ["tls://bad..name"])


def _self_node():  # noqa: ANN202
    from meshnode.netmap import MapNode
    return MapNode(id=1, name="a", fqdn="a.tailnet", user="u", addresses=("100.64.0.1",),
                   node_key="A" * 43 + "=")
