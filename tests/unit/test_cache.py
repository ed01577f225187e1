"""The forwarding cache: keys, TTL math, negative caching, serve-stale, bounds (plus property tests)."""

from __future__ import annotations

import struct

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, DNSRecord, EDNSOption
from hypothesis import given, settings, strategies as st

from magicdns.cache import (SHAPE_AD, SHAPE_CD, SHAPE_DO, SHAPE_EDNS, Cache, WireError, query_info,
                            scan_message)

SOA = "example.test. {ttl} IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 {minimum}"


def make_query(name: str = "www.example.test", qtype: str = "A", *, edns: bool = False, do: bool = False,
               cd: bool = False, qid: int | None = None, opts: list[EDNSOption] | None = None) -> bytes:
    q = DNSRecord.question(name, qtype)
    if qid is not None:
        q.header.id = qid
    q.header.cd = int(cd)
    if edns or do or opts:
        q.add_ar(EDNS0(udp_len=1232, flags="do" if do else "", opts=opts or []))
    return bytes(q.pack())


def make_reply(query: bytes, answers: list[str] = (), auth: list[str] = (), *, rcode: int = RCODE.NOERROR,
               tc: bool = False, opt: EDNS0 | None = None) -> bytes:
    r = DNSRecord.parse(query).reply()
    r.header.rcode = rcode
    r.header.tc = int(tc)
    for text in answers:
        r.add_answer(*RR.fromZone(text))
    for text in auth:
        r.add_auth(*RR.fromZone(text))
    if opt is not None:
        r.add_ar(opt)
    return bytes(r.pack())


def put(cache: Cache, query: bytes, reply: bytes, now: float = 0.0) -> bool:
    return cache.insert(query, query_info(query), reply, now)


def get(cache: Cache, query: bytes, now: float) -> DNSRecord | None:
    wire = cache.get(query, query_info(query), now)
    return None if wire is None else DNSRecord.parse(wire)


# -- keys ----------------------------------------------------------------------------------------

def test_key_is_lowercased_and_carries_the_query_shape() -> None:
    info = query_info(make_query("WwW.Example.TEST", "AAAA"))
    assert info.key == (b"\x03www\x07example\x04test\x00", 28, 1, 0)
    assert info.qend == 12 + 18 + 4
    assert query_info(make_query(edns=True)).key[3] == SHAPE_EDNS
    assert query_info(make_query(do=True)).key[3] == SHAPE_EDNS | SHAPE_DO
    assert query_info(make_query(cd=True)).key[3] == SHAPE_CD
    q = DNSRecord.question("x.test")
    q.header.ad = 1
    assert query_info(bytes(q.pack())).key[3] == SHAPE_AD


def test_edns_version_above_zero_is_not_cacheable() -> None:
    q = DNSRecord.question("x.test")
    q.add_ar(EDNS0(version=1))
    assert query_info(bytes(q.pack())).key is None


def test_queries_without_exactly_one_question_are_refused() -> None:
    q = bytearray(make_query())
    q[5] = 2
    with pytest.raises(WireError):
        query_info(bytes(q))
    with pytest.raises(WireError):
        query_info(b"\x00" * 11)
    with pytest.raises(WireError):
        query_info(make_query()[:20])


# -- positive answers ----------------------------------------------------------------------------

def test_hit_gets_the_clients_id_case_rd_and_aged_ttls() -> None:
    cache = Cache()
    q = make_query(qid=1)
    assert put(cache, q, make_reply(q, ["www.example.test. 300 IN A 192.0.2.1",
                                        "www.example.test. 100 IN A 192.0.2.2"]), now=10.0)
    other = DNSRecord.question("WWW.EXAMPLE.test")
    other.header.id = 4242
    other.header.rd = 0
    hit = get(cache, bytes(other.pack()), 10.0 + 40.9)
    assert hit is not None
    assert hit.header.id == 4242 and hit.header.rd == 0 and hit.header.qr == 1
    assert str(hit.q.qname) == "WWW.EXAMPLE.test."
    assert [rr.ttl for rr in hit.rr] == [260, 60]
    assert get(cache, bytes(other.pack()), 10.0 + 99.9) is not None
    assert get(cache, bytes(other.pack()), 10.0 + 100) is None  # the smallest TTL decides


def test_shapes_do_not_share_entries() -> None:
    cache = Cache()
    plain, with_do = make_query(), make_query(do=True)
    put(cache, plain, make_reply(plain, ["www.example.test. 300 IN A 192.0.2.1"]))
    assert get(cache, with_do, 1.0) is None
    assert get(cache, make_query(cd=True), 1.0) is None
    assert get(cache, make_query(qtype="AAAA"), 1.0) is None
    assert get(cache, plain, 1.0) is not None


def test_ttl_capped_at_max_ttl_and_min_ttl_zero_respected() -> None:
    cache = Cache(max_ttl=3600)
    q = make_query()
    put(cache, q, make_reply(q, ["www.example.test. 999999 IN A 192.0.2.1"]))
    assert get(cache, q, 0.0).rr[0].ttl == 3600
    assert get(cache, q, 3600.0) is None
    zero = make_query("zero.example.test")
    assert not put(cache, zero, make_reply(zero, ["zero.example.test. 0 IN A 192.0.2.1"]))
    floored = Cache(min_ttl=30)
    assert put(floored, zero, make_reply(zero, ["zero.example.test. 0 IN A 192.0.2.1"]))
    assert get(floored, zero, 0.0).rr[0].ttl == 30


def test_reply_opt_options_are_not_stored() -> None:
    cache = Cache()
    q = make_query(do=True, opts=[EDNSOption(10, b"clientck")])
    reply = make_reply(q, ["www.example.test. 300 IN A 192.0.2.1"],
                       opt=EDNS0(udp_len=1232, flags="do", opts=[EDNSOption(10, b"clientck" + b"serverck")]))
    assert put(cache, q, reply)
    hit = get(cache, q, 1.0)
    opt = [rr for rr in hit.ar if rr.rtype == QTYPE.OPT][0]
    assert opt.rdata == [] and opt.edns_do == 1 and opt.edns_len == 1232


@pytest.mark.parametrize("rcode", [RCODE.SERVFAIL, RCODE.REFUSED, RCODE.FORMERR, RCODE.NOTIMP])
def test_failures_are_never_cached(rcode: int) -> None:
    cache = Cache()
    q = make_query()
    assert not put(cache, q, make_reply(q, rcode=rcode))
    assert len(cache) == 0


def test_truncated_replies_are_never_cached() -> None:
    cache = Cache()
    q = make_query()
    assert not put(cache, q, make_reply(q, ["www.example.test. 300 IN A 192.0.2.1"], tc=True))


def test_reply_to_another_question_is_not_stored() -> None:
    cache = Cache()
    q, other = make_query(), make_query("evil.example.test")
    assert not put(cache, q, make_reply(other, ["evil.example.test. 300 IN A 192.0.2.66"]))


# -- negative answers ----------------------------------------------------------------------------

@pytest.mark.parametrize("soa_ttl,minimum,expected", [(300, 60, 60), (20, 60, 20), (7200, 7200, 3600)])
def test_negative_ttl_from_the_soa(soa_ttl: int, minimum: int, expected: int) -> None:
    cache = Cache(negative_max_ttl=3600)
    q = make_query("nope.example.test")
    put(cache, q, make_reply(q, auth=[SOA.format(ttl=soa_ttl, minimum=minimum)], rcode=RCODE.NXDOMAIN))
    hit = get(cache, q, 0.0)
    assert hit.header.rcode == RCODE.NXDOMAIN and hit.auth[0].ttl == expected
    assert get(cache, q, expected - 0.5) is not None
    assert get(cache, q, float(expected)) is None


def test_nodata_cached_from_the_soa() -> None:
    cache = Cache()
    q = make_query(qtype="MX")
    assert put(cache, q, make_reply(q, auth=[SOA.format(ttl=300, minimum=120)]))
    hit = get(cache, q, 100.0)
    assert hit.header.rcode == RCODE.NOERROR and not hit.rr and hit.auth[0].ttl == 20


def test_cname_chain_ending_in_nodata_lives_as_long_as_its_negative_part() -> None:
    cache = Cache()
    q = make_query("alias.example.test")
    assert put(cache, q, make_reply(q, ["alias.example.test. 3600 IN CNAME target.example.test."],
                                    auth=[SOA.format(ttl=300, minimum=30)]))
    hit = get(cache, q, 10.0)
    assert [rr.ttl for rr in hit.rr] == [3590] and hit.auth[0].ttl == 20
    assert get(cache, q, 30.0) is None


def test_negative_without_soa_is_not_cached() -> None:
    cache = Cache()
    q = make_query("nope.example.test")
    assert not put(cache, q, make_reply(q, rcode=RCODE.NXDOMAIN))
    assert not put(cache, q, make_reply(q))


# -- serve-stale ---------------------------------------------------------------------------------

def test_stale_within_the_window_with_ttl_30() -> None:
    cache = Cache(stale_window=1000)
    q = make_query()
    put(cache, q, make_reply(q, ["www.example.test. 300 IN A 192.0.2.1",
                                 "www.example.test. 10 IN A 192.0.2.2"]))
    assert get(cache, q, 500.0) is None
    stale = cache.get_stale(q, query_info(q), 500.0)
    assert [rr.ttl for rr in DNSRecord.parse(stale).rr] == [30, 10]
    assert cache.stats().stale_served == 1
    assert cache.get_stale(q, query_info(q), 10.0 + 1000) is None  # window over: dropped
    assert len(cache) == 0


def test_stale_answer_carries_extended_error_3_when_edns() -> None:
    cache = Cache()
    q = make_query(edns=True)
    put(cache, q, make_reply(q, ["www.example.test. 300 IN A 192.0.2.1"], opt=EDNS0(udp_len=1232)))
    stale = DNSRecord.parse(cache.get_stale(q, query_info(q), 400.0))
    opt = [rr for rr in stale.ar if rr.rtype == QTYPE.OPT][0]
    assert [(o.code, o.data) for o in opt.rdata] == [(15, b"\x00\x03")]
    fresh = DNSRecord.parse(cache.get(q, query_info(q), 10.0))
    assert [rr for rr in fresh.ar if rr.rtype == QTYPE.OPT][0].rdata == []


def test_stale_lookup_of_a_fresh_entry_serves_it_fresh() -> None:
    cache = Cache()
    q = make_query()
    put(cache, q, make_reply(q, ["www.example.test. 300 IN A 192.0.2.1"]))
    assert DNSRecord.parse(cache.get_stale(q, query_info(q), 100.0)).rr[0].ttl == 200


# -- failures (RFC 9520) ------------------------------------------------------------------------

def test_failures_remembered_for_failure_ttl_and_ended_by_an_answer() -> None:
    cache = Cache(failure_ttl=2.0, max_entries=2)
    q = make_query()
    info = query_info(q)
    assert not cache.failed_recently(info, 0.0)
    cache.note_failure(info, 10.0)
    assert cache.failed_recently(info, 11.9) and not cache.failed_recently(info, 12.0)
    cache.note_failure(info, 20.0)
    put(cache, q, make_reply(q, ["www.example.test. 300 IN A 192.0.2.1"]), 20.5)
    assert not cache.failed_recently(info, 20.6)
    for i in range(5):  # bounded like the answers
        cache.note_failure(query_info(make_query(f"f{i}.example.test")), 30.0)
    assert len(cache._failures) == 2
    disabled = Cache(failure_ttl=0)
    disabled.note_failure(info, 0.0)
    assert not disabled.failed_recently(info, 0.0)


# -- bounds --------------------------------------------------------------------------------------

def test_lru_eviction_by_entries() -> None:
    cache = Cache(max_entries=2)
    qs = [make_query(f"n{i}.example.test") for i in range(3)]
    for q in qs[:2]:
        put(cache, q, make_reply(q, [f"{DNSRecord.parse(q).q.qname} 300 IN A 192.0.2.1"]))
    assert get(cache, qs[0], 1.0) is not None  # n0 is now the most recent
    put(cache, qs[2], make_reply(qs[2], ["n2.example.test. 300 IN A 192.0.2.1"]))
    assert get(cache, qs[1], 1.0) is None and get(cache, qs[0], 1.0) is not None
    assert cache.stats().evictions == 1


def test_eviction_by_bytes() -> None:
    cache = Cache(max_bytes=2000)
    for i in range(20):
        q = make_query(f"n{i}.example.test")
        put(cache, q, make_reply(q, [f"n{i}.example.test. 300 IN A 192.0.2.1"]))
    assert cache.bytes <= 2000 and 0 < len(cache) < 20


def test_purge_drops_only_entries_past_their_stale_window() -> None:
    cache = Cache(stale_window=100)
    a, b = make_query("a.example.test"), make_query("b.example.test")
    put(cache, a, make_reply(a, ["a.example.test. 10 IN A 192.0.2.1"]))
    put(cache, b, make_reply(b, ["b.example.test. 1000 IN A 192.0.2.1"]))
    assert cache.purge(200.0) == 1 and len(cache) == 1


# -- properties ----------------------------------------------------------------------------------

NAMES = [f"h{i}.example.test" for i in range(12)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["insert", "get", "stale"]), st.sampled_from(NAMES),
                          st.integers(0, 5000), st.floats(0, 500)), max_size=60),
       st.integers(1, 6), st.integers(600, 6000))
def test_random_sequences_keep_the_bounds_and_the_ttl_math(ops: list[tuple[str, str, int, float]],
                                                           max_entries: int, max_bytes: int) -> None:
    cache = Cache(max_entries=max_entries, max_bytes=max_bytes, max_ttl=3000, stale_window=1000)
    now = 0.0
    stored: dict[str, tuple[float, int]] = {}
    for op, name, ttl, step in ops:
        now += step
        q = make_query(name)
        if op == "insert":
            if put(cache, q, make_reply(q, [f"{name}. {ttl} IN A 192.0.2.1"]), now):
                stored[name] = (now, min(ttl, 3000))
        elif op == "get":
            hit = get(cache, q, now)
            if hit is not None:
                born, kept = stored[name]
                assert now < born + kept
                assert hit.rr[0].ttl == max(0, kept - int(now - born))
        else:
            stale = cache.get_stale(q, query_info(q), now)
            if stale is not None:
                born, kept = stored[name]
                assert now < born + kept + 1000
                assert DNSRecord.parse(stale).rr[0].ttl <= max(30, kept)
        assert len(cache) <= max_entries
        assert cache.bytes <= max_bytes
        assert cache.bytes == sum(e.size for e in cache._entries.values())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_break_the_parsers(data: bytes) -> None:
    try:
        query_info(data)
    except WireError:
        pass
    try:
        scan_message(data)
    except WireError:
        pass
    cache = Cache()
    q = make_query()
    cache.insert(q, query_info(q), data, 0.0)  # stored or refused, never an exception
    assert cache.bytes <= cache.max_bytes


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.integers(0, 200))
def test_mutated_replies_are_stored_only_when_well_formed(noise: bytes, at: int) -> None:
    q = make_query()
    good = bytearray(make_reply(q, ["www.example.test. 300 IN A 192.0.2.1"], auth=[SOA.format(ttl=300, minimum=60)]))
    pos = at % len(good)
    good[pos:pos + len(noise)] = noise
    cache = Cache()
    if cache.insert(q, query_info(q), bytes(good), 0.0):
        hit = cache.get(q, query_info(q), 0.0)
        assert hit is not None and hit[:2] == q[:2]
        scan_message(hit)  # still walkable
        aged = cache.get(q, query_info(q), 1.0)  # None when the noise made a TTL of 1 s: expired
        if aged is not None:
            assert aged[:2] == q[:2]
            scan_message(aged)  # still walkable after the TTLs were rewritten


def test_ttl_with_the_top_bit_set_counts_as_zero() -> None:
    cache = Cache()
    q = make_query()
    reply = bytearray(make_reply(q, ["www.example.test. 300 IN A 192.0.2.1"]))
    ttl_off = scan_message(bytes(reply)).records[0].ttl_off
    struct.pack_into(">I", reply, ttl_off, 0x80000001)
    assert not put(cache, q, bytes(reply))
