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
    NOTAUTH = 9
    BADVERS = 16  # extended: high bits travel in the OPT record (RFC 6891)


TYPE_OPT = 41
TYPE_TSIG = 250
OPTION_COOKIE = 10  # RFC 7873
TSIG_BADKEY = 17  # RFC 8945 section 5.2.1
MAX_NAME_WIRE = 255  # RFC 1035 2.3.4: a name's wire form, length octets included
MAX_LABEL = 63
# The question-name end offset beyond which a name cannot be legal: 12 header bytes + 255.
MAX_QNAME_END = 12 + MAX_NAME_WIRE - 1


class MessageError(ValueError):
    """A message that breaks the wire format; `qend` is where its question ended (0: unreadable)."""

    def __init__(self, reason: str, qend: int = 0) -> None:
        super().__init__(reason)
        self.qend = qend


@dataclass(frozen=True, slots=True)
class Edns:
    """What a query's OPT record asked for."""

    udp_size: int
    version: int
    do: bool


@dataclass(frozen=True, slots=True)
class Tsig:
    """A TSIG record at the end of a query (RFC 8945), as far as a server without keys needs it."""

    key_name: bytes  # wire form, uncompressed
    algorithm: bytes  # wire form, uncompressed
    time_signed: bytes  # 48 bits
    fudge: int
    original_id: int


@dataclass(frozen=True, slots=True)
class QueryShape:
    """What one walk over a query found: the single owner of 'where does the question end' and of
    the wire rules every query must pass before it is answered or forwarded."""

    qdcount: int
    qend: int  # offset just past the first question
    qtype: int
    qclass: int
    edns: Edns | None
    tsig: Tsig | None
    records: int  # answer + authority records (none in a plain query)


def read_name(msg: bytes, i: int) -> tuple[bytes, int]:
    """The uncompressed wire form of the name at `i` and the offset just past it there.

    Raises MessageError on labels over 63 octets, names over 255, reserved label types, pointers
    that do not point backwards (loops), and names that run past the end of the message.
    """
    n = len(msg)
    out = bytearray()
    end = 0
    limit = i  # a pointer must point before the name that uses it: no loops
    while True:
        if i >= n:
            raise MessageError("name runs past the end of the message")
        length = msg[i]
        if length == 0:
            out.append(0)
            if len(out) > MAX_NAME_WIRE:
                raise MessageError("name longer than 255 octets")
            return bytes(out), end or i + 1
        top = length & 0xC0
        if top == 0xC0:
            if i + 1 >= n:
                raise MessageError("compression pointer runs past the end")
            target = (length & 0x3F) << 8 | msg[i + 1]
            if target >= limit:
                raise MessageError("compression pointer does not point backwards")
            if not end:
                end = i + 2
            limit = target
            i = target
            continue
        if top:
            raise MessageError(f"label longer than 63 octets (or reserved label type 0x{length:02x})")
        if i + 1 + length > n:
            raise MessageError("label runs past the end of the message")
        out += msg[i:i + 1 + length]
        if len(out) > MAX_NAME_WIRE - 1:
            raise MessageError("name longer than 255 octets")
        i += length + 1


def question_end(msg: bytes) -> int:
    """Offset just past the single question of a query: the one question walker of the engine's
    template path and the forwarding cache's key. A query's question is never compressed (nothing
    precedes it to point to). Raises MessageError unless there is exactly one question whose name
    is legal (no label over 63 octets, no compression, at most 255 octets) and complete."""
    n = len(msg)
    if n < 12 or msg[4] or msg[5] != 1:
        raise MessageError("expected exactly one question")
    i = 12
    try:
        length = msg[i]
        while length:
            if length > MAX_LABEL:
                raise MessageError("compressed, extended or longer than 63 octets: a label of the question")
            i += length + 1
            length = msg[i]
    except IndexError:
        raise MessageError("question name runs past the end") from None
    if i > MAX_QNAME_END:
        raise MessageError("name longer than 255 octets")
    end = i + 5
    if end > n:
        raise MessageError("question type/class missing")
    return end


def skip_name(msg: bytes, i: int) -> int:
    """Offset just past the (possibly compressed) name at `i`, without reading it: for walking the
    records of a reply. Raises MessageError when it runs past the end or has a reserved label type."""
    n = len(msg)
    while True:
        if i >= n:
            raise MessageError("name runs past the end of the message")
        length = msg[i]
        if length == 0:
            return i + 1
        if length & 0xC0 == 0xC0:
            if i + 2 > n:
                raise MessageError("compression pointer runs past the end")
            return i + 2
        if length & 0xC0:
            raise MessageError(f"unsupported label type 0x{length:02x}")
        i += length + 1


def scan_query(msg: bytes) -> QueryShape:
    """Walk the whole query once, checking every name and record; raises MessageError."""
    if len(msg) < 12:
        raise MessageError("shorter than a header")
    qd, an, ns, ar = struct.unpack_from("!HHHH", msg, 4)
    qend = 0
    qtype = qclass = 0
    i = 12
    for k in range(qd):
        _, i = read_name(msg, i)
        if i + 4 > len(msg):
            raise MessageError("question type/class missing", qend)
        if k == 0:
            qtype, qclass = struct.unpack_from("!HH", msg, i)
            qend = i + 4
        i += 4
    edns: Edns | None = None
    tsig: Tsig | None = None
    total = an + ns + ar
    for k in range(total):
        start = i
        _, i = read_name(msg, i)
        if i + 10 > len(msg):
            raise MessageError("record header runs past the end", qend)
        rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", msg, i)
        i += 10
        if i + rdlen > len(msg):
            raise MessageError("record data runs past the end", qend)
        if tsig is not None:
            raise MessageError("TSIG must be the last record", qend)
        if k >= an + ns and rtype == TYPE_OPT:
            if edns is not None:
                raise MessageError("more than one OPT record", qend)
            if msg[start] != 0:
                raise MessageError("OPT owner must be the root", qend)
            check_options(msg, i, i + rdlen, qend)
            edns = Edns(rclass, (ttl >> 16) & 0xFF, bool(ttl & 0x8000))
        elif rtype == TYPE_TSIG:
            if k != total - 1:
                raise MessageError("TSIG must be the last record", qend)
            tsig = _read_tsig(msg, start, i, rdlen, qend)
        i += rdlen
    return QueryShape(qd, qend, qtype, qclass, edns, tsig, an + ns)


def check_options(msg: bytes, i: int, end: int, qend: int = 0) -> None:
    """RFC 6891 6.1.2: each option's length stays inside the OPT data; RFC 7873 5.2.2: a COOKIE
    is a client cookie of 8 octets, optionally followed by a server cookie of 8 to 32."""
    while i < end:
        if i + 4 > end:
            raise MessageError("EDNS option header runs past the OPT data", qend)
        code, length = struct.unpack_from("!HH", msg, i)
        i += 4
        if i + length > end:
            raise MessageError("EDNS option runs past the OPT data", qend)
        if code == OPTION_COOKIE and not (length == 8 or 16 <= length <= 40):
            raise MessageError("malformed DNS cookie", qend)
        i += length


def _read_tsig(msg: bytes, owner_at: int, rdata: int, rdlen: int, qend: int) -> Tsig:
    key, _ = read_name(msg, owner_at)
    try:
        algorithm, p = read_name(msg, rdata)
    except MessageError:
        raise MessageError("TSIG algorithm name unreadable", qend) from None
    if p + 16 > rdata + rdlen:
        raise MessageError("TSIG record too short", qend)
    time_signed = msg[p:p + 6]
    fudge, mac_size = struct.unpack_from("!HH", msg, p + 6)
    p += 10 + mac_size
    if p + 6 > rdata + rdlen:
        raise MessageError("TSIG MAC runs past the record", qend)
    (original_id,) = struct.unpack_from("!H", msg, p)
    return Tsig(key, algorithm, time_signed, fudge, original_id)


def opt_record(do: bool, ext_rcode: int = 0, ede: int | None = None) -> bytes:
    """Our OPT RR: root owner, type 41, our UDP size, extended rcode, version 0, DO echoed, and no
    options but an RFC 8914 Extended DNS Error when `ede` is given."""
    rdata = b"" if ede is None else struct.pack("!HHH", 15, 2, ede)
    return struct.pack("!BHHBBHH", 0, 41, MAX_UDP_PAYLOAD, ext_rcode, 0, 0x8000 if do else 0, len(rdata)) + rdata


def udp_limit(edns: Edns | None) -> int:
    """How large a UDP reply may be for this client (RFC 6891 section 6.2.5)."""
    if edns is None:
        return PLAIN_UDP_LIMIT
    return max(PLAIN_UDP_LIMIT, min(edns.udp_size, MAX_UDP_PAYLOAD))


def header_only_reply(data: bytes, rcode: int) -> bytes | None:
    """A reply carrying only a header: for queries too broken to echo. None for non-queries."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    flags1 = 0x80 | (data[2] & 0x79)  # QR, opcode and RD copied
    return data[:2] + bytes((flags1, 0x80 | (rcode & 0xF))) + b"\x00" * 8


_NO_QEND = -1


def error_reply(query: bytes, rcode: int, edns: Edns | None | bool = True, *, qend: int = _NO_QEND,
                ede: int | None = None, tsig: Tsig | None = None) -> bytes | None:
    """The one error reply: ID, opcode and RD copied, CD too (not for NOTIMP, which also carries no
    RA: RFC 1035 has us promise nothing for an opcode we do not know), Z and AA clear, the question
    echoed when it can be read, and an OPT record (extended rcode, RFC 8914 Extended DNS Error
    `ede`) when the client sent one. `edns` True means "as the query has it"; `qend` defaults to
    where the query's question ends. `tsig`: an unsigned BADKEY TSIG record after the OPT
    (RFC 8945 5.3.2). None for a non-query."""
    if len(query) < 12 or query[2] & 0x80:
        return None
    if qend == _NO_QEND or edns is True:
        try:
            shape = scan_query(query)
            qend = shape.qend if qend == _NO_QEND else qend
            found = shape.edns
        except MessageError as exc:
            qend = exc.qend if qend == _NO_QEND else qend
            found = None
        if edns is True:
            edns = found
    flags1 = 0x80 | (query[2] & 0x79)
    flags2 = rcode & 0xF if rcode == Rcode.NOTIMP else 0x80 | (query[3] & 0x10) | (rcode & 0xF)
    extra = b""
    count = 0
    if isinstance(edns, Edns):
        extra += opt_record(edns.do, rcode >> 4, ede)
        count += 1
    if tsig is not None:
        extra += _tsig_error(tsig)
        count += 1
    qd = 1 if qend else 0
    return (query[:2] + bytes((flags1, flags2)) + struct.pack("!HHHH", qd, 0, 0, count)
            + (query[12:qend] if qend else b"") + extra)


def _tsig_error(tsig: Tsig) -> bytes:
    """An unsigned TSIG record saying BADKEY: MAC size 0, the request's time (RFC 8945 5.2.1, 5.3.2)."""
    rdata = (tsig.algorithm + tsig.time_signed + struct.pack("!HHHHH", tsig.fudge, 0, tsig.original_id,
                                                               TSIG_BADKEY, 0))
    return tsig.key_name + struct.pack("!HHIH", TYPE_TSIG, 255, 0, len(rdata)) + rdata


def with_opt(wire: bytes, do: bool, ext_rcode: int = 0) -> bytes:
    arcount = struct.unpack_from("!H", wire, 10)[0]
    return wire[:10] + struct.pack("!H", arcount + 1) + wire[12:] + opt_record(do, ext_rcode)


def truncate(reply: bytes, limit: int) -> bytes:
    """`reply` cut to at most `limit` bytes (RFC 2181 section 9).

    Additional records go first (OPT stays), then authority records, and neither sets TC: the
    client has its answer. Only when the answer section itself does not fit is TC set, keeping as
    many whole leading answer records as fit.
    """
    if len(reply) <= limit:
        return reply
    try:
        msg = DNSRecord.parse(reply)
    except Exception:  # an upstream's reply we cannot parse: send the bare header with TC
        return reply[:2] + bytes((reply[2] | 0x02, reply[3])) + b"\x00" * 8
    msg.ar = [rr for rr in msg.ar if rr.rtype == QTYPE.OPT]
    wire = bytes(msg.pack())
    if len(wire) <= limit:
        return wire
    msg.auth = []
    wire = bytes(msg.pack())
    if len(wire) <= limit:
        return wire
    answers = list(msg.rr)
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
