"""The sans-I/O answer engine: authoritative answers, EDNS, errors, truncation, the fast path."""

from __future__ import annotations

import ipaddress
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest

from magicdns.engine import Engine, Forward
from magicdns.message import MAX_UDP_PAYLOAD
from magicdns.records import parse_record
from magicdns.upstream import Upstream
from magicdns.view import DnsSettings, DnsView, Host
from magicdns.zone import Zone


def host(name: str, *addrs: str, online: bool = True) -> Host:
    return Host(name, tuple(ipaddress.ip_address(a) for a in addrs), (), online)


def rec(name: str, rtype: str, value: str, ttl: int | None = None, override: bool = False):
    return parse_record(name, rtype, value, ttl, "tailnet", override)


VIEW = DnsView(
    domain="tailnet",
    self_host=host("laptop", "100.64.0.1", "fd7a:115c:a1e0::1"),
    peers=(
        host("server", "100.64.0.2", "fd7a:115c:a1e0::2"),
        host("db", "100.64.0.3", "100.64.0.4", "100.64.0.5", "fd7a:115c:a1e0::3"),
        host("printer", "100.64.0.9", online=False),
        host("web", "100.64.0.10"),
    ),
    dns=DnsSettings(
        nameservers=(Upstream("127.0.0.1", 5399),),
        routes={"corp.example": (Upstream("10.0.0.53"),), "lab.tailnet": (Upstream("100.64.0.53"),),
                "local.example": ()},
        records=(
            rec("grafana", "CNAME", "server"),
            rec("chain1", "CNAME", "chain2"),
            rec("chain2", "CNAME", "server"),
            rec("dangling", "CNAME", "nothing-here"),
            rec("outside", "CNAME", "example.com"),
            rec("loop1", "CNAME", "loop2"),
            rec("loop2", "CNAME", "loop1"),
            rec("_http._tcp", "SRV", "10 5 80 server"),
            rec("tailnet.", "MX", "10 server"),
            rec("tailnet.", "TXT", '"v=spf1 -all"'),
            rec("tailnet.", "CAA", '0 issue "letsencrypt.org"'),
            rec("*.dev", "A", "100.64.0.2"),
            rec("*.dev", "TXT", "wild"),
            rec("dev", "TXT", "preview"),
            rec("exists.dev", "TXT", "blocks the wildcard"),
            rec("web", "A", "100.64.0.99"),  # shadows a node without override: ignored
            rec("printer", "A", "100.64.0.98", override=True),  # shadows with override
            rec("web", "TXT", "a web server"),  # does not shadow: served beside the node's A
            rec("wiki.local.example.", "A", "100.64.0.2"),
        ),
    ),
    version=7,
)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(Zone(VIEW))


def ask(engine: Engine, name: str, rtype: str = "A", *, edns: int | None = 0, payload: int = 1232,
        tcp: bool = False, want_dnssec: bool = False, rd: bool = True) -> dns.message.Message:
    q = dns.message.make_query(name, rtype, use_edns=False if edns is None else edns, payload=payload,
                               want_dnssec=want_dnssec)
    if not rd:
        q.flags &= ~dns.flags.RD
    wire = q.to_wire()
    out = engine.handle(wire, tcp=tcp)
    assert isinstance(out, bytes), f"expected a reply for {name} {rtype}, got {out!r}"
    reply = dns.message.from_wire(out)
    assert reply.id == q.id
    return reply


def answers(reply: dns.message.Message) -> set[str]:
    return {f"{rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} {rd}" for rrset in reply.answer for rd in rrset}


def soa_serial(reply: dns.message.Message) -> int:
    (soa,) = [r for r in reply.authority if r.rdtype == dns.rdatatype.SOA]
    return soa[0].serial


def test_node_address_is_authoritative(engine: Engine) -> None:
    r = ask(engine, "server.tailnet")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.AA and r.flags & dns.flags.QR and r.flags & dns.flags.RA
    assert answers(r) == {"server.tailnet. A 100.64.0.2"}
    assert r.answer[0].ttl == 300


def test_aaaa_and_every_address_rotated(engine: Engine) -> None:
    r = ask(engine, "db.tailnet", "AAAA")
    assert answers(r) == {"db.tailnet. AAAA fd7a:115c:a1e0::3"}
    orders = set()
    for _ in range(6):
        r = ask(engine, "db.tailnet")
        assert answers(r) == {f"db.tailnet. A 100.64.0.{i}" for i in (3, 4, 5)}
        orders.add(tuple(str(rd) for rd in r.answer[0]))
    assert len(orders) == 3  # round robin: each address leads in turn


def test_question_case_echoed_and_owner_follows(engine: Engine) -> None:
    q = dns.message.make_query("SeRvEr.TailNet", "A")
    raw = engine.handle(q.to_wire())
    assert b"\x06SeRvEr\x07TailNet\x00" in raw
    r = dns.message.from_wire(raw)
    assert str(r.question[0].name) == "SeRvEr.TailNet."
    assert answers(r) == {"SeRvEr.TailNet. A 100.64.0.2"}


def test_nxdomain_carries_soa_with_view_version(engine: Engine) -> None:
    r = ask(engine, "nobody.tailnet")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.AA
    assert not r.answer
    assert soa_serial(r) == 7
    assert r.authority[0].name.to_text() == "tailnet."


def test_nodata_for_existing_name_without_type(engine: Engine) -> None:
    r = ask(engine, "printer.tailnet", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    assert soa_serial(r) == 7


def test_apex_soa_ns_mx_txt_caa(engine: Engine) -> None:
    assert ask(engine, "tailnet", "SOA").answer[0][0].serial == 7
    assert answers(ask(engine, "tailnet", "NS")) == {"tailnet. NS magicdns.tailnet."}
    ns_reply = ask(engine, "tailnet", "NS")
    assert {str(rd) for rrset in ns_reply.additional for rd in rrset} == {"100.100.100.100", "fd7a:115c:a1e0::53"}
    assert answers(ask(engine, "tailnet", "MX")) == {"tailnet. MX 10 server.tailnet."}
    assert answers(ask(engine, "tailnet", "TXT")) == {'tailnet. TXT "v=spf1 -all"'}
    assert answers(ask(engine, "tailnet", "CAA")) == {'tailnet. CAA 0 issue "letsencrypt.org"'}
    assert ask(engine, "tailnet", "A").rcode() == dns.rcode.NOERROR  # apex exists: NODATA


def test_short_name_expands_to_the_tailnet(engine: Engine) -> None:
    r = ask(engine, "server")
    assert answers(r) == {"server. A 100.64.0.2"}
    assert r.flags & dns.flags.AA


def test_cname_chased_inside_the_zone(engine: Engine) -> None:
    r = ask(engine, "grafana.tailnet", "AAAA")
    assert answers(r) == {"grafana.tailnet. CNAME server.tailnet.", "server.tailnet. AAAA fd7a:115c:a1e0::2"}
    assert [rrset.rdtype for rrset in r.answer] == [dns.rdatatype.CNAME, dns.rdatatype.AAAA]
    r = ask(engine, "chain1.tailnet")
    assert [str(rrset.name) for rrset in r.answer] == ["chain1.tailnet.", "chain2.tailnet.", "server.tailnet."]
    assert answers(ask(engine, "grafana.tailnet", "CNAME")) == {"grafana.tailnet. CNAME server.tailnet."}


def test_cname_to_missing_name_gives_targets_rcode(engine: Engine) -> None:
    r = ask(engine, "dangling.tailnet")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert answers(r) == {"dangling.tailnet. CNAME nothing-here.tailnet."}
    assert soa_serial(r) == 7


def test_cname_out_of_zone_and_loops_stop(engine: Engine) -> None:
    # RD clear: the authoritative answer, the bare CNAME (RD set is chased: tests/unit/test_chase.py)
    r = ask(engine, "outside.tailnet", rd=False)
    assert r.rcode() == dns.rcode.NOERROR and answers(r) == {"outside.tailnet. CNAME example.com."}
    r = ask(engine, "loop1.tailnet")
    assert r.rcode() == dns.rcode.NOERROR
    assert answers(r) == {"loop1.tailnet. CNAME loop2.tailnet.", "loop2.tailnet. CNAME loop1.tailnet."}


def test_srv_with_additional_addresses(engine: Engine) -> None:
    r = ask(engine, "_http._tcp.tailnet", "SRV")
    assert answers(r) == {"_http._tcp.tailnet. SRV 10 5 80 server.tailnet."}
    assert {str(rd) for rrset in r.additional for rd in rrset} == {"100.64.0.2", "fd7a:115c:a1e0::2"}


def test_empty_non_terminal_is_nodata(engine: Engine) -> None:
    r = ask(engine, "_tcp.tailnet", "TXT")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and soa_serial(r) == 7


def test_wildcards_follow_rfc4592(engine: Engine) -> None:
    r = ask(engine, "anything.dev.tailnet")
    assert answers(r) == {"anything.dev.tailnet. A 100.64.0.2"}
    assert answers(ask(engine, "a.b.c.dev.tailnet", "TXT")) == {'a.b.c.dev.tailnet. TXT "wild"'}
    # the wildcard owns no AAAA: NODATA, not NXDOMAIN
    r = ask(engine, "anything.dev.tailnet", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    # an existing name blocks the wildcard, for itself and for names below it
    r = ask(engine, "exists.dev.tailnet", "A")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    r = ask(engine, "below.exists.dev.tailnet", "A")
    assert r.rcode() == dns.rcode.NXDOMAIN
    # the wildcard's parent is not matched by it
    assert answers(ask(engine, "dev.tailnet", "TXT")) == {'dev.tailnet. TXT "preview"'}
    assert ask(engine, "dev.tailnet", "A").rcode() == dns.rcode.NOERROR


def test_records_shadow_nodes_only_with_override(engine: Engine) -> None:
    assert answers(ask(engine, "web.tailnet")) == {"web.tailnet. A 100.64.0.10"}
    assert answers(ask(engine, "web.tailnet", "TXT")) == {'web.tailnet. TXT "a web server"'}
    assert answers(ask(engine, "printer.tailnet")) == {"printer.tailnet. A 100.64.0.98"}
    assert any("web.tailnet" in w for w in engine.zone.warnings)


def test_ptr_for_every_node_address(engine: Engine) -> None:
    for name, addrs in (("server", ("100.64.0.2", "fd7a:115c:a1e0::2")),
                        ("db", ("100.64.0.3", "100.64.0.4", "100.64.0.5", "fd7a:115c:a1e0::3"))):
        for addr in addrs:
            rev = dns.reversename.from_address(addr)
            r = ask(engine, str(rev), "PTR")
            assert answers(r) == {f"{rev} PTR {name}.tailnet."}, addr
            assert r.flags & dns.flags.AA


def test_reverse_zone_nxdomain_and_ent(engine: Engine) -> None:
    r = ask(engine, "77.0.64.100.in-addr.arpa", "PTR")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert str(r.authority[0].name) == "64.100.in-addr.arpa."
    r = ask(engine, "0.64.100.in-addr.arpa", "PTR")  # above node addresses: exists, no data
    assert r.rcode() == dns.rcode.NOERROR and not r.answer
    r = ask(engine, "1.64.100.in-addr.arpa", "PTR")
    assert r.rcode() == dns.rcode.NXDOMAIN
    r = ask(engine, "64.100.in-addr.arpa", "SOA")
    assert r.answer and r.flags & dns.flags.AA
    v6 = str(dns.reversename.from_address("fd7a:115c:a1e0::99"))
    assert ask(engine, v6, "PTR").rcode() == dns.rcode.NXDOMAIN
    assert ask(engine, "0.e.1.a.c.5.1.1.a.7.d.f.ip6.arpa", "SOA").answer


def test_local_route_is_authoritative(engine: Engine) -> None:
    assert answers(ask(engine, "wiki.local.example")) == {"wiki.local.example. A 100.64.0.2"}
    r = ask(engine, "other.local.example")
    assert r.rcode() == dns.rcode.NXDOMAIN and str(r.authority[0].name) == "local.example."


def test_forwarding_decisions_follow_the_most_specific_route(engine: Engine) -> None:
    def fwd(name: str) -> Forward:
        out = engine.handle(dns.message.make_query(name, "A").to_wire())
        assert isinstance(out, Forward)
        return out

    assert fwd("example.com").route.upstreams == (Upstream("127.0.0.1", 5399),)
    assert fwd("host.corp.example").route.upstreams == (Upstream("10.0.0.53"),)
    lab = fwd("x.lab.tailnet").route
    assert lab.upstreams == (Upstream("100.64.0.53"),) and lab.allow_tailnet_answers
    assert not fwd("example.com").route.allow_tailnet_answers
    # the second sight of a question comes from the fast path and decides the same
    assert fwd("host.corp.example").route.suffix == "corp.example"


def test_no_upstream_forward_decision_has_no_route() -> None:
    e = Engine(Zone(DnsView()))
    out = e.handle(dns.message.make_query("example.com", "A").to_wire())
    assert isinstance(out, Forward) and out.route is None


def test_edns_echoed_with_our_size_and_do_bit(engine: Engine) -> None:
    r = ask(engine, "server.tailnet", want_dnssec=True, payload=4096)
    assert r.edns == 0 and r.payload == MAX_UDP_PAYLOAD
    assert r.ednsflags & dns.flags.DO
    r = ask(engine, "server.tailnet", payload=4096)
    assert not r.ednsflags & dns.flags.DO
    r = ask(engine, "server.tailnet", edns=None)
    assert r.edns == -1


def test_unknown_edns_options_ignored(engine: Engine) -> None:
    q = dns.message.make_query("server.tailnet", "A", use_edns=0,
                               options=[dns.edns.GenericOption(65001, b"xyz"),
                                        dns.edns.GenericOption(10, b"12345678")])
    r = dns.message.from_wire(engine.handle(q.to_wire()))
    assert answers(r) == {"server.tailnet. A 100.64.0.2"}
    assert r.edns == 0 and not r.options


def test_badvers_for_edns_version_above_zero(engine: Engine) -> None:
    q = dns.message.make_query("server.tailnet", "A", use_edns=1)
    r = dns.message.from_wire(engine.handle(q.to_wire()))
    assert r.rcode() == dns.rcode.BADVERS
    assert r.edns == 0 and not r.answer


def test_rd_and_cd_copied(engine: Engine) -> None:
    r = ask(engine, "server.tailnet", rd=False)
    assert not r.flags & dns.flags.RD
    q = dns.message.make_query("server.tailnet", "A")
    q.flags |= dns.flags.CD
    r = dns.message.from_wire(engine.handle(q.to_wire()))
    assert r.flags & dns.flags.CD and r.flags & dns.flags.RD


def test_truncation_cuts_the_answer_and_sets_tc() -> None:
    big = DnsView(peers=(host("many", *[f"100.64.1.{i}" for i in range(1, 61)]),), version=1)
    e = Engine(Zone(big))
    r = ask(e, "many.tailnet", edns=None)
    assert r.flags & dns.flags.TC
    wire_len = len(e.handle(dns.message.make_query("many.tailnet", "A").to_wire()))
    assert wire_len <= 512
    assert r.answer and 0 < len(r.answer[0]) < 60  # as many whole records as fit
    r = ask(e, "many.tailnet", payload=4096)  # capped at our 1232: 60 A records fit
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 60
    r = ask(e, "many.tailnet", edns=None, tcp=True)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 60


def test_refused_for_other_classes_and_zone_transfers(engine: Engine) -> None:
    q = dns.message.make_query("version.bind", "TXT", rdclass="CH")
    assert dns.message.from_wire(engine.handle(q.to_wire())).rcode() == dns.rcode.REFUSED
    q = dns.message.make_query("tailnet", "AXFR")
    assert dns.message.from_wire(engine.handle(q.to_wire(), tcp=True)).rcode() == dns.rcode.REFUSED


def test_notimp_for_other_opcodes(engine: Engine) -> None:
    q = dns.message.make_query("server.tailnet", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    r = dns.message.from_wire(engine.handle(q.to_wire()))
    assert r.rcode() == dns.rcode.NOTIMP and r.opcode() == dns.opcode.NOTIFY


def test_formerr_and_silence(engine: Engine) -> None:
    q = dns.message.make_query("server.tailnet", "A").to_wire()
    # two questions
    two = q[:4] + b"\x00\x02" + q[6:] + q[12:]
    assert engine.handle(two)[3] & 0xF == dns.rcode.FORMERR
    # a truncated question: header readable, FORMERR with our ID
    cut = engine.handle(q[:20])
    assert cut[:2] == q[:2] and cut[3] & 0xF == dns.rcode.FORMERR
    # no question at all
    assert engine.handle(q[:4] + b"\x00\x00" + q[6:12])[3] & 0xF == dns.rcode.FORMERR
    # unreadable header, or a response: silence
    assert engine.handle(b"\x01\x02\x03") is None
    assert engine.handle(q[:2] + bytes([q[2] | 0x80]) + q[3:]) is None
    # a compression pointer loop in the question
    loop = q[:12] + b"\xc0\x0c\x00\x01\x00\x01"
    assert engine.handle(loop)[3] & 0xF == dns.rcode.FORMERR


def test_fast_path_serves_the_second_query(engine: Engine) -> None:
    e = Engine(engine.zone)
    wire = dns.message.make_query("Server.tailnet", "A").to_wire()
    first = e.handle(wire)
    assert e.slow == 1 and e.fast_hits == 0
    second = e.handle(wire)
    assert e.fast_hits == 1
    assert first == second
    other_case = dns.message.make_query("SERVER.TAILNET", "A")
    r = dns.message.from_wire(e.handle(other_case.to_wire()))
    assert e.fast_hits == 2 and str(r.question[0].name) == "SERVER.TAILNET."


def test_memo_stays_bounded_and_holds_no_negatives() -> None:
    view = DnsView(peers=tuple(host(f"n{i}", f"100.64.2.{i}") for i in range(100)))
    e = Engine(Zone(view), memo_limit=10)
    for i in range(100):
        r = dns.message.from_wire(e.handle(dns.message.make_query(f"n{i}.tailnet", "A").to_wire()))
        assert [str(rd) for rd in r.answer[0]] == [f"100.64.2.{i}"]
    assert len(e._memo) <= 10 and len(e._old) <= 10
    fresh = Engine(Zone(view))
    for i in range(50):  # unique names that do not exist, and forwarded names, are answered without memo
        nx = fresh.handle(dns.message.make_query(f"missing-{i}.tailnet", "A").to_wire())
        assert nx[3] & 0xF == dns.rcode.NXDOMAIN
        assert isinstance(fresh.handle(dns.message.make_query(f"x{i}.example.com", "A").to_wire()), Forward)
    assert not fresh._memo and fresh.slow == 0


def test_wire_built_nxdomain_matches_the_rules(engine: Engine) -> None:
    for name, apex in (("a.b.nobody.tailnet", "tailnet."), ("77.1.64.100.in-addr.arpa", "64.100.in-addr.arpa."),
                       ("nope.local.example", "local.example.")):
        for use_edns in (False, 0):
            q = dns.message.make_query(name.upper(), "AAAA", use_edns=use_edns, want_dnssec=use_edns == 0)
            r = dns.message.from_wire(engine.handle(q.to_wire()))
            assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.AA and r.flags & dns.flags.RA
            assert str(r.question[0].name) == name.upper() + "."
            (soa,) = r.authority
            assert str(soa.name).lower() == apex and soa[0].serial == 7 and soa.ttl == 60
            assert str(soa[0].mname) == "magicdns.tailnet." and str(soa[0].rname) == "hostmaster.tailnet."
            assert r.edns == (0 if use_edns == 0 else -1)
            if use_edns == 0:
                assert r.ednsflags & dns.flags.DO


def test_any_returns_every_rrset(engine: Engine) -> None:
    r = ask(engine, "tailnet", "ANY")
    types = {rrset.rdtype for rrset in r.answer}
    assert {dns.rdatatype.SOA, dns.rdatatype.NS, dns.rdatatype.MX, dns.rdatatype.TXT} <= types


def test_answer_local_for_operators(engine: Engine) -> None:
    ans = engine.answer_local("server.tailnet", 1)
    assert ans is not None and ans.rcode == 0 and len(ans.answer) == 1
    assert engine.answer_local("example.com", 1) is None


def test_header_fields_of_fast_reply(engine: Engine) -> None:
    q = dns.message.make_query("server.tailnet", "A", use_edns=0)
    engine.handle(q.to_wire())
    raw = engine.handle(q.to_wire())
    qd, an, ns, ar = struct.unpack("!HHHH", raw[4:12])
    assert (qd, an, ns, ar) == (1, 1, 0, 1)


def test_truncated_opt_record_is_formerr_not_a_crash(engine: Engine) -> None:
    # found by the property test: an OPT record cut short after its type
    data = b"\xd3\xa9\x01\x00\x00\x01\x00\x00\x00\x00\x00\x01\tmy-server\x07tailnet\x00\x00\x01\x00\x01\x00\x00)"
    out = engine.handle(data)
    assert out[:2] == data[:2] and out[3] & 0xF == dns.rcode.FORMERR


def test_a_dot_inside_a_label_is_data_not_a_separator(engine: Engine) -> None:
    # found by the differential test against knot: \x0bsibling.dev is one label (RFC 4343 2.1)
    for name in ("my-server\\.dev.tailnet", "x\\.dev.tailnet", "2\\.0.64.100.in-addr.arpa"):
        q = dns.message.make_query(name, "A" if "arpa" not in name else "PTR")
        r = dns.message.from_wire(engine.handle(q.to_wire()))
        assert r.rcode() == dns.rcode.NXDOMAIN and not r.answer, name
    # a name spelled with the dot inside its first label is not ours: forwarded, never answered
    out = engine.handle(dns.message.make_query("server\\.tailnet", "A").to_wire())
    assert isinstance(out, Forward)
    # a CNAME answer for such a question stays well-formed (compression follows the client's layout)
    q = dns.message.make_query("grafana\\.tailnet", "A")
    out = engine.handle(q.to_wire())
    assert isinstance(out, Forward)


def test_record_outside_the_tailnet_domain_is_served_for_that_name_only() -> None:
    view = DnsView(dns=DnsSettings(
        nameservers=(Upstream("127.0.0.1", 5399),),
        routes={"corp.example": (Upstream("10.0.0.53"),)},
        records=(rec("outside.example.", "A", "192.0.2.7"), rec("outside.example.", "TXT", "hi"),
                 rec("wiki.corp.example.", "CNAME", "server.tailnet."))),
        peers=(host("server", "100.64.0.2"),))
    e = Engine(Zone(view))
    for _ in range(2):  # the fast path's second sight as well
        r = ask(e, "Outside.Example")
        assert answers(r) == {"Outside.Example. A 192.0.2.7"} and r.flags & dns.flags.AA
    r = ask(e, "outside.example", "AAAA")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer  # NODATA, from us
    assert ask(e, "outside.example", "SOA").answer == []  # one name is no zone of ours
    # the rest of the domain, and names below the record, still go to their routes
    for name, ups in (("www.example", (Upstream("127.0.0.1", 5399),)), ("a.outside.example", (Upstream("127.0.0.1", 5399),)),
                      ("host.corp.example", (Upstream("10.0.0.53"),))):
        for _ in range(2):
            out = e.handle(dns.message.make_query(name, "A").to_wire())
            assert isinstance(out, Forward) and out.route.upstreams == ups, name
    assert answers(ask(e, "wiki.corp.example")) == {"wiki.corp.example. CNAME server.tailnet.",
                                                   "server.tailnet. A 100.64.0.2"}


def test_reply_memo_is_exact_for_the_bytes_after_the_id() -> None:
    e = Engine(Zone(VIEW))
    q = dns.message.make_query("server.tailnet", "A", use_edns=0)
    first = e.handle(q.to_wire())  # the slow path builds the template; the next query memoises
    assert e.handle(q.to_wire()) == first and q.to_wire()[2:] in e.replies
    q.id = (q.id + 1) & 0xFFFF
    again = e.handle(q.to_wire())
    assert again[:2] == q.to_wire()[:2] and again[2:] == first[2:]
    # Any other byte (RD clear, DO set, the question's case) is another entry with its own reply.
    plain = ask(e, "server.tailnet", rd=False)
    assert not plain.flags & dns.flags.RD and answers(plain) == {"server.tailnet. A 100.64.0.2"}
    do = ask(e, "server.tailnet", want_dnssec=True)
    assert do.ednsflags & dns.flags.DO
    upper = ask(e, "SERVER.tailnet")
    assert str(upper.question[0].name) == "SERVER.tailnet."
    # Round-robin replies never go in: the rotation keeps turning.
    ask(e, "db.tailnet")
    assert not any(b"\x02db\x07tailnet" in k for k in e.replies)


def test_unique_negative_names_never_evict_the_reply_memo() -> None:
    view = DnsView(peers=tuple(host(f"n{i}", f"100.64.2.{i}") for i in range(5)))
    e = Engine(Zone(view), memo_limit=20)
    hot = [dns.message.make_query(f"n{i}.tailnet", "A").to_wire() for i in range(5)]
    for q in hot + hot:
        e.handle(q)
    for i in range(200):  # a flood of unique names that do not exist
        nx = e.handle(dns.message.make_query(f"missing-{i}.tailnet", "A").to_wire())
        assert nx[3] & 0xF == dns.rcode.NXDOMAIN
    assert len(e.replies) <= 20
    assert all(q[2:] in e.replies for q in hot)
    hits = e.fast_hits
    for q in hot:
        assert dns.message.from_wire(e.handle(q)).answer
    assert e.fast_hits == hits + 5


def test_a_reply_too_large_for_udp_is_never_memoised_for_udp() -> None:
    big = tuple(rec("big", "TXT", '"' + "x" * 200 + f'{i}"') for i in range(8))
    e = Engine(Zone(DnsView(dns=DnsSettings(records=big))))
    q = dns.message.make_query("big.tailnet", "TXT", use_edns=False)
    over_tcp = dns.message.from_wire(e.handle(q.to_wire(), tcp=True))
    assert not over_tcp.flags & dns.flags.TC and len(over_tcp.answer[0]) == 8
    for _ in range(2):
        udp = e.handle(q.to_wire())
        assert len(udp) <= 512 and dns.message.from_wire(udp).flags & dns.flags.TC
    assert not e.replies


def test_route_remembered_per_parent_never_hides_a_more_specific_route() -> None:
    e = Engine(Zone(VIEW))

    def decide(name: str) -> object:
        return e.handle(dns.message.make_query(name, "A").to_wire())

    # The parents' routes are remembered first ('example' forwards by default, 'tailnet' is ours)...
    assert decide("x.example").route.suffix == ""
    assert decide("nobody.tailnet")[3] & 0xF == dns.rcode.NXDOMAIN
    # ...and a name that is itself a route's suffix, or lies below one, still takes that route.
    for name, suffix in (("corp.example", "corp.example"), ("a.corp.example", "corp.example"),
                         ("lab.tailnet", "lab.tailnet"), ("n.lab.tailnet", "lab.tailnet")):
        fwd = decide(name)
        assert isinstance(fwd, Forward) and fwd.route.suffix == suffix, name
    nx = dns.message.from_wire(decide("nope.local.example"))
    assert nx.rcode() == dns.rcode.NXDOMAIN and str(nx.authority[0].name) == "local.example."
    assert e.slow == 0


def test_forwarding_decisions_agree_with_the_zone_in_any_order() -> None:
    """The fast path decides "forward" for a name from its parent alone when no route suffix and no
    exact name sits directly below that parent (a flood of unique names then costs no name text).
    Whatever order names arrive in (so whichever sibling filled the per-parent memo first), every
    decision must be the zone's own: exact names outside the domain served here, names beside and
    below them forwarded, split-DNS routes and the names below them, reverse zones, short host
    names, mixed case, the longest legal name."""
    import random

    from dnslib import DNSLabel

    from magicdns.engine import name_text
    from magicdns.zone import LocalZone

    view = DnsView(dns=DnsSettings(
        nameservers=(Upstream("127.0.0.1", 5399),),
        routes={"corp.example": (Upstream("10.0.0.53"),), "deep.in.other.test": (Upstream("10.0.0.54"),)},
        records=(rec("outside.example.", "A", "192.0.2.7"), rec("a.b.elsewhere.test.", "A", "192.0.2.8"))),
        peers=(host("server", "100.64.0.2"),))
    long_name = ".".join(["a" * 63] * 3) + "." + "b" * 50 + ".example"  # 252 octets of wire
    names = ["outside.example", "Outside.EXAMPLE", "www.example", "x.outside.example", "example",
             "corp.example", "host.corp.example", "a.host.corp.example", "CORP.example",
             "a.b.elsewhere.test", "z.b.elsewhere.test", "b.elsewhere.test", "q.a.b.elsewhere.test",
             "deep.in.other.test", "x.deep.in.other.test", "y.in.other.test", "in.other.test",
             "server", "Server", "nobody", "server.tailnet", "nobody.tailnet", "x.server.tailnet",
             "2.0.64.100.in-addr.arpa", "9.9.64.100.in-addr.arpa", "1.0.0.10.in-addr.arpa",
             "r123.rnd.up.test", "R124.Rnd.Up.Test", long_name]
    for seed in range(6):
        order = names * 2
        random.Random(seed).shuffle(order)
        e = Engine(Zone(view))
        for name in order:
            out = e.handle(dns.message.make_query(name, "A").to_wire())
            target, _ = e.zone.route_for(name_text(DNSLabel(name)))
            short = e.zone.host_for_short_name(name.lower())
            if isinstance(target, LocalZone) or short:
                assert isinstance(out, bytes), (seed, name, out)
            else:
                assert isinstance(out, Forward) and out.route is target, (seed, name, out)
