"""The replies the forwarder builds itself, without sockets: the shed/failed SERVFAIL built from
`query_info` must be byte for byte the one error reply (message.error_reply), for every query shape."""

from __future__ import annotations

import os

from dnslib import EDNS0, EDNSOption, DNSRecord
from hypothesis import given, settings, strategies as st

from magicdns.cache import query_info
from magicdns.forward import EDE_NO_REACHABLE_AUTHORITY, EDE_OTHER, _Ids, error_reply, read_query, servfail_reply
from magicdns.message import Rcode


def _query(name: str, qtype: str, *, rd: bool, cd: bool, ad: bool, edns: bool, do: bool,
           cookie: bool, opcode: int) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.rd = int(rd)
    q.header.cd = int(cd)
    q.header.ad = int(ad)
    q.header.opcode = opcode
    if edns:
        q.add_ar(EDNS0(udp_len=1232, flags="do" if do else "",
                       opts=[EDNSOption(10, b"12345678")] if cookie else []))
    return bytes(q.pack())


names = st.sampled_from(["www.example.test", "WwW.ExAmPlE.tEsT", "a.b.c.d.e.f", "x" * 63 + ".test", "."])


@settings(max_examples=300, deadline=None)
@given(name=names, qtype=st.sampled_from(["A", "AAAA", "TXT", "HTTPS", "ANY"]), rd=st.booleans(),
       cd=st.booleans(), ad=st.booleans(), edns=st.booleans(), do=st.booleans(), cookie=st.booleans(),
       opcode=st.sampled_from([0, 0, 2, 5]), ede=st.sampled_from([EDE_OTHER, EDE_NO_REACHABLE_AUTHORITY]),
       qid=st.integers(0, 0xFFFF))
def test_servfail_reply_is_the_one_error_reply(name: str, qtype: str, rd: bool, cd: bool, ad: bool, edns: bool,
                                                do: bool, cookie: bool, opcode: int, ede: int, qid: int) -> None:
    wire = qid.to_bytes(2, "big") + _query(name, qtype, rd=rd, cd=cd, ad=ad, edns=edns, do=do, cookie=cookie,
                                           opcode=opcode)[2:]
    info = query_info(wire)
    assert servfail_reply(wire, info, ede) == error_reply(wire, Rcode.SERVFAIL, ede)


def test_servfail_reply_for_shapes_query_info_does_not_vouch_for() -> None:
    # Two additional records (an OPT and a TSIG-like record), EDNS version 1, a response: the
    # generic path, still the one error reply.
    q = DNSRecord.question("www.example.test", "A")
    q.add_ar(EDNS0(udp_len=1232, version=1))
    v1 = bytes(q.pack())
    response = bytearray(_query("www.example.test", "A", rd=True, cd=False, ad=False, edns=False, do=False,
                                cookie=False, opcode=0))
    response[2] |= 0x80
    for wire in (v1, bytes(response)):
        info = query_info(wire)
        assert servfail_reply(wire, info, EDE_OTHER) == error_reply(wire, Rcode.SERVFAIL, EDE_OTHER)


def test_read_query_is_none_for_a_query_without_a_readable_question() -> None:
    assert read_query(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05abc") is None
    assert read_query(b"\x00") is None
    assert read_query(_query("a.test", "A", rd=True, cd=False, ad=False, edns=False, do=False, cookie=False,
                             opcode=0)) is not None


def test_ids_are_two_random_bytes_and_a_fork_does_not_share_them() -> None:
    ids = _Ids()
    seen = [ids() for _ in range(5000)]  # ten refills
    assert all(len(i) == 2 for i in seen)
    assert len(set(seen)) > 4000  # 5000 draws from 65536: about 4,830 distinct expected
    ids.reset()  # what the at-fork hook does in a child
    assert ids.buf == b"" and len(ids()) == 2 and len(ids.buf) == 1024
    from magicdns import forward
    forward._new_id()  # the parent's pool is filled: the child must not inherit it
    assert forward._new_id.buf
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the module's pool was reset by the at-fork hook
        os.write(w, b"1" if forward._new_id.buf == b"" else b"0")
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    assert os.read(r, 1) == b"1"
    os.close(r)
