"""The forwarding cache: upstream replies stored as wire bytes, served with a byte-level patch.

Sans-I/O: every method takes `now` (seconds on one monotonic clock chosen by the caller); nothing
here reads a clock or touches a socket.

Insert (once per upstream reply, the slow path) walks the reply once and records where every TTL
field sits. A hit (the hot path) is then a copy of the stored bytes with the client's ID, RD bit and
question case written in, and the TTL fields decremented by the entry's age: no parsing of the reply,
no dnslib.

Rules (RFC 1035, 2181, 2308, 8767):
- key: (lowercased question name, type, class, query shape) where the shape holds whether the client
  sent EDNS and its DO, CD and AD bits: these change what an upstream puts in the reply.
- positive entries live for the smallest TTL in the answer section; negative ones (NXDOMAIN, NODATA)
  for min(SOA TTL, SOA MINIMUM) of the SOA in the authority section (capped at `negative_max_ttl`),
  and are not cached without one; a CNAME chain ending in NODATA, for the smaller of the two. The
  SOA's TTL is rewritten to that lifetime, as the client should cache the negative answer for it.
- SERVFAIL, REFUSED, FORMERR, NOTIMP, truncated (TC) and TSIG-signed replies are never cached, nor
  is anything whose lifetime is 0.
- TTLs are capped at `max_ttl` (and raised to `min_ttl`, 0 by default, i.e. left alone).
- OPT options of the reply (cookies, NSID, padding, client subnet) belong to one transaction: they
  are removed from the stored copy so a cached answer never carries another client's cookie.
- serve-stale (RFC 8767): an expired entry is kept for `stale_window` seconds and served, with TTL
  `stale_ttl` (30 s), only when the caller asks for it because every upstream failed.
- resolution failures (RFC 9520) are remembered per key for `failure_ttl` seconds (1 s), apart
  from the answers, so the caller can answer SERVFAIL (or stale) without asking again.
- bounded by entries and by bytes, least recently used evicted first.
"""

from __future__ import annotations

import enum
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from .message import MessageError, Rcode, question_end, skip_name

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_RR_FIXED = struct.Struct(">HHIH")  # type, class, ttl, rdlength
_BYTE = tuple(bytes((i,)) for i in range(256))
_EDE_STALE = b"\x00\x06" + struct.pack(">HHH", 15, 2, 3)  # OPT rdlength 6, then EDE option code 3

TYPE_A = 1
TYPE_SOA = 6
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_TSIG = 250

# Rough per-entry cost of the Python objects around the wire bytes (key tuple, entry, offsets,
# OrderedDict slot); counted so `max_bytes` bounds real memory, not only payload.
ENTRY_OVERHEAD = 320


class Section(enum.IntEnum):
    ANSWER = 1
    AUTHORITY = 2
    ADDITIONAL = 3


# A DNS message that cannot be walked (truncated, bad label, bad pointer): message.py's error, as
# that module owns the walkers (question_end, skip_name) this one uses.
WireError = MessageError


# (lowercased question name as wire bytes, qtype, qclass, shape bits); a plain tuple because it is
# built on every query.
CacheKey = tuple[bytes, int, int, int]

SHAPE_EDNS = 1
SHAPE_DO = 2
SHAPE_CD = 4
SHAPE_AD = 8


class QueryInfo(NamedTuple):
    """What the hot path needs from a query: its cache key and where its question ends."""

    key: CacheKey | None  # None: not cacheable (EDNS version != 0, odd shape)
    qend: int  # offset just past the question (name, type, class)


class RecordPos(NamedTuple):
    """Where one resource record sits in a message."""

    section: Section
    start: int
    rtype: int
    ttl_off: int
    rdata_off: int
    rdlen: int


@dataclass(frozen=True, slots=True)
class MessageScan:
    """The layout of a message, as found by `scan_message`."""

    qend: int  # end of the (single) question; 12 when there is none
    qdcount: int
    rcode: int  # header rcode (the low four bits)
    ancount: int
    records: tuple[RecordPos, ...]


def query_info(query: bytes) -> QueryInfo:
    """Cache key and question end of a client query; raises WireError if it has no single question."""
    qend = question_end(query)
    # Label lengths are <= 63, below b'A' (65), so bytes.lower() only touches letters.
    name = bytes(query[12:qend - 4]).lower()
    qtype = (query[qend - 4] << 8) | query[qend - 3]
    qclass = (query[qend - 2] << 8) | query[qend - 1]
    shape = (SHAPE_CD if query[3] & 0x10 else 0) | (SHAPE_AD if query[3] & 0x20 else 0)
    if query[6] | query[7] | query[8] | query[9]:
        return QueryInfo(None, qend)  # answers or authority in a query: not a shape we cache
    arcount = (query[10] << 8) | query[11]
    if arcount == 0:
        return QueryInfo((name, qtype, qclass, shape), qend)
    p = qend
    # The common case: one OPT record at the root, right after the question.
    if arcount == 1 and len(query) >= p + 11 and query[p] == 0 and query[p + 1] == 0 and query[p + 2] == TYPE_OPT:
        if query[p + 6] != 0:
            return QueryInfo(None, qend)  # EDNS version > 0: the upstream answers BADVERS
        shape |= SHAPE_EDNS | (SHAPE_DO if query[p + 7] & 0x80 else 0)
        return QueryInfo((name, qtype, qclass, shape), qend)
    return QueryInfo(None, qend)  # several additional records (TSIG, ...): forward, do not cache


def scan_message(msg: bytes) -> MessageScan:
    """Walk every record of `msg` (at most one question); raises WireError on a malformed message."""
    n = len(msg)
    if n < 12:
        raise WireError("shorter than a DNS header")
    qdcount, ancount, nscount, arcount = struct.unpack_from(">HHHH", msg, 4)
    if qdcount > 1:
        raise WireError("more than one question")
    i = 12
    if qdcount:
        i = skip_name(msg, i) + 4
        if i > n:
            raise WireError("question type/class missing")
    qend = i
    records = []
    for section, count in ((Section.ANSWER, ancount), (Section.AUTHORITY, nscount),
                           (Section.ADDITIONAL, arcount)):
        for _ in range(count):
            start = i
            i = skip_name(msg, i)
            if i + 10 > n:
                raise WireError("record header runs past the end")
            rtype, _rclass, _ttl, rdlen = _RR_FIXED.unpack_from(msg, i)
            rdata = i + 10
            i = rdata + rdlen
            if i > n:
                raise WireError("record data runs past the end")
            records.append(RecordPos(section, start, rtype, rdata - 6, rdata, rdlen))
    if i != n:
        raise WireError("trailing bytes after the last record")
    return MessageScan(qend, qdcount, msg[3] & 0x0F, ancount, tuple(records))


def strip_opt_options(msg: bytes, scan: MessageScan) -> bytes | None:
    """`msg` with the options of its OPT record removed (cookies, NSID, padding belong to one client's
    transaction); `msg` itself when there are none; None when an OPT with options is not the last
    record (cutting it would move the records after it)."""
    records = scan.records
    for pos, rec in enumerate(records):
        if rec.rtype == TYPE_OPT and rec.rdlen:
            if pos != len(records) - 1:
                return None
            return msg[:rec.rdata_off - 2] + b"\x00\x00"
    return msg


@dataclass(frozen=True, slots=True)
class CacheStats:
    entries: int
    bytes: int
    hits: int
    misses: int
    stale_served: int
    evictions: int
    inserts: int


class _Entry:
    __slots__ = ("wire", "offsets", "ttls", "born", "expires", "stale_until", "size", "aged", "aged_for",
                 "opt_last")

    def __init__(self, wire: bytes, offsets: tuple[int, ...], ttls: tuple[int, ...], born: float,
                 lifetime: int, stale_window: float, opt_last: bool) -> None:
        self.wire = wire
        self.opt_last = opt_last  # the wire ends with an OPT of no options: an EDE can be appended
        self.offsets = offsets
        self.ttls = ttls
        self.born = born
        self.expires = born + lifetime
        self.stale_until = self.expires + stale_window
        # `aged` is `wire` with TTLs decremented by `aged_for` whole seconds: hits within one second
        # share it, so most hits only splice in the client's ID, RD bit and question.
        self.aged = wire
        self.aged_for = 0
        self.size = 2 * len(wire) + 8 * len(offsets) + ENTRY_OVERHEAD


class Cache:
    """An LRU cache of upstream replies, keyed by question and query shape (see module docstring)."""

    def __init__(self, *, max_entries: int = 10_000, max_bytes: int = 32 * 1024 * 1024,
                 max_ttl: int = 86_400, min_ttl: int = 0, negative_max_ttl: int = 3_600,
                 stale_window: float = 86_400.0, stale_ttl: int = 30, failure_ttl: float = 1.0) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("cache bounds must be positive")
        if not 0 <= min_ttl <= max_ttl:
            raise ValueError("need 0 <= min_ttl <= max_ttl")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_ttl = max_ttl
        self.min_ttl = min_ttl
        self.negative_max_ttl = negative_max_ttl
        self.stale_window = stale_window
        self.stale_ttl = stale_ttl
        self.failure_ttl = failure_ttl
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        # Keys whose resolution just failed -> until when (RFC 9520); kept apart from the answers
        # so a failure never evicts or replaces a stale answer worth serving.
        self._failures: OrderedDict[CacheKey, float] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self.stale_served = 0
        self.evictions = 0
        self.inserts = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def stats(self) -> CacheStats:
        return CacheStats(len(self._entries), self._bytes, self.hits, self.misses, self.stale_served,
                          self.evictions, self.inserts)

    def clear(self) -> None:
        """Forget everything (a view change that moves routes makes old answers wrong)."""
        self._entries.clear()
        self._failures.clear()
        self._bytes = 0

    # -- the hot path ------------------------------------------------------------------------

    def get(self, query: bytes, info: QueryInfo, now: float) -> bytes | None:
        """A fresh cached reply for `query`, shaped for it (ID, RD, question case, aged TTLs), or None."""
        key = info.key
        if key is None:
            return None
        entry = self._entries.get(key)
        if entry is None or now >= entry.expires:
            self.misses += 1
            if entry is not None and now >= entry.stale_until:
                self._drop(key, entry)
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        age = int(now - entry.born)
        if age <= 0:
            wire = entry.wire
        else:
            if age != entry.aged_for:
                buf = bytearray(entry.wire)
                pack = _U32.pack_into
                for off, ttl in zip(entry.offsets, entry.ttls):
                    pack(buf, off, ttl - age if ttl > age else 0)
                entry.aged = bytes(buf)
                entry.aged_for = age
            wire = entry.aged
        qend = info.qend
        return b"".join((query[0:2], _BYTE[(wire[2] & 0xFE) | (query[2] & 0x01)], wire[3:12],
                         query[12:qend], wire[qend:]))

    def get_stale(self, query: bytes, info: QueryInfo, now: float) -> bytes | None:
        """An expired (or fresh) reply within the stale window, every TTL set to `stale_ttl`; RFC 8767."""
        key = info.key
        if key is None:
            return None
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.stale_until:
            self._drop(key, entry)
            return None
        if now < entry.expires:
            # Still fresh (it was inserted while the upstreams were failing for another client).
            return self.get(query, info, now)
        self._entries.move_to_end(key)
        self.stale_served += 1
        buf = bytearray(entry.wire)
        buf[0] = query[0]
        buf[1] = query[1]
        buf[2] = (buf[2] & 0xFE) | (query[2] & 0x01)
        buf[12:info.qend] = query[12:info.qend]
        pack = _U32.pack_into
        for off, ttl in zip(entry.offsets, entry.ttls):
            pack(buf, off, min(ttl, self.stale_ttl))
        if entry.opt_last:
            # RFC 8914 Extended DNS Error 3, "Stale Answer": tells the client (and whoever debugs it)
            # why this answer is older than its TTL.
            buf[-2:] = _EDE_STALE
        return bytes(buf)

    def failed_recently(self, info: QueryInfo, now: float) -> bool:
        """True while a failure noted for this key is fresh (the caller answers SERVFAIL or stale)."""
        failures = self._failures
        if not failures or info.key is None:
            return False
        until = failures.get(info.key)
        if until is None:
            return False
        if now >= until:
            del failures[info.key]
            return False
        return True

    def note_failure(self, info: QueryInfo, now: float) -> None:
        """Remember that every upstream failed for this key, for `failure_ttl` seconds (RFC 9520:
        at least one second), so a storm of retries does not hammer failing upstreams."""
        if info.key is None or self.failure_ttl <= 0:
            return
        failures = self._failures
        failures[info.key] = now + self.failure_ttl
        failures.move_to_end(info.key)
        while len(failures) > self.max_entries:
            failures.popitem(last=False)

    # -- the slow path -----------------------------------------------------------------------

    def insert(self, query: bytes, info: QueryInfo, reply: bytes, now: float,
               scan: MessageScan | None = None) -> bool:
        """Store `reply` (an upstream's answer to `query`) if the rules allow; True when stored."""
        if info.key is None:
            return False
        if len(reply) < 12 or reply[2] & 0x02:  # TC: an incomplete answer is never cached
            return False
        try:
            if scan is None:
                scan = scan_message(reply)
            prepared = self._prepare(reply, scan)
        except WireError:
            return False
        if prepared is None:
            return False
        wire, offsets, ttls, lifetime, opt_last = prepared
        if reply[12:scan.qend].lower() != query[12:info.qend].lower():
            return False
        entry = _Entry(wire, offsets, ttls, now, lifetime, self.stale_window, opt_last)
        if entry.size > self.max_bytes:
            return False
        old = self._entries.pop(info.key, None)
        if old is not None:
            self._bytes -= old.size
        if self._failures:
            self._failures.pop(info.key, None)  # an answer ends the failure
        self._entries[info.key] = entry
        self._bytes += entry.size
        self.inserts += 1
        self._evict()
        return True

    def _prepare(self, reply: bytes, scan: MessageScan
                 ) -> tuple[bytes, tuple[int, ...], tuple[int, ...], int, bool] | None:
        """The stored form of `reply`: wire bytes (ID 0, TTLs capped, OPT options removed),
        TTL offsets, stored TTLs, the entry lifetime and whether the OPT is the last record; None
        when it must not be cached."""
        rcode = scan.rcode
        if rcode not in (Rcode.NOERROR, Rcode.NXDOMAIN) or scan.qdcount != 1:
            return None
        records = scan.records
        negative = rcode == Rcode.NXDOMAIN or scan.ancount == 0
        neg_ttl: int | None = None
        answer_min: int | None = None
        wire = bytearray(reply)
        wire[0] = wire[1] = 0
        cut: tuple[int, int] | None = None
        for pos, rec in enumerate(records):
            if rec.rtype == TYPE_TSIG:
                return None
            if rec.rtype == TYPE_OPT:
                if rec.rdlen:
                    if pos != len(records) - 1:
                        return None  # options we cannot cut without moving later records
                    cut = (rec.rdata_off - 2, rec.rdata_off + rec.rdlen)
                continue
            ttl = _U32.unpack_from(reply, rec.ttl_off)[0]
            if ttl & 0x80000000:
                ttl = 0  # RFC 2181 section 8: a TTL with the top bit set means zero
            if rec.section == Section.ANSWER:
                answer_min = ttl if answer_min is None else min(answer_min, ttl)
            elif rec.section == Section.AUTHORITY and rec.rtype == TYPE_SOA and rec.rdlen >= 22:
                # Also in a NOERROR with answers: a CNAME chain that ends in NODATA (RFC 2308
                # section 2.2) lives no longer than its negative part.
                minimum = _U32.unpack_from(reply, rec.rdata_off + rec.rdlen - 4)[0]
                soa = min(ttl, minimum, self.negative_max_ttl)
                neg_ttl = soa if neg_ttl is None else min(neg_ttl, soa)
        if negative:
            if neg_ttl is None:
                return None  # RFC 2308 section 5: no SOA, no negative caching
            lifetime = neg_ttl if answer_min is None else min(neg_ttl, answer_min)
        else:
            if answer_min is None:
                return None
            lifetime = answer_min if neg_ttl is None else min(answer_min, neg_ttl)
        lifetime = max(self.min_ttl, min(lifetime, self.max_ttl))
        if lifetime <= 0:
            return None
        offsets = []
        ttls = []
        for rec in records:
            if rec.rtype == TYPE_OPT:
                continue
            ttl = _U32.unpack_from(reply, rec.ttl_off)[0]
            ttl = 0 if ttl & 0x80000000 else ttl
            if rec.rtype == TYPE_SOA and rec.section == Section.AUTHORITY:
                ttl = lifetime  # the SOA's TTL is what the client caches the negative answer for
            ttl = max(self.min_ttl, min(ttl, self.max_ttl))
            _U32.pack_into(wire, rec.ttl_off, ttl)
            offsets.append(rec.ttl_off)
            ttls.append(ttl)
        if cut is not None:
            start, end = cut
            wire[start:end] = b"\x00\x00"  # rdlength 0, options gone; nothing follows the OPT
        opt_last = bool(records) and records[-1].rtype == TYPE_OPT
        return bytes(wire), tuple(offsets), tuple(ttls), lifetime, opt_last

    def _drop(self, key: CacheKey, entry: _Entry) -> None:
        del self._entries[key]
        self._bytes -= entry.size

    def _evict(self) -> None:
        entries = self._entries
        while len(entries) > self.max_entries or self._bytes > self.max_bytes:
            _key, entry = entries.popitem(last=False)
            self._bytes -= entry.size
            self.evictions += 1

    def purge(self, now: float) -> int:
        """Drop entries past their stale window; returns how many (call it now and then, off the hot path)."""
        dead = [k for k, e in self._entries.items() if now >= e.stale_until]
        for k in dead:
            self._drop(k, self._entries[k])
        return len(dead)
