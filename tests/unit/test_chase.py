"""CNAME chains across the border of our zones (RFC 1034 3.6.2, 4.3.1): the engine's `Chase`
decision, splicing the upstream's answer behind our chain, and completing forwarded chains that
end at one of our names. Sans-I/O: upstream replies are built here as bytes."""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from magicdns.chase import chase_reply, complete_chain
from magicdns.engine import MAX_CNAME_CHAIN, Chase, Engine
from magicdns.records import parse_record
from magicdns.upstream import Upstream
from magicdns.view import DnsSettings, DnsView, Host
from magicdns.zone import Zone

UP = Upstream("127.0.0.1", 5399)


def rec(name: str, rtype: str, value: str):
    return parse_record(name, rtype, value, 60, "tailnet")


CHAIN = tuple(rec(f"c{i}", "CNAME", f"c{i + 1}") for i in range(MAX_CNAME_CHAIN)) + (rec(f"c{MAX_CNAME_CHAIN}", "A", "100.64.0.7"),)

VIEW = DnsView(
    domain="tailnet",
    peers=(Host("server", (ipaddress.ip_address("100.64.0.2"), ipaddress.ip_address("fd7a:115c:a1e0::2"))),),
    dns=DnsSettings(nameservers=(UP,), records=(
        rec("outside", "CNAME", "www.example.com."),
        rec("hop", "CNAME", "outside"),
        rec("loop1", "CNAME", "loop2"),
        rec("loop2", "CNAME", "loop1"),
        *CHAIN,
    )),
    version=3,
)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(Zone(VIEW))


def query(name: str, rtype: str = "A", rd: bool = True, **kw) -> dns.message.Message:
    q = dns.message.make_query(name, rtype, **kw)
    if not rd:
        q.flags &= ~dns.flags.RD
    return q


def upstream_reply(sub: bytes, *answer: str, rcode: int = dns.rcode.NOERROR, soa: bool = False) -> bytes:
    """What an upstream says to the engine's subquery."""
    q = dns.message.from_wire(sub)
    r = dns.message.make_response(q)
    r.flags |= dns.flags.RA
    r.set_rcode(rcode)
    for text in answer:
        r.answer.append(dns.rrset.from_text(*text.split(None, 3)[0:1], 300, "IN", *text.split(None, 3)[2:]))
    if soa:
        r.authority.append(dns.rrset.from_text("example.com.", 60, "IN", "SOA",
                                               "ns.example.com. admin.example.com. 1 2 3 4 60"))
    return r.to_wire(max_size=65535)


def test_rd_set_chases_out_of_zone_target(engine: Engine) -> None:
    q = query("Outside.Tailnet", "A", use_edns=0, want_dnssec=True)
    out = engine.handle(q.to_wire())
    assert isinstance(out, Chase)
    assert out.target == "www.example.com" and out.route.upstreams == (UP,)
    sub = dns.message.from_wire(out.subquery)
    assert str(sub.question[0].name) == "www.example.com." and sub.flags & dns.flags.RD
    reply = dns.message.from_wire(chase_reply(out, q.to_wire(), upstream_reply(
        out.subquery, "www.example.com. 300 A 192.0.2.1")))
    assert reply.id == q.id and reply.rcode() == dns.rcode.NOERROR
    assert str(reply.question[0].name) == "Outside.Tailnet."
    assert [(str(r.name).lower(), r.rdtype) for r in reply.answer] == [
        ("outside.tailnet.", dns.rdatatype.CNAME), ("www.example.com.", dns.rdatatype.A)]
    assert not reply.flags & dns.flags.AA  # not all of it is ours
    assert reply.flags & dns.flags.RA and reply.flags & dns.flags.RD
    assert reply.edns == 0 and reply.ednsflags & dns.flags.DO


def test_chase_through_an_in_zone_chain_and_nxdomain_passes_with_soa(engine: Engine) -> None:
    q = query("hop.tailnet", "AAAA", use_edns=False)
    out = engine.handle(q.to_wire())
    assert isinstance(out, Chase)
    reply = dns.message.from_wire(chase_reply(out, q.to_wire(), upstream_reply(
        out.subquery, rcode=dns.rcode.NXDOMAIN, soa=True)))
    assert reply.rcode() == dns.rcode.NXDOMAIN and reply.edns == -1
    assert [str(r.name) for r in reply.answer] == ["hop.tailnet.", "outside.tailnet."]
    assert [r.rdtype for r in reply.authority] == [dns.rdatatype.SOA]


def test_upstream_failure_is_our_servfail(engine: Engine) -> None:
    q = query("outside.tailnet")
    out = engine.handle(q.to_wire())
    assert isinstance(out, Chase)
    reply = dns.message.from_wire(chase_reply(out, q.to_wire(), upstream_reply(out.subquery, rcode=dns.rcode.REFUSED)))
    assert reply.rcode() == dns.rcode.SERVFAIL and reply.id == q.id
    reply = dns.message.from_wire(chase_reply(out, q.to_wire(), b"garbage"))
    assert reply.rcode() == dns.rcode.SERVFAIL


def test_chased_reply_is_cut_to_the_clients_size(engine: Engine) -> None:
    q = query("outside.tailnet", "TXT", use_edns=False)
    out = engine.handle(q.to_wire())
    big = [f'www.example.com. 300 TXT "{"x" * 200}{i}"' for i in range(6)]
    raw = chase_reply(out, q.to_wire(), upstream_reply(out.subquery, *big))
    assert len(raw) <= 512 and dns.message.from_wire(raw).flags & dns.flags.TC
    out = engine.handle(q.to_wire(), tcp=True)
    raw = chase_reply(out, q.to_wire(), upstream_reply(out.subquery, *big))
    assert len(dns.message.from_wire(raw).answer) == 2  # the CNAME and the whole TXT RRset


def test_rd_clear_gets_the_bare_cname_and_is_not_memoised(engine: Engine) -> None:
    e = Engine(engine.zone)
    for _ in range(2):
        r = dns.message.from_wire(e.handle(query("outside.tailnet", rd=False).to_wire()))
        assert r.flags & dns.flags.AA and [str(x.name) for x in r.answer] == ["outside.tailnet."]
    # the fast path does not look at RD: a later RD query must still be chased
    assert isinstance(e.handle(query("outside.tailnet").to_wire()), Chase)


def test_no_upstream_gives_the_bare_cname() -> None:
    e = Engine(Zone(DnsView(dns=DnsSettings(records=(rec("outside", "CNAME", "www.example.com."),)))))
    r = dns.message.from_wire(e.handle(query("outside.tailnet").to_wire()))
    assert [str(x.name) for x in r.answer] == ["outside.tailnet."]


def test_long_chains_and_loops(engine: Engine) -> None:
    r = dns.message.from_wire(engine.handle(query("c0.tailnet").to_wire()))
    assert len(r.answer) == MAX_CNAME_CHAIN + 1 and MAX_CNAME_CHAIN >= 16
    assert r.answer[-1].rdtype == dns.rdatatype.A
    r = dns.message.from_wire(engine.handle(query("loop1.tailnet").to_wire()))
    assert [str(x.name) for x in r.answer] == ["loop1.tailnet.", "loop2.tailnet."]  # each link once


def forwarded(name: str, rtype: str, *answer: str, rcode: int = dns.rcode.NOERROR) -> bytes:
    q = dns.message.make_query(name, rtype)
    return upstream_reply(q.to_wire(), *answer, rcode=rcode)


def test_forwarded_chain_ending_in_our_zone_is_completed(engine: Engine) -> None:
    # the upstream knows only the CNAME; the tailnet name is ours (its address would be stripped anyway)
    raw = forwarded("svc.example.com", "A", "svc.example.com. 300 CNAME alias.example.com.",
                    "alias.example.com. 300 CNAME server.tailnet.", rcode=dns.rcode.NXDOMAIN)
    r = dns.message.from_wire(complete_chain(engine.zone, raw))
    assert r.rcode() == dns.rcode.NOERROR and not r.flags & dns.flags.AA
    assert [(str(x.name), x.rdtype) for x in r.answer] == [
        ("svc.example.com.", dns.rdatatype.CNAME), ("alias.example.com.", dns.rdatatype.CNAME),
        ("server.tailnet.", dns.rdatatype.A)]
    assert str(r.answer[-1][0]) == "100.64.0.2"
    # a chain into a name we do not have: our NXDOMAIN with our SOA
    raw = forwarded("svc.example.com", "A", "svc.example.com. 300 CNAME nobody.tailnet.")
    r = dns.message.from_wire(complete_chain(engine.zone, raw))
    assert r.rcode() == dns.rcode.NXDOMAIN and str(r.authority[0].name) == "tailnet."


def test_forwarded_replies_without_our_names_are_untouched(engine: Engine) -> None:
    for raw in (forwarded("www.example.com", "A", "www.example.com. 300 A 192.0.2.1"),
                forwarded("a.example.com", "A", "a.example.com. 300 CNAME b.example.com.",
                          "b.example.com. 300 A 192.0.2.2"),
                forwarded("a.example.com", "CNAME", "a.example.com. 300 CNAME server.tailnet.")):
        assert complete_chain(engine.zone, raw) is raw


def test_completion_does_not_parse_replies_without_our_names(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forwarded CNAME answers are common (CDNs): only those naming one of our zones are parsed."""
    import magicdns.chase

    parsed = []
    real = magicdns.chase.DNSRecord.parse
    monkeypatch.setattr(magicdns.chase.DNSRecord, "parse", lambda data: parsed.append(data) or real(data))
    cdn = forwarded("www.example.com", "A", "www.example.com. 300 CNAME edge.cdn.example.net.",
                    "edge.cdn.example.net. 300 A 192.0.2.3")
    assert complete_chain(engine.zone, cdn) is cdn and not parsed
    ours = forwarded("www.example.com", "A", "www.example.com. 300 CNAME SERVER.TAILNET.")
    assert complete_chain(engine.zone, ours) is not ours and parsed


def test_second_chase_comes_from_the_plan_and_keeps_the_clients_case(engine: Engine) -> None:
    e = Engine(engine.zone)
    first = e.handle(query("outside.tailnet", use_edns=0).to_wire())
    assert isinstance(first, Chase) and e.slow == 1
    q = query("OUTSIDE.tailnet", use_edns=0, want_dnssec=True)
    q.flags |= dns.flags.CD
    second = e.handle(q.to_wire())
    assert isinstance(second, Chase) and e.slow == 1  # no second trip through the slow path
    sub = dns.message.from_wire(second.subquery)
    assert sub.flags & dns.flags.CD and sub.ednsflags & dns.flags.DO and str(sub.question[0].name) == "www.example.com."
    reply = dns.message.from_wire(chase_reply(second, q.to_wire(), upstream_reply(
        second.subquery, "www.example.com. 300 A 192.0.2.1")))
    assert str(reply.question[0].name) == "OUTSIDE.tailnet." and reply.flags & dns.flags.CD
    assert [r.rdtype for r in reply.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
