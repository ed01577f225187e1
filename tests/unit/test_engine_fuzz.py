"""Property tests: random and mutated packets never crash the engine; every reply is well-formed."""

from __future__ import annotations

import dns.exception
import dns.message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magicdns.engine import Engine, Forward
from magicdns.view import load_view
from magicdns.zone import Zone

from pathlib import Path

ENGINE = Engine(Zone(load_view(Path(__file__).parents[2] / "conf" / "view.json")))

NAMES = ["my-server.tailnet", "db.tailnet", "nope.tailnet", "grafana.tailnet", "x.dev.tailnet",
         "_http._tcp.tailnet", "2.0.64.100.in-addr.arpa", "example.com", "tailnet", "my-server"]
TYPES = ["A", "AAAA", "TXT", "SRV", "MX", "CAA", "PTR", "SOA", "NS", "ANY", "CNAME", "HTTPS"]


def check_reply(query: bytes, out: object, tcp: bool) -> None:
    if out is None or isinstance(out, Forward):
        return
    assert isinstance(out, bytes)
    assert len(out) >= 12
    assert out[:2] == query[:2], "the reply carries the query's ID"
    assert out[2] & 0x80, "QR set"
    if not tcp:
        assert len(out) <= 1232
    if len(out) > 12 and (out[2] >> 3) & 0xF != 5:  # dnspython reads UPDATE replies by RFC 2136 rules
        try:
            dns.message.from_wire(out)
        except dns.message.Truncated:
            pass


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=600), st.booleans())
def test_random_bytes(data: bytes, tcp: bool) -> None:
    check_reply(data, ENGINE.handle(data, tcp=tcp), tcp)


@st.composite
def mutated_queries(draw: st.DrawFn) -> bytes:
    q = dns.message.make_query(draw(st.sampled_from(NAMES)), draw(st.sampled_from(TYPES)),
                               use_edns=draw(st.sampled_from([False, 0, 1])),
                               want_dnssec=draw(st.booleans()),
                               payload=draw(st.integers(0, 65535)))
    wire = bytearray(q.to_wire())
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        if not wire:
            break
        pos = draw(st.integers(0, len(wire) - 1))
        if op == "flip":
            wire[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del wire[pos:]
        elif op == "insert":
            wire[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            wire[pos] = draw(st.integers(0, 255))
    return bytes(wire)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_queries(), st.booleans())
def test_mutated_queries(data: bytes, tcp: bool) -> None:
    out = ENGINE.handle(data, tcp=tcp)
    check_reply(data, out, tcp)
    # The fast path must agree with the slow path: asking twice gives the same reply (modulo rotation).
    again = ENGINE.handle(data, tcp=tcp)
    if isinstance(out, bytes) and isinstance(again, bytes) and out[3] & 0xF != 0:
        assert again[3] & 0xF == out[3] & 0xF


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=400))
def test_scan_query_raises_only_message_error(data: bytes) -> None:
    from magicdns.message import MessageError, scan_query
    try:
        shape = scan_query(data)
    except MessageError as exc:
        assert 0 <= exc.qend <= len(data)
        return
    assert shape.qend <= len(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(NAMES), st.sampled_from(TYPES), st.booleans(), st.booleans())
def test_scan_query_reads_what_dnspython_writes(name: str, rtype: str, edns: bool, tsig: bool) -> None:
    import dns.tsigkeyring

    from magicdns.message import scan_query
    q = dns.message.make_query(name, rtype, use_edns=0 if edns else False)
    if tsig:
        q.use_tsig(dns.tsigkeyring.from_text({"k.": "c2VjcmV0c2VjcmV0"}), keyname="k.")
    wire = q.to_wire()
    shape = scan_query(wire)
    assert wire[12:shape.qend] == q.question[0].name.to_wire() + wire[shape.qend - 4:shape.qend]
    assert (shape.edns is not None) == edns and (shape.tsig is not None) == tsig
