"""The sans-I/O parts of DoH (magicdns/doh.py) and the encrypted upstream specs (magicdns/upstream.py)."""

from __future__ import annotations

import base64

import pytest
from dnslib import RR, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from magicdns.doh import DohError, DohRequest, HttpStatus, dns_query, min_ttl, plain_get, response_headers
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
    assert (b"cache-control", b"max-age=7") in response_headers(wire)
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


def _reference_query(req: DohRequest, body: bytes) -> bytes | HttpStatus:
    """RFC 8484 decoding the slow, obvious way (urlsplit + parse_qs every time): the oracle for the
    fast paths in doh.py, which skip both for the targets every client sends."""
    from urllib.parse import parse_qs, urlsplit
    if len(req.target) > 2 * 65535:
        return HttpStatus.URI_TOO_LONG
    if urlsplit(req.target).path != "/dns-query":
        return HttpStatus.NOT_FOUND
    if req.method not in ("GET", "POST"):
        return HttpStatus.METHOD_NOT_ALLOWED
    if req.method == "POST":
        if (req.content_type or "").split(";", 1)[0].strip().lower() != "application/dns-message":
            return HttpStatus.UNSUPPORTED_MEDIA_TYPE
        query = body
    else:
        values = parse_qs(urlsplit(req.target).query, keep_blank_values=True).get("dns")
        if not values or len(values) != 1:
            return HttpStatus.BAD_REQUEST
        try:
            query = base64.urlsafe_b64decode(values[0] + "=" * (-len(values[0]) % 4))
        except ValueError:
            return HttpStatus.BAD_REQUEST
    return query if 12 <= len(query) <= 65535 else HttpStatus.BAD_REQUEST


B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@settings(max_examples=1000)
@given(prefix=st.sampled_from(["/dns-query", "/dns-query?", "/dns-query?dns=", "/dns-query?x=1&dns=", "/dns-query#",
                               "https://dns.test/dns-query?dns=", "/dns-queryX?dns=", "/DNS-QUERY?dns=", ""]),
       value=st.one_of(st.binary(min_size=0, max_size=80).map(lambda b: base64.urlsafe_b64encode(b).decode()),
                       st.text(alphabet=B64URL + "=+%&#;/ ", max_size=80)),
       method=st.sampled_from(["GET", "POST"]), body=st.binary(max_size=40))
def test_fast_paths_agree_with_the_obvious_decoding(prefix: str, value: str, method: str, body: bytes) -> None:
    req = DohRequest(method, prefix + value, "application/dns-message", None)
    want = _reference_query(req, body)
    try:
        got: bytes | HttpStatus = dns_query(req, body)
    except DohError as exc:
        got = exc.status
    assert got == want


def test_cache_control_follows_the_reply_not_a_remembered_one() -> None:
    """The max-age memo is keyed on the reply's bytes: the same answer with another ID hits, and a
    reply whose TTLs changed (a forwarded answer ageing in the cache) gets its own, smaller value."""
    def reply(ttl: int, qid: int) -> bytes:
        r = DNSRecord.question("memo.test", "A").reply()
        r.header.id = qid
        r.add_answer(*RR.fromZone(f"memo.test. {ttl} IN A 192.0.2.1"))
        return bytes(r.pack())
    assert min_ttl(reply(300, 1)) == 300
    assert min_ttl(reply(300, 2)) == 300
    assert min_ttl(reply(299, 1)) == 299
    for i in range(5000):  # past the memo's bound: it stays bounded and right
        assert min_ttl(reply(i % 700, i)) == i % 700
    from magicdns import doh
    assert len(doh._TTL_MEMO) <= doh._TTL_MEMO_SIZE


@pytest.mark.parametrize("text,want", [("35", 35), ("0", 0), (None, None), ("", None), ("-5", None), (" 5", None),
                                       ("\u00b2", None), ("\u0663", None), ("5x", None)])
def test_content_length_takes_only_ascii_digits(text: str | None, want: int | None) -> None:
    from magicdns.doh import content_length
    assert content_length(text) == want


@settings(max_examples=1000)
@given(prefix=st.sampled_from([b"/dns-query?dns=", b"/dns-query?x=1&dns=", b"/dns-query/?dns=", b"/other?dns=", b""]),
       text=st.one_of(st.binary(min_size=0, max_size=80).map(lambda b: b64(b).encode()),
                      st.binary(min_size=0, max_size=80).map(base64.urlsafe_b64encode),
                      st.binary(min_size=0, max_size=80).map(base64.standard_b64encode),
                      st.text(alphabet=B64URL + "=+%&#;/ \n\xff", max_size=80).map(lambda t: t.encode("latin-1"))))
def test_the_http2_get_shortcut_accepts_only_what_the_general_path_accepts_alike(prefix: bytes, text: bytes) -> None:
    """dohserver answers `plain_get`'s query for a bodiless HTTP/2 GET without check_head/query_of:
    whatever it accepts, the general path must accept with the same bytes; and it must accept the
    query every client sends."""
    target = prefix + text
    got = plain_get(target)
    if got is None:
        return
    assert got == dns_query(DohRequest("GET", target.decode("latin-1"), None, None), b"")


def test_the_http2_get_shortcut_takes_the_common_request() -> None:
    assert plain_get(b"/dns-query?dns=" + b64(QUERY).encode()) == QUERY
    assert plain_get(b"/dns-query?dns=" + base64.urlsafe_b64encode(QUERY)) == QUERY
    assert plain_get(b"/dns-query?dns=" + b64(QUERY[:5]).encode()) is None  # too short: the general 400
    assert plain_get(b"/dns-query?dns=" + b64(b"\xfb\xff" * 10).encode()) == b"\xfb\xff" * 10  # '-' and '_'


def test_our_own_goaway_frame_reads_as_one_in_another_http2_stack() -> None:
    """The GOAWAY the listener writes itself when ngh2 gives up on a connection, read by hyperframe
    (h2's frame layer): type, stream 0, last stream ID, error code, nothing left over."""
    from hyperframe.frame import Frame, GoAwayFrame
    from magicdns.dohserver import _ENHANCE_YOUR_CALM, _goaway_frame
    wire = _goaway_frame(0x80000007, _ENHANCE_YOUR_CALM)  # the reserved bit is cleared
    frame, length = Frame.parse_frame_header(memoryview(wire[:9]))
    frame.parse_body(memoryview(wire[9:9 + length]))
    assert isinstance(frame, GoAwayFrame) and frame.stream_id == 0 and len(wire) == 9 + length
    assert frame.last_stream_id == 7 and frame.error_code == 0xB
