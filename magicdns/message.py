"""Wire-level helpers shared by the answer engine and the server: error replies, EDNS, truncation.

These run on slow paths only (errors, oversize replies); the hot path lives in engine.py.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from dnslib import QTYPE, DNSRecord

# The UDP payload size we advertise and never exceed (DNS flag day 2020: avoids IP fragmentation).
MAX_UDP_PAYLOAD = 1232
PLAIN_UDP_LIMIT = 512
HEADER = struct.Struct("!HBBHHHH")


class Rcode(IntEnum):
    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16  # extended: high bits travel in the OPT record (RFC 6891)


@dataclass(frozen=True, slots=True)
class Edns:
    """What a query's OPT record asked for."""

    udp_size: int
    version: int
    do: bool


def opt_record(do: bool, ext_rcode: int = 0) -> bytes:
    """Our OPT RR: root owner, type 41, our UDP size, extended rcode, version 0, DO echoed, no options."""
    return struct.pack("!BHHBBHH", 0, 41, MAX_UDP_PAYLOAD, ext_rcode, 0, 0x8000 if do else 0, 0)


def udp_limit(edns: Edns | None) -> int:
    """How large a UDP reply may be for this client (RFC 6891 section 6.2.5)."""
    if edns is None:
        return PLAIN_UDP_LIMIT
    return max(PLAIN_UDP_LIMIT, min(edns.udp_size, MAX_UDP_PAYLOAD))


def parse_edns(record: DNSRecord) -> Edns | None:
    """The EDNS of a dnslib-parsed query; raises ValueError on more than one OPT record."""
    opts = [rr for rr in record.ar if rr.rtype == QTYPE.OPT]
    if not opts:
        return None
    if len(opts) > 1:
        raise ValueError("more than one OPT record")
    opt = opts[0]
    if str(opt.rname) not in (".", ""):
        raise ValueError("OPT owner must be the root")
    return Edns(opt.rclass, (opt.ttl >> 16) & 0xFF, bool(opt.ttl & 0x8000))


def header_only_reply(data: bytes, rcode: int) -> bytes | None:
    """A reply carrying only a header: for queries too broken to echo. None for non-queries."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    flags1 = 0x80 | (data[2] & 0x79)  # QR, opcode and RD copied
    return data[:2] + bytes((flags1, 0x80 | (rcode & 0xF))) + b"\x00" * 8


def error_reply(query: DNSRecord, rcode: int, edns: Edns | None, aa: bool = False) -> bytes:
    """An error reply that echoes the question (and OPT when the client sent one)."""
    reply = DNSRecord(header=query.header, q=query.q)
    reply.header.set_qr(1)
    reply.header.ra = 1
    reply.header.aa = int(aa)
    reply.header.tc = 0
    reply.header.ad = 0
    reply.header.rcode = rcode & 0xF
    reply.questions = list(query.questions[:1])
    reply.rr, reply.auth, reply.ar = [], [], []
    wire = bytes(reply.pack())
    if edns is not None:
        wire = _with_opt(wire, edns.do, rcode >> 4)
    return wire


def _with_opt(wire: bytes, do: bool, ext_rcode: int = 0) -> bytes:
    arcount = struct.unpack_from("!H", wire, 10)[0]
    return wire[:10] + struct.pack("!H", arcount + 1) + wire[12:] + opt_record(do, ext_rcode)


def truncate(reply: bytes, limit: int) -> bytes:
    """Cut `reply` to at most `limit` bytes at a record boundary and set TC (RFC 2181 section 9).

    Whole answer records are kept while they fit; authority and additional data go, except OPT.
    """
    if len(reply) <= limit:
        return reply
    try:
        msg = DNSRecord.parse(reply)
    except Exception:  # an upstream's reply we cannot parse: send the bare header with TC
        return reply[:2] + bytes((reply[2] | 0x02, reply[3])) + b"\x00" * 8
    opts = [rr for rr in msg.ar if rr.rtype == QTYPE.OPT]
    answers = list(msg.rr)
    msg.auth, msg.ar = [], opts
    msg.header.tc = 1
    lo, hi = 0, len(answers)
    while lo < hi:  # the largest number of leading answers that fits
        mid = (lo + hi + 1) // 2
        msg.rr = answers[:mid]
        if len(msg.pack()) <= limit:
            lo = mid
        else:
            hi = mid - 1
    msg.rr = answers[:lo]
    wire = bytes(msg.pack())
    if len(wire) > limit:  # even the question does not fit: header only
        return wire[:2] + wire[2:4] + b"\x00" * 8
    return wire
