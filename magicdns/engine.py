"""The answer engine: query bytes in, reply bytes (or a forwarding decision) out. Sans-I/O.

Three paths:
- the reply memo (`Engine.replies`): the query's bytes after its ID, exactly as sent, map to the
  reply's bytes after its ID. A hit is one dictionary lookup and the ID written in front; the
  batched UDP listener reads it straight from its receive buffer. Only replies that are a pure
  function of those bytes go in (no round-robin rotation, never truncated for any transport);
- the template path reads only the header, the question and the OPT record by hand and looks the
  lowercased question up in a per-snapshot table of finished replies: the client's ID, RD/CD bits
  and question case are spliced into stored bytes, nothing is parsed or built;
- the slow path (first sight of a question, errors, odd shapes) parses with dnslib, answers from
  the zone, and stores the finished reply for the template path.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Union

from dnslib import CLASS, QTYPE, RR, DNSError, DNSLabel, DNSQuestion, DNSRecord

from .cache import SHAPE_AD, SHAPE_CD, SHAPE_DO, SHAPE_EDNS, QueryInfo
from .message import (MAX_UDP_PAYLOAD, PLAIN_UDP_LIMIT, Edns, MessageError, Rcode, check_options,
                      error_reply, opt_record, question_end, scan_query, truncate, udp_limit)
from .zone import ForwardRoute, LocalZone, Zone

# CNAMEs followed inside our zones before the answer stops: glibc and most stubs give up after 16
# links of their own, so a shorter limit here breaks names they would resolve (nsd follows more).
MAX_CNAME_CHAIN = 16
_OPT_PLAIN = opt_record(False)
_OPT_DO = opt_record(True)
_ADDITIONAL_FOR = {QTYPE.SRV: lambda rd: rd.target, QTYPE.MX: lambda rd: rd.label,
                   QTYPE.NS: lambda rd: rd.label}
_REFUSED_TYPES = {QTYPE.AXFR, QTYPE.IXFR}
_SLOW_QTYPES = frozenset((*_REFUSED_TYPES, QTYPE.OPT))  # never decided from the wire labels


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """What the zone says to one question."""

    rcode: int
    answer: tuple[RR, ...]
    authority: tuple[RR, ...] = ()
    additional: tuple[RR, ...] = ()
    # The name outside our zones that the answer's CNAME chain ends at (None when it ends here).
    external: str | None = None


class Template:
    """A finished reply minus the parts that come from each query (ID, RD/CD, question, OPT)."""

    __slots__ = ("flags", "counts", "counts_edns", "tails", "rcode", "turn")

    def __init__(self, aa: bool, rcode: int, counts: tuple[int, int, int], tails: list[bytes]) -> None:
        b2 = 0x80 | (0x04 if aa else 0)
        # Four variants of the two flag bytes, indexed by the query's RD bit | CD bit >> 3.
        self.flags = [bytes((b2 | (i & 1), 0x80 | ((i & 2) << 3) | rcode)) for i in range(4)]
        an, ns, ar = counts
        self.counts = bytes((0, 1, an >> 8, an & 255, ns >> 8, ns & 255, ar >> 8, ar & 255))
        ar += 1
        self.counts_edns = bytes((0, 1, an >> 8, an & 255, ns >> 8, ns & 255, ar >> 8, ar & 255))
        self.tails = tails
        self.rcode = rcode
        self.turn = 0


class Forward:
    """The engine's decision to forward: the server hands it to the forwarder."""

    __slots__ = ("route", "limit", "info")

    def __init__(self, route: ForwardRoute | None, limit: int, info: QueryInfo | None = None) -> None:
        self.route = route
        self.limit = limit  # the client's UDP size (or 65535 over TCP)
        # The query as the forwarding cache reads it (cache.query_info), when the engine's fast path
        # has read it already: a query shed under a flood is then not read twice (issue 8).
        self.info = info


class Chase(Forward):
    """The engine's decision to follow a CNAME out of our zones for a client that asked for
    recursion (RFC 1034 3.6.2, 4.3.1): forward `subquery` (target, qtype) on `route`, then
    `chase.chase_reply` puts `prefix` (our part of the chain) in front of the upstream's answer.

    A subclass of `Forward`, so every listener hands it to the server's forwarding path unchanged."""

    __slots__ = ("prefix", "target", "qtype", "question", "edns", "subquery")

    def __init__(self, route: ForwardRoute, limit: int, prefix: tuple[RR, ...], target: str, qtype: int,
                 question: bytes, edns: Edns | None, subquery: bytes) -> None:
        super().__init__(route, limit)
        self.prefix = prefix
        self.target = target
        self.qtype = qtype
        self.question = question  # the client's question section (wire), in the client's case
        self.edns = edns
        self.subquery = subquery


@dataclass(frozen=True, slots=True)
class _ChasePlan:
    """What every recursive query for one question chases, worked out once per snapshot."""

    route: ForwardRoute
    prefix: tuple[RR, ...]
    target: str
    target_wire: bytes
    qtype: int


Result = Union[bytes, Forward, None]


class Engine:
    """Answers queries from one immutable `Zone`; a new view means a new Engine."""

    def __init__(self, zone: Zone, memo_limit: int = 100_000) -> None:
        self.zone = zone
        self.memo_limit = memo_limit
        # Two generations approximate LRU without bookkeeping on the hot path.
        self._memo: dict[bytes, Template] = {}
        self._old: dict[bytes, Template] = {}
        # Query bytes after the ID -> reply bytes after the ID (see the module docstring). Emptied
        # in place when full (listeners hold a reference to it); negatives are added only while
        # there is room, so a flood of unique names cannot push the tailnet's own names out.
        self.replies: dict[bytes, bytes] = {}
        self._chases: dict[bytes, _ChasePlan] = {}  # questions whose chain leaves our zones
        self._soa_tails: dict[str, bytes] = {}
        self._under: dict[bytes, tuple] = {}  # parent name (wire) -> what _route_under says
        self._specials: frozenset[str] | None = None  # parents of route suffixes and exact names
        self.fast_hits = 0
        self.slow = 0

    # -- the hot path -------------------------------------------------------------------------

    def handle(self, data: bytes, tcp: bool = False) -> Result:
        """Reply bytes, a `Forward` decision, or None (drop: not a query, or unreadable)."""
        tail = self.replies.get(data[2:])
        if tail is not None:
            self.fast_hits += 1
            return data[:2] + tail
        return self.answer(data, tcp)

    def answer(self, data: bytes, tcp: bool = False) -> Result:
        """`handle` for a caller that has already looked `data` up in `replies` and missed."""
        n = len(data)
        # One question, no answer/authority records, at most one additional (OPT); QR=0, QUERY.
        if n < 17 or data[2] & 0xFA or data[4:11] != b"\x00\x01\x00\x00\x00\x00\x00" or data[11] > 1:
            return self._slow(data, tcp)
        try:
            qend = question_end(data)
        except MessageError:  # a name over 255 octets is FORMERR, never forwarded
            return self._slow(data, tcp)
        i = qend - 5
        if data[11] == 0:
            if qend != n:
                return self._slow(data, tcp)
            edns = False
            do = False
            limit = 512
        else:
            # One OPT record, version 0, nothing after it: anything else takes the slow path.
            if n < qend + 11 or data[qend:qend + 3] != b"\x00\x00\x29" or data[qend + 6] != 0 or \
                    qend + 11 + (data[qend + 9] << 8 | data[qend + 10]) != n:
                return self._slow(data, tcp)
            if data[qend + 9] or data[qend + 10]:  # options (a cookie from dig): lengths must hold
                try:
                    check_options(data, qend + 11, n)
                except MessageError:
                    return self._slow(data, tcp)
            edns = True
            do = data[qend + 7] & 0x80
            limit = data[qend + 3] << 8 | data[qend + 4]
            limit = 512 if limit < 512 else MAX_UDP_PAYLOAD if limit > MAX_UDP_PAYLOAD else limit
        ulimit = limit  # a reply that fits the UDP limit is the same over every transport
        if tcp:
            limit = 65535
        key = data[12:i].lower() + data[i:qend]
        entry = self._memo.get(key)
        if entry is None:
            entry = self._old.get(key)
            if entry is None:
                return self._miss(data, i, key, edns, do, limit, tcp)
            self._remember(key, entry)
        self.fast_hits += 1
        tails = entry.tails
        if len(tails) == 1:
            tail = tails[0]
        else:
            entry.turn += 1
            tail = tails[entry.turn % len(tails)]
        flags = entry.flags[(data[2] & 1) | ((data[3] & 0x10) >> 3)]
        if edns:
            reply = b"".join((data[:2], flags, entry.counts_edns, data[12:qend], tail,
                              _OPT_DO if do else _OPT_PLAIN))
        else:
            reply = b"".join((data[:2], flags, entry.counts, data[12:qend], tail))
        size = len(reply)
        if size > limit:
            return truncate(reply, limit)
        if size <= ulimit and len(tails) == 1:
            replies = self.replies
            if len(replies) >= self.memo_limit:
                replies.clear()
            replies[data[2:]] = reply[2:]
        return reply

    def _miss(self, data: bytes, i: int, key: bytes, edns: bool, do: int, limit: int, tcp: bool) -> Result:
        """A plain query not in the memo: decide from the wire labels, without dnslib, the two cases
        that must stay cheap for names never seen before: forwarding, and names that do not exist in
        a local zone (random names, search-list expansions). Everything else builds a template."""
        plan = self._chases.get(key)
        if plan is not None:
            if not data[2] & 1:  # RD clear: the authoritative bare chain, from the slow path
                return self._slow(data, tcp)
            self.fast_hits += 1
            return _chase_of(plan, data, i + 5, limit, Edns(limit, 0, bool(do)) if edns else None)
        if data[i + 3] or data[i + 4] != 1 or (data[i + 1] << 8 | data[i + 2]) in _SLOW_QTYPES:
            return self._slow(data, tcp)
        zone = self.zone
        # The route of a name is its parent's (remembered per parent: unique names share a few),
        # unless the name is itself a route's suffix or an exact name. The text form of the name is
        # then the first label and the parent's text.
        first = data[12]
        name_end = i - 11  # in key: just past the name's root label
        parent = key[first + 1:name_end]
        under = self._under.get(parent)
        if under is None:
            under = self._route_under(parent)
        target, suffix, ptext, apex_len, soa, plain = under
        if plain and target.__class__ is not LocalZone:
            # Forwarded, decided from the parent alone: no route suffix and no exact name sits
            # directly below it, and it is not the root (so no short host name). A flood of unique
            # names under one parent is decided without building each name's text.
            return self._forward(data, i, key, edns, do, target, limit)  # type: ignore[arg-type]
        label = key[1:first + 1].decode("latin-1").replace(".", "\\046")
        name = label + "." + ptext if ptext else label
        if name in zone.routes or name in zone.exact or not first:
            target, suffix = zone.route_for(name)
            apex_len = len(suffix) + 2 if suffix else 1
            soa = None
        if target.__class__ is not LocalZone:
            if not ptext and zone.host_for_short_name(name):
                return self._slow(data, tcp)
            return self._forward(data, i, key, edns, do, target, limit)  # type: ignore[arg-type]
        if zone.exists(name, target) or (  # type: ignore[arg-type]
                zone.has_wildcards and zone.wildcard_for(name, target)):  # type: ignore[arg-type]
            return self._slow(data, tcp)
        # NXDOMAIN: header, the client's question, and the zone's SOA owned by a pointer to where
        # the apex starts inside the question.
        self.fast_hits += 1
        pointer = i + 1 - apex_len
        if soa is None:
            soa = self._soa_tails.get(suffix)
            if soa is None:
                soa = self._soa_tails[suffix] = _soa_tail(zone, suffix)
        flags = bytes((0x84 | (data[2] & 1), 0x83 | (data[3] & 0x10)))
        counts = b"\x00\x01\x00\x00\x00\x01\x00\x01" if edns else b"\x00\x01\x00\x00\x00\x01\x00\x00"
        parts = [data[:2], flags, counts, data[12:i + 5], bytes((0xC0 | pointer >> 8, pointer & 0xFF)), soa]
        if edns:
            parts.append(_OPT_DO if do else _OPT_PLAIN)
        reply = b"".join(parts)
        if len(reply) > PLAIN_UDP_LIMIT:  # a long question under a long domain: rare, not memoised
            return truncate(reply, limit)
        replies = self.replies
        if len(replies) < self.memo_limit:  # a negative never evicts: see __init__
            replies[data[2:]] = reply[2:]
        return reply

    def _forward(self, data: bytes, i: int, key: bytes, edns: bool, do: int, target: ForwardRoute,
                 limit: int) -> Forward:
        """The fast path's decision to forward, with what cache.query_info would read, from what
        `answer`'s checks vouch for: one question, no answer or authority records, class IN, at
        most an OPT of version 0."""
        self.fast_hits += 1
        b3 = data[3]
        shape = (SHAPE_CD if b3 & 0x10 else 0) | (SHAPE_AD if b3 & 0x20 else 0)
        if edns:
            shape |= (SHAPE_EDNS | SHAPE_DO) if do else SHAPE_EDNS
        return Forward(target, limit, QueryInfo((key[:-4], data[i + 1] << 8 | data[i + 2], 1, shape), i + 5))

    def _route_under(self, parent: bytes) -> tuple:
        """(route, its suffix, the parent's text, the apex's wire length, the SOA tail or None,
        plain) for the names directly below `parent` (lowercased wire form), remembered per
        snapshot. `plain`: no route's suffix and no exact name is directly below the parent, and
        it is not the root, so every name below it takes the parent's route."""
        labels = []
        p = 0
        end = len(parent) - 1
        while p < end:
            length = parent[p]
            labels.append(parent[p + 1:p + 1 + length].decode("latin-1").replace(".", "\\046"))
            p += length + 1
        ptext = ".".join(labels)
        target, suffix = self.zone.route_under(ptext)
        soa = None
        if target.__class__ is LocalZone:
            soa = self._soa_tails.get(suffix)
            if soa is None:
                soa = self._soa_tails[suffix] = _soa_tail(self.zone, suffix)
        specials = self._specials
        if specials is None:  # the parents of every route suffix and exact name, once per snapshot
            specials = self._specials = frozenset(n.partition(".")[2] for n in (*self.zone.routes, *self.zone.exact))
        plain = bool(ptext) and ptext not in specials
        under = (target, suffix, ptext, len(suffix) + 2 if suffix else 1, soa, plain)
        if len(self._under) >= 4096:  # random parents (a.<random>.example) cannot grow it
            self._under.clear()
        self._under[parent] = under
        return under

    def _remember(self, key: bytes, entry: Template) -> None:
        if len(self._memo) >= self.memo_limit:
            self._old = self._memo
            self._memo = {}
        self._memo[key] = entry

    # -- the slow path ------------------------------------------------------------------------

    def _slow(self, data: bytes, tcp: bool) -> Result:
        self.slow += 1
        if len(data) < 12 or data[2] & 0x80:
            return None  # unreadable, or a response: answering could start a loop
        try:
            shape = scan_query(data)
        except MessageError as exc:
            return error_reply(data, Rcode.FORMERR, None, qend=exc.qend)
        edns = shape.edns
        opcode = (data[2] >> 3) & 0xF
        if opcode != 0:
            return error_reply(data, Rcode.NOTIMP, edns, qend=shape.qend)
        if shape.tsig is not None:
            # RFC 8945 5.2.1: we hold no keys, so every key is unknown to us.
            return error_reply(data, Rcode.NOTAUTH, edns, qend=shape.qend, tsig=shape.tsig)
        if shape.qdcount != 1:
            return error_reply(data, Rcode.FORMERR, edns, qend=shape.qend)
        if edns is not None and edns.version > 0:
            return error_reply(data, Rcode.BADVERS, Edns(edns.udp_size, 0, edns.do), qend=shape.qend)
        if shape.qtype in _REFUSED_TYPES:
            # Checked before the sections: a well-formed IXFR carries the client's SOA in authority.
            return error_reply(data, Rcode.REFUSED, edns, qend=shape.qend)
        if shape.records:
            return error_reply(data, Rcode.FORMERR, edns, qend=shape.qend)
        if shape.qclass != CLASS.IN:
            return error_reply(data, Rcode.REFUSED, edns, qend=shape.qend)
        if shape.qtype == QTYPE.OPT:
            return error_reply(data, Rcode.FORMERR, edns, qend=shape.qend)
        try:
            query = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError, UnicodeError, KeyError, TypeError):
            return error_reply(data, Rcode.FORMERR, edns, qend=shape.qend)
        q = query.q
        limit = 65535 if tcp else udp_limit(edns)
        qname = name_text(q.qname)
        target, _ = self.zone.route_for(qname)
        key = data[12:shape.qend - 4].lower() + data[shape.qend - 4:shape.qend]
        if isinstance(target, LocalZone):
            owner = _owner_label(q.qname)
            ans = resolve_local(self.zone, qname, q.qtype, target, owner)
        else:
            short = self.zone.host_for_short_name(qname)
            if short is None:
                # Forwarding decisions are not memoised: unique names would evict local answers.
                return Forward(target, limit)
            owner = _owner_label(q.qname)
            ans = self._short_answer(owner, short, q.qtype)
        if ans.external is not None:
            plan = self._chase_plan(key, ans, q.qtype)
            if plan is not None and data[2] & 1:
                return _chase_of(plan, data, shape.qend, limit, edns)
            # RD clear (or nowhere to ask): the bare chain, as an authoritative server answers. Not
            # memoised, because the fast path does not look at RD.
            return self._serve(build_template(owner, q.qtype, ans), query, data, edns, tcp, limit)
        template = build_template(owner, q.qtype, ans)
        if key is not None and template.rcode != Rcode.NXDOMAIN:
            self._remember(key, template)
        return self._serve(template, query, data, edns, tcp, limit)

    def _serve(self, template: Template, query: DNSRecord, data: bytes, edns: Edns | None,
               tcp: bool, limit: int) -> bytes:
        """Assemble a reply from a template for a query that the fast path did not take."""
        qwire = bytes(DNSRecord(q=DNSQuestion(query.q.qname, query.q.qtype, query.q.qclass)).pack()[12:])
        flags = template.flags[(data[2] & 1) | ((data[3] & 0x10) >> 3)]
        template.turn += 1
        tail = template.tails[template.turn % len(template.tails)]
        counts = template.counts_edns if edns else template.counts
        reply = data[:2] + flags + counts + qwire + tail
        if edns is not None:
            reply += _OPT_DO if edns.do else _OPT_PLAIN
        if not tcp and len(reply) > limit:
            return truncate(reply, limit)
        return reply

    def _short_answer(self, owner: DNSLabel, fqdn: str, qtype: int) -> LocalAnswer:
        """A single-label name of this tailnet: the node's data, owned by the name as asked."""
        zone = self.zone.local_zone_of(fqdn)
        assert zone is not None
        ans = resolve_local(self.zone, fqdn, qtype, zone)
        renamed = tuple(RR(owner, rr.rtype, rr.rclass, rr.ttl, rr.rdata)
                        if name_text(rr.rname) == fqdn else rr for rr in ans.answer)
        return LocalAnswer(ans.rcode, renamed, ans.authority, ans.additional, ans.external)

    def _chase_plan(self, key: bytes, ans: LocalAnswer, qtype: int) -> _ChasePlan | None:
        """How to follow our chain out of our zones (remembered for the next query), or None when no
        upstream serves its target."""
        assert ans.external is not None
        route, _ = self.zone.route_for(ans.external)
        if not isinstance(route, ForwardRoute) or not route.upstreams:
            return None
        plan = _ChasePlan(route, ans.answer, ans.external, _plain_name(ans.answer[-1].rdata.label), qtype)
        if len(self._chases) >= self.memo_limit:
            self._chases.clear()
        self._chases[key] = plan
        return plan

    def answer_local(self, qname: str, qtype: int) -> LocalAnswer | None:
        """The zone's answer for a name (None when the name is not ours): for `magicdns query`."""
        zone = self.zone.local_zone_of(qname)
        if zone is None:
            short = self.zone.host_for_short_name(qname)
            return resolve_local(self.zone, short, qtype, self.zone.local_zone_of(short)) if short else None
        return resolve_local(self.zone, qname, qtype, zone)


def _chase_of(plan: _ChasePlan, data: bytes, qend: int, limit: int, edns: Edns | None) -> Chase:
    """The chase of one query: its question and EDNS, and a subquery for the target (RD set, CD and
    DO as the client asked, EDNS always, so the upstream may answer in full)."""
    do = edns is not None and edns.do
    sub = (b"\x00\x00\x01" + bytes((data[3] & 0x10,)) + b"\x00\x01\x00\x00\x00\x00\x00\x01" + plan.target_wire
           + struct.pack("!HH", plan.qtype, CLASS.IN) + (_OPT_DO if do else _OPT_PLAIN))
    return Chase(plan.route, limit, plan.prefix, plan.target, plan.qtype, data[12:qend], edns, sub)


def name_text(label: DNSLabel) -> str:
    """Lowercase text of a name without the trailing dot, for matching against zone data.

    A '.' inside a label is data (RFC 4343 2.1), so it becomes an escape that no zone name can
    contain: the label count stays right and such names can only be NXDOMAIN or forwarded.
    """
    return ".".join(part.decode("latin-1").replace(".", "\\046") for part in label.label).lower()


def _owner_label(label: DNSLabel) -> DNSLabel:
    """The question's name, lowercased label by label: owners built from it compress onto the question."""
    return DNSLabel(tuple(part.lower() for part in label.label))


def resolve_local(zone: Zone, qname: str, qtype: int, lz: LocalZone,
                  qowner: DNSLabel | None = None) -> LocalAnswer:
    """The authoritative answer for (qname, qtype) in local zone `lz` (RFC 1034 4.3.2, 2308, 4592).

    `qowner` is the question's own name, used as the owner of records a wildcard synthesises for it.
    """
    answer: list[RR] = []
    name, current = qname, lz
    seen = {qname}
    for _ in range(MAX_CNAME_CHAIN + 1):
        rrsets = zone.rrsets(name, current)
        if not rrsets and not zone.exists(name, current):
            wildcard = zone.wildcard_for(name, current)
            if wildcard is None:
                return LocalAnswer(Rcode.NXDOMAIN, tuple(answer), (zone.soa(current.apex),))
            owner = qowner if (name == qname and qowner is not None) else DNSLabel(name + ".")
            rrsets = {t: [RR(owner, rr.rtype, rr.rclass, rr.ttl, rr.rdata) for rr in rrs]
                      for t, rrs in zone.rrsets(wildcard, current).items()}
        if qtype == QTYPE.ANY and rrsets:
            answer.extend(rr for rrs in rrsets.values() for rr in rrs)
            return LocalAnswer(Rcode.NOERROR, tuple(answer))
        if qtype in rrsets:
            found = rrsets[qtype]
            answer.extend(found)
            return LocalAnswer(Rcode.NOERROR, tuple(answer), (), _additional(zone, qtype, found))
        cnames = rrsets.get(QTYPE.CNAME)
        if not cnames:
            return LocalAnswer(Rcode.NOERROR, tuple(answer), (zone.soa(current.apex),))
        answer.append(cnames[0])
        target = name_text(cnames[0].rdata.label)
        next_zone = zone.local_zone_of(target)
        if next_zone is None:
            # Out of our zones: the server follows it for clients that asked for recursion.
            return LocalAnswer(Rcode.NOERROR, tuple(answer), external=target)
        if target in seen:
            # A loop: each link once, as nsd answers it, never spun.
            return LocalAnswer(Rcode.NOERROR, tuple(answer))
        seen.add(target)
        name, current = target, next_zone
    return LocalAnswer(Rcode.NOERROR, tuple(answer))


def _additional(zone: Zone, qtype: int, found: list[RR]) -> tuple[RR, ...]:
    """Addresses of in-zone SRV, MX and NS targets, so clients need not ask again."""
    pick = _ADDITIONAL_FOR.get(qtype)
    if pick is None:
        return ()
    extra: list[RR] = []
    for rr in found:
        target = name_text(pick(rr.rdata))
        lz = zone.local_zone_of(target)
        if lz is None:
            continue
        sets = zone.rrsets(target, lz)
        extra.extend(sets.get(QTYPE.A, ()))
        extra.extend(sets.get(QTYPE.AAAA, ()))
    return tuple(extra)


def _soa_tail(zone: Zone, apex: str) -> bytes:
    """The wire form of the zone's SOA record after its owner name (type, class, TTL, rdata).

    Names in the rdata are written uncompressed: the tail is spliced into replies of any layout.
    """
    rr = zone.soa(apex)
    soa = rr.rdata
    rdata = _plain_name(soa.mname) + _plain_name(soa.rname) + struct.pack("!5I", *soa.times)
    return struct.pack("!HHIH", QTYPE.SOA, CLASS.IN, rr.ttl, len(rdata)) + rdata


def _plain_name(label: DNSLabel) -> bytes:
    return b"".join(bytes((len(part),)) + part for part in label.label) + b"\x00"


def build_template(qname: DNSLabel, qtype: int, ans: LocalAnswer) -> Template:
    """Pack a local answer once (with rotations of multi-record RRsets) into a reusable template.

    Names are packed lowercase, so owners equal to the question compress to a pointer at offset 12:
    the client's own spelling of the question then shows through in every answer.
    """
    question = DNSQuestion(qname, qtype, CLASS.IN)
    start = len(DNSRecord(q=question).pack())  # header + question: the per-query part
    tails = []
    for answer in _rotations(ans.answer):
        msg = DNSRecord(q=question)
        msg.rr, msg.auth, msg.ar = list(answer), list(ans.authority), list(ans.additional)
        tails.append(bytes(msg.pack()[start:]))
    return Template(True, ans.rcode, (len(ans.answer), len(ans.authority), len(ans.additional)), tails)


def _rotations(answer: tuple[RR, ...], most: int = 8) -> list[tuple[RR, ...]]:
    """Round-robin orders of the answer: each variant starts each multi-record RRset one later."""
    groups: dict[tuple[str, int], list[RR]] = {}
    for rr in answer:
        groups.setdefault((str(rr.rname).lower(), rr.rtype), []).append(rr)
    size = min(most, max((len(g) for g in groups.values()), default=1))
    if size <= 1:
        return [answer]
    out = []
    for k in range(size):
        rotated: dict[tuple[str, int], list[RR]] = {
            key: g[k % len(g):] + g[:k % len(g)] for key, g in groups.items()}
        order: list[RR] = []
        emitted: set[tuple[str, int]] = set()
        for rr in answer:  # keep the RRsets in their original order (CNAME chains stay in order)
            key = (str(rr.rname).lower(), rr.rtype)
            if key not in emitted:
                emitted.add(key)
                order.extend(rotated[key])
        out.append(tuple(order))
    return out
