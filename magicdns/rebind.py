"""DNS rebinding protection: tailnet addresses never come from the internet's answers.

A forwarded answer must not point a name outside our zones at a tailnet node, or a web page from
that name could reach the node's services as if from the same origin. Every form an address can
take in an answer counts:
- A records in 100.64.0.0/10;
- AAAA records in fd7a:115c:a1e0::/48, and IPv6 forms that reach a 100.64.0.0/10 address:
  IPv4-mapped (::ffff:0:0/96) and NAT64 (64:ff9b::/96, RFC 6052) - a client behind NAT64 connects
  to the embedded IPv4 address;
- the `ipv4hint` and `ipv6hint` parameters of SVCB and HTTPS records (RFC 9460), which browsers
  use to connect before (or instead of) asking for A/AAAA.

`tailnet_address_records` is the cheap check on the wire (every forwarded reply passes it);
`strip_tailnet_addresses` is the rare rewrite.
"""

from __future__ import annotations

from typing import Iterable

from dnslib import RD, DNSBuffer, DNSRecord

from .cache import TYPE_A, TYPE_AAAA, MessageScan, Section, WireError
from .ranges import NAT64_PREFIX, TAILNET_V4, TAILNET_V6


TYPE_SVCB = 64
TYPE_HTTPS = 65
SVC_MANDATORY = 0
SVC_IPV4HINT = 4
SVC_IPV6HINT = 6

# The ranges as byte tests (ranges.py defines them): a forwarded reply is checked on the wire.
_TAILNET_V6_PREFIX = TAILNET_V6.network_address.packed[:TAILNET_V6.prefixlen // 8]
_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"
_NAT64_PREFIX = NAT64_PREFIX.network_address.packed[:12]
_V4_FIRST = TAILNET_V4.network_address.packed[0]
_V4_SECOND = TAILNET_V4.network_address.packed[1]
_V4_MASK = (0xFF << (16 - TAILNET_V4.prefixlen)) & 0xFF
assert TAILNET_V4.prefixlen > 8 and TAILNET_V6.prefixlen % 8 == 0 and NAT64_PREFIX.prefixlen == 96


def is_tailnet_v4(b: bytes) -> bool:
    """True for a packed IPv4 address in 100.64.0.0/10."""
    return b[0] == _V4_FIRST and b[1] & _V4_MASK == _V4_SECOND


def is_tailnet_v6(b: bytes) -> bool:
    """True for a packed IPv6 address in the tailnet range, or an IPv4-mapped or NAT64 form of a
    100.64.0.0/10 address."""
    if b[:len(_TAILNET_V6_PREFIX)] == _TAILNET_V6_PREFIX:
        return True
    head = b[:12]
    return (head == _V4_MAPPED_PREFIX or head == _NAT64_PREFIX) and b[12] == _V4_FIRST and b[13] & _V4_MASK == _V4_SECOND


def _svc_params_start(rdata: bytes) -> int:
    """Offset of the first SvcParam: past the priority and the (never compressed) target name."""
    i = 2
    while True:
        if i >= len(rdata):
            raise WireError("SVCB target name runs past the record")
        length = rdata[i]
        if length == 0:
            return i + 1
        if length & 0xC0:
            raise WireError("compressed SVCB target name")
        i += 1 + length


def _svc_params(rdata: bytes) -> Iterable[tuple[int, bytes]]:
    i = _svc_params_start(rdata)
    n = len(rdata)
    while i < n:
        if i + 4 > n:
            raise WireError("SvcParam header runs past the record")
        key = rdata[i] << 8 | rdata[i + 1]
        length = rdata[i + 2] << 8 | rdata[i + 3]
        if i + 4 + length > n:
            raise WireError("SvcParam value runs past the record")
        yield key, rdata[i + 4:i + 4 + length]
        i += 4 + length


def _hint_tailnet(key: int, value: bytes) -> bool:
    if key == SVC_IPV4HINT:
        return any(is_tailnet_v4(value[j:j + 4]) for j in range(0, len(value) - 3, 4))
    if key == SVC_IPV6HINT:
        return any(is_tailnet_v6(value[j:j + 16]) for j in range(0, len(value) - 15, 16))
    return False


def svcb_has_tailnet_hint(rdata: bytes) -> bool:
    """True when an SVCB/HTTPS record's ipv4hint or ipv6hint holds a tailnet address."""
    try:
        return any(_hint_tailnet(key, value) for key, value in _svc_params(rdata))
    except WireError:
        return False


def svcb_without_tailnet_hints(rdata: bytes) -> bytes | None:
    """The SVCB/HTTPS rdata with tailnet addresses taken out of its hints (a hint left empty goes
    whole), or None when the record cannot stand without them (a removed key is mandatory, or the
    rdata does not parse): then the record goes."""
    try:
        params = list(_svc_params(rdata))
        head = rdata[:_svc_params_start(rdata)]
    except WireError:
        return None
    out = bytearray(head)
    removed: set[int] = set()
    mandatory: set[int] = set()
    for key, value in params:
        if key == SVC_MANDATORY:
            mandatory.update(value[j] << 8 | value[j + 1] for j in range(0, len(value) - 1, 2))
        if key in (SVC_IPV4HINT, SVC_IPV6HINT):
            size = 4 if key == SVC_IPV4HINT else 16
            check = is_tailnet_v4 if key == SVC_IPV4HINT else is_tailnet_v6
            kept = b"".join(value[j:j + size] for j in range(0, len(value) - size + 1, size)
                            if not check(value[j:j + size]))
            if not kept:
                removed.add(key)
                continue
            value = kept
        out += key.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value
    if removed & mandatory:
        return None
    return bytes(out)


def tailnet_address_records(reply: bytes, scan: MessageScan) -> bool:
    """True when the answer or additional section points into the tailnet (any form above)."""
    for rec in scan.records:
        if rec.section == Section.AUTHORITY:
            continue
        rtype, off = rec.rtype, rec.rdata_off
        if rtype == TYPE_A:
            if rec.rdlen == 4 and is_tailnet_v4(reply[off:off + 4]):
                return True
        elif rtype == TYPE_AAAA:
            if rec.rdlen == 16 and is_tailnet_v6(reply[off:off + 16]):
                return True
        elif rtype == TYPE_SVCB or rtype == TYPE_HTTPS:
            if svcb_has_tailnet_hint(reply[off:off + rec.rdlen]):
                return True
    return False


def _rdata_bytes(rr) -> bytes:  # type: ignore[no-untyped-def]
    buf = DNSBuffer()
    rr.rdata.pack(buf)  # a fresh buffer: nothing to compress against, so the target stays whole
    return bytes(buf.data)


def _filter(rrs: list, names: set[str]) -> list:  # type: ignore[type-arg]
    kept = []
    for rr in rrs:
        if rr.rtype == TYPE_A or rr.rtype == TYPE_AAAA:
            raw = _rdata_bytes(rr)
            bad = is_tailnet_v4(raw) if rr.rtype == TYPE_A and len(raw) == 4 else (
                len(raw) == 16 and is_tailnet_v6(raw))
            if bad:
                names.add(str(rr.rname))
                continue
        elif rr.rtype == TYPE_SVCB or rr.rtype == TYPE_HTTPS:
            raw = _rdata_bytes(rr)
            if svcb_has_tailnet_hint(raw):
                names.add(str(rr.rname))
                cleaned = svcb_without_tailnet_hints(raw)
                if cleaned is None:
                    continue
                rr.rdata = RD(cleaned)
        kept.append(rr)
    return kept


def strip_tailnet_addresses(reply: bytes) -> tuple[bytes, tuple[str, ...]]:
    """`reply` without its tailnet addresses (answer and additional sections; see the module
    docstring) and the owner names they were removed from. The rcode stays: NOERROR with nothing
    left is NODATA. Re-encoded with dnslib: removing records in place would break compression."""
    msg = DNSRecord.parse(reply)
    names: set[str] = set()
    msg.rr = _filter(msg.rr, names)
    msg.ar = _filter(msg.ar, names)
    msg.set_header_qa()
    return msg.pack(), tuple(sorted(names))
