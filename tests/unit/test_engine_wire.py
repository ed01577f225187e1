"""Wire-level compliance of the answer engine's replies: limits on names, zone transfers, header
bits, EDNS options, TSIG, cookies and truncation (the compliance run of issue 8). Clients are
dnspython messages; every case here was wrong once."""

from __future__ import annotations

import ipaddress
import struct

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.tsigkeyring
import pytest

from magicdns.engine import Engine, Forward
from magicdns import message
from magicdns.records import parse_record
from magicdns.upstream import Upstream
from magicdns.view import DnsSettings, DnsView, Host
from magicdns.zone import Zone


def rec(name: str, rtype: str, value: str):
    return parse_record(name, rtype, value, 60, "tailnet")


# SRV targets with many addresses: the answer fits 512 bytes, the additional addresses do not.
VIEW = DnsView(
    peers=tuple(Host(f"srv{i}", tuple(ipaddress.ip_address(f"100.64.{i}.{k}") for k in range(1, 9)))
                for i in range(1, 5)),
    dns=DnsSettings(nameservers=(Upstream("127.0.0.1", 5399),),
                    records=tuple(rec("_x._tcp", "SRV", f"10 5 80 srv{i}") for i in range(1, 5))),
    version=5,
)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(Zone(VIEW))


def reply_of(engine: Engine, wire: bytes, tcp: bool = False) -> dns.message.Message:
    out = engine.handle(wire, tcp=tcp)
    assert isinstance(out, bytes), out
    return dns.message.from_wire(out, ignore_trailing=True)


def raw_query(qname_wire: bytes, qtype: int = 1, flags: int = 0x0100) -> bytes:
    return struct.pack("!HHHHHH", 0x1234, flags, 1, 0, 0, 0) + qname_wire + struct.pack("!HH", qtype, 1)


def test_ixfr_and_axfr_refused_over_udp_and_tcp(engine: Engine) -> None:
    ixfr = dns.message.make_query("tailnet", "IXFR")
    ixfr.authority.append(dns.rrset.from_text("tailnet.", 0, "IN", "SOA", "a. b. 3 1 1 1 1"))
    for q in (ixfr, dns.message.make_query("tailnet", "AXFR"), dns.message.make_query("srv1.tailnet", "IXFR")):
        for tcp in (False, True):
            r = reply_of(engine, q.to_wire(), tcp)
            assert r.rcode() == dns.rcode.REFUSED and r.id == q.id, (q.question, tcp)


@pytest.mark.parametrize("tcp", [False, True])
def test_label_over_63_octets_is_formerr_never_forwarded(engine: Engine, tcp: bool) -> None:
    for first in (64, 65, 127):  # 0x40-0x7f: an "extended label type" byte, not a length
        wire = raw_query(bytes((first,)) + b"a" * first + b"\x07example\x00")
        out = engine.handle(wire, tcp)
        assert isinstance(out, bytes) and out[3] & 0xF == dns.rcode.FORMERR and out[:2] == wire[:2]


def test_name_over_255_octets_is_formerr_never_forwarded(engine: Engine) -> None:
    name255 = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"b" * 61 + b"\x00"  # exactly 255 octets
    assert len(name255) == 255
    assert isinstance(engine.handle(raw_query(name255)), Forward)  # legal: forwarded
    name256 = (b"\x3f" + b"a" * 63) * 3 + b"\x3e" + b"b" * 62 + b"\x00"
    for _ in range(2):  # a second sight too (fast path)
        out = engine.handle(raw_query(name256))
        assert isinstance(out, bytes) and out[3] & 0xF == dns.rcode.FORMERR
    # below one of our zones: not answered from it either
    long_local = (b"\x3f" + b"a" * 63) * 3 + b"\x36" + b"b" * 54 + b"\x07tailnet\x00"
    assert len(long_local) == 256
    assert engine.handle(raw_query(long_local))[3] & 0xF == dns.rcode.FORMERR


def test_z_bit_is_zero_in_every_reply(engine: Engine) -> None:
    for name, rtype, opcode in (("srv1.tailnet", "A", 0), ("srv1.tailnet", "A", 0), ("nope.tailnet", "A", 0),
                                ("tailnet", "AXFR", 0), ("srv1.tailnet", "A", dns.opcode.STATUS)):
        q = dns.message.make_query(name, rtype)
        q.set_opcode(opcode)
        wire = bytearray(q.to_wire())
        wire[3] |= 0x40  # Z
        out = engine.handle(bytes(wire))
        assert isinstance(out, bytes) and not out[3] & 0x40, (name, rtype, opcode)


def test_notimp_carries_no_ra_and_only_rd(engine: Engine) -> None:
    q = dns.message.make_query("srv1.tailnet", "A")
    q.set_opcode(dns.opcode.NOTIFY)
    q.flags |= dns.flags.CD | dns.flags.AD | dns.flags.AA
    r = reply_of(engine, q.to_wire())
    assert r.rcode() == dns.rcode.NOTIMP and r.opcode() == dns.opcode.NOTIFY
    assert r.flags & ~(dns.flags.QR | dns.flags.RD) & 0x87B0 == 0  # no AA, TC, RA, AD, CD
    assert r.flags & dns.flags.RD and not r.flags & dns.flags.RA


def test_edns_option_running_past_the_opt_data_is_formerr(engine: Engine) -> None:
    good = dns.message.make_query("srv1.tailnet", "A", use_edns=0,
                                  options=[dns.edns.GenericOption(65001, b"abcd")]).to_wire()
    assert reply_of(engine, good).rcode() == dns.rcode.NOERROR
    # the option says 200 octets; the OPT data holds 4: patch the option length
    bad = good[:-6] + struct.pack("!H", 200) + good[-4:]
    for _ in range(2):
        out = engine.handle(bad)
        assert isinstance(out, bytes) and out[3] & 0xF == dns.rcode.FORMERR
    # an option header cut short
    cut = good[:-10] + struct.pack("!H", 2) + b"\xfd\xe9"
    assert engine.handle(cut)[3] & 0xF == dns.rcode.FORMERR


def test_cookies_are_ignored_never_refused(engine: Engine) -> None:
    for cookie in (b"12345678", b"12345678" + b"s" * 16):  # client cookie, then with a server cookie
        q = dns.message.make_query("srv1.tailnet", "A", use_edns=0,
                                   options=[dns.edns.GenericOption(dns.edns.COOKIE, cookie)])
        for _ in range(2):
            r = reply_of(engine, q.to_wire())
            assert r.rcode() == dns.rcode.NOERROR and r.answer and r.edns == 0
    # RFC 7873 5.2.2: a cookie of an impossible length is FORMERR
    q = dns.message.make_query("srv1.tailnet", "A", use_edns=0,
                               options=[dns.edns.GenericOption(dns.edns.COOKIE, b"short")])
    assert reply_of(engine, q.to_wire()).rcode() == dns.rcode.FORMERR


def test_tsig_signed_query_gets_notauth_badkey(engine: Engine) -> None:
    keyring = dns.tsigkeyring.from_text({"client-key.": "c2VjcmV0c2VjcmV0c2VjcmV0"})
    for name in ("srv1.tailnet", "www.example.com"):  # ours and forwarded names alike
        q = dns.message.make_query(name, "A", use_edns=0)
        q.use_tsig(keyring, keyname="client-key.")
        wire = q.to_wire()
        out = engine.handle(wire)
        assert isinstance(out, bytes)
        assert out[3] & 0xF == dns.rcode.NOTAUTH and out[:2] == wire[:2]
        # the reply is unsigned (MAC size 0) with error BADKEY: dnspython reports exactly that
        with pytest.raises(dns.tsig.PeerBadKey):
            dns.message.from_wire(out, keyring=keyring, request_mac=q.mac)


def test_srv_additional_that_does_not_fit_is_dropped_without_tc(engine: Engine) -> None:
    q = dns.message.make_query("_x._tcp.tailnet", "SRV")
    full = reply_of(engine, q.to_wire(), tcp=True)
    assert len(full.additional) == 4 and len(full.to_wire()) > 512
    r = reply_of(engine, q.to_wire())
    assert not r.flags & dns.flags.TC
    assert len(r.answer[0]) == 4
    assert len(engine.handle(q.to_wire())) <= 512


def test_truncate_drops_additional_then_authority_then_sets_tc() -> None:
    q = dns.message.make_query("x.example", "TXT", use_edns=0)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("x.example.", 60, "IN", "TXT", '"' + "a" * 200 + '"'))
    r.authority.append(dns.rrset.from_text("example.", 60, "IN", "NS", *[f"ns{i}.example." for i in range(10)]))
    r.additional.append(dns.rrset.from_text("ns0.example.", 60, "IN", "A", *[f"192.0.2.{i}" for i in range(20)]))
    wire = r.to_wire()
    r.additional = []
    no_additional = len(r.to_wire())
    r.authority = []
    answer_only = len(r.to_wire())
    assert answer_only < no_additional < len(wire)
    cut = dns.message.from_wire(message.truncate(wire, no_additional))
    assert not cut.flags & dns.flags.TC and cut.answer and cut.authority and not cut.additional and cut.edns == 0
    cut = dns.message.from_wire(message.truncate(wire, answer_only))
    assert not cut.flags & dns.flags.TC and cut.answer and not cut.authority
    cut = dns.message.from_wire(message.truncate(wire, answer_only - 1))
    assert cut.flags & dns.flags.TC and not cut.answer


def test_scan_query_rejects_pointer_loops_and_forward_pointers() -> None:
    q = dns.message.make_query("a.example", "A").to_wire()
    with pytest.raises(message.MessageError):
        message.scan_query(q[:12] + b"\xc0\x0c\x00\x01\x00\x01")
    with pytest.raises(message.MessageError):
        message.scan_query(q[:12] + b"\xc0\x20\x00\x01\x00\x01")
    assert message.scan_query(q).qend == len(q)


def test_a_forward_carries_the_cache_reading_of_its_query(engine: Engine) -> None:
    """The engine hands the forwarding path its reading of the query (issue 8: a query shed under a
    flood was read a second time by cache.query_info). It must be exactly what query_info reads, or
    a cached answer would be found under the wrong key: mixed case, EDNS with and without DO, CD and
    AD, other qtypes and the longest legal name."""
    from magicdns.cache import query_info

    name255 = (b"\x3f" + b"A" * 63) * 3 + b"\x3d" + b"b" * 61 + b"\x00"
    wires = [raw_query(name255), raw_query(b"\x03WwW\x07ExAmPle\x03COM\x00", qtype=28),
             raw_query(b"\x01x\x02Up\x04test\x00", flags=0x0110), raw_query(b"\x01x\x02up\x04test\x00", flags=0x0120)]
    for name, qtype in (("Foo.Example.COM", "A"), ("r1234.rnd.up.test", "AAAA"), ("a.b.c.d.e.f.example.org", "TXT"),
                        ("outside.Example", "MX")):
        for kwargs in ({}, {"use_edns": 0}, {"use_edns": 0, "want_dnssec": True}, {"use_edns": 0, "payload": 4096}):
            q = dns.message.make_query(name, qtype, **kwargs)
            q.flags |= dns.flags.CD
            wires.append(q.to_wire())
            q.flags &= ~dns.flags.CD
            q.flags |= dns.flags.AD
            wires.append(q.to_wire())
    seen = 0
    for wire in wires:
        for _ in range(2):  # first sight and again: the same reading
            fwd = engine.handle(wire)
            assert isinstance(fwd, Forward), wire
            if fwd.info is not None:  # the slow path leaves it to the server
                assert fwd.info == query_info(wire), wire
                seen += 1
    assert seen == 2 * len(wires)  # the fast path reads every one of these
