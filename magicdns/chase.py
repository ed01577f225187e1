"""CNAME chains that cross between our zones and the rest of the DNS (RFC 1034 3.6.2, 4.3.1). Sans-I/O.

We set RA and recurse for our clients, so a chain must be followed to its end whichever side of
the border each link is on:
- `chase_reply`: our chain ends outside our zones; the engine decided to `Chase` it, the server
  forwarded (target, qtype), and this puts our part of the chain in front of the upstream's answer;
- `complete_chain`: a forwarded answer's chain ends at one of our names; the rest comes from our
  zone (upstreams know nothing of the tailnet, and rebinding protection strips what they say).
AA is set only on answers whose data is all ours (RFC 1034 4.3.1), so never on these.
"""

from __future__ import annotations

import logging

from dnslib import CLASS, QTYPE, RR, DNSError, DNSQuestion, DNSRecord
from dnslib.label import DNSBuffer

from .engine import Chase, name_text, resolve_local
from .message import Rcode, error_reply, header_only_reply, truncate, with_opt
from .zone import Zone

log = logging.getLogger(__name__)

# What an upstream's rcode becomes at the end of our chain: its data rcodes pass, failures are ours.
_PASSED_RCODES = frozenset((Rcode.NOERROR, Rcode.NXDOMAIN))
# The type and class bytes of a CNAME record: a reply without them has no chain to complete.
_CNAME_IN = b"\x00\x05\x00\x01"


def chase_reply(chase: Chase, query: bytes, upstream: bytes) -> bytes:
    """The client's reply: its question, our chain, then the upstream's answer and rcode (its
    negative-caching SOA too). An upstream failure is our SERVFAIL; the reply is cut to the client's size."""
    try:
        up = DNSRecord.parse(upstream)
    except (DNSError, ValueError, IndexError, UnicodeError, KeyError, TypeError):
        up = None
    rcode = up.header.rcode if up is not None else Rcode.SERVFAIL
    if up is None or rcode not in _PASSED_RCODES:
        return _servfail(chase, query)
    try:
        return _splice(chase, query, up, rcode)
    except (DNSError, ValueError, IndexError, UnicodeError, KeyError, TypeError) as exc:
        # dnslib read the upstream's records but cannot write one back: the client still gets an
        # answer (a TCP client waits for every one it asked for).
        log.info("cannot splice the upstream's answer for %s behind our chain: %s", chase.target, exc)
        return _servfail(chase, query)


def _servfail(chase: Chase, query: bytes) -> bytes:
    return error_reply(query, Rcode.SERVFAIL, chase.edns) or header_only_reply(query, Rcode.SERVFAIL) or b""


def _splice(chase: Chase, query: bytes, up: DNSRecord, rcode: int) -> bytes:
    reply = DNSRecord(q=DNSQuestion.parse(DNSBuffer(chase.question)))
    h = reply.header
    h.id = query[0] << 8 | query[1]
    h.qr, h.aa, h.ra, h.rd, h.cd = 1, 0, 1, query[2] & 1, (query[3] >> 4) & 1
    h.rcode = rcode
    reply.rr = list(chase.prefix) + [rr for rr in up.rr if rr.rclass == CLASS.IN]
    reply.auth = [rr for rr in up.auth if rr.rtype == QTYPE.SOA]
    wire = bytes(reply.pack())
    if chase.edns is not None:
        wire = with_opt(wire, chase.edns.do)
    return truncate(wire, chase.limit)


def complete_chain(zone: Zone, reply: bytes) -> bytes:
    """`reply` (a forwarded answer) with its CNAME chain completed from our zone when the chain ends
    at a name we are authoritative for; otherwise `reply` itself, untouched and cheaply."""
    if _CNAME_IN not in reply:
        return reply
    low = reply.lower()
    if not any(top in low for top in zone.top_label_wires):  # no name of ours in it: spare the parse
        return reply
    try:
        msg = DNSRecord.parse(reply)
    except (DNSError, ValueError, IndexError, UnicodeError, KeyError, TypeError):
        return reply
    if len(msg.questions) != 1 or msg.header.rcode not in _PASSED_RCODES:
        return reply
    qtype = msg.q.qtype
    if qtype in (QTYPE.CNAME, QTYPE.ANY):
        return reply
    chain, end = _chain(msg.rr, name_text(msg.q.qname))
    if not chain:
        return reply
    lz = zone.local_zone_of(end)
    if lz is None:
        return reply
    ours = resolve_local(zone, end, qtype, lz)
    msg.rr = chain + list(ours.answer)
    msg.auth = list(ours.authority)
    msg.ar = [rr for rr in msg.ar if rr.rtype == QTYPE.OPT]
    msg.header.rcode = ours.rcode
    msg.header.aa = 0
    msg.header.tc = 0
    return bytes(msg.pack())


def _chain(records: list[RR], name: str) -> tuple[list[RR], str]:
    """The CNAME records leading from `name` through `records`, in order, and the name they end at."""
    by_owner = {name_text(rr.rname): rr for rr in records if rr.rtype == QTYPE.CNAME}
    chain: list[RR] = []
    seen = {name}
    while name in by_owner and len(chain) < len(by_owner):
        rr = by_owner[name]
        chain.append(rr)
        name = name_text(rr.rdata.label)
        if name in seen:
            break
        seen.add(name)
    return chain, name
