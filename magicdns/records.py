"""Admin-defined DNS records: one validated value type shared by the view, the store and the CLI."""

from __future__ import annotations

import ipaddress
import shlex
from dataclasses import dataclass, field
from typing import Any

from dnslib import QTYPE, RR, TXT, DNSError
from dnslib.label import DNSBuffer

from .names import NameError_, absolute_owner, absolute_target

SUPPORTED_TYPES = ("A", "AAAA", "CNAME", "TXT", "SRV", "MX", "CAA", "PTR")
# Types that replace a node's addresses when owned by the node's name: allowed only with `override`.
SHADOWING_TYPES = frozenset(("A", "AAAA", "CNAME"))
DEFAULT_TTL = 300
MAX_TTL = 2**31 - 1  # RFC 2181 section 8

# Which whitespace-separated field of the value holds a domain name, per type.
_NAME_FIELD = {"CNAME": 0, "PTR": 0, "MX": 1, "SRV": 3}
_FIELD_COUNT = {"A": 1, "AAAA": 1, "CNAME": 1, "PTR": 1, "MX": 2, "SRV": 4}


class RecordError(ValueError):
    """A record that cannot be stored or served; the message names the field at fault."""


@dataclass(frozen=True, slots=True)
class Record:
    """One resource record: absolute lowercase owner, type, canonical presentation value, TTL.

    `override` lets an admin record shadow a node name of the same owner (DESIGN.md section 3).
    `rdata` is the parsed dnslib rdata (never mutated after parsing).
    """

    name: str
    rtype: str
    value: str
    ttl: int = DEFAULT_TTL
    override: bool = False
    rdata: Any = field(default=None, compare=False, hash=False, repr=False)

    @property
    def qtype(self) -> int:
        return getattr(QTYPE, self.rtype)

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity of a record in the store: (name, type, value)."""
        return (self.name, self.rtype, self.value)

    def to_json(self) -> dict[str, Any]:
        # The trailing dot keeps the name absolute when read back: without it a name outside the
        # tailnet domain ('wiki.corp.example') would be taken as relative to it.
        out: dict[str, Any] = {"name": self.name + ".", "type": self.rtype, "value": self.value, "ttl": self.ttl}
        if self.override:
            out["override"] = True
        return out


def _parse_ttl(ttl: Any) -> int:
    if ttl is None or ttl == "":
        return DEFAULT_TTL
    if isinstance(ttl, bool):
        raise RecordError(f"TTL {ttl!r} is not a number")
    try:
        value = int(str(ttl), 10)
    except ValueError:
        raise RecordError(f"TTL {ttl!r} is not a whole number of seconds") from None
    if not 0 <= value <= MAX_TTL:
        raise RecordError(f"TTL {value} is out of range 0-{MAX_TTL}")
    return value


def _canonical_value(rtype: str, value: str, domain: str) -> str:
    """Expand relative names and check the field count; TXT and CAA keep their quoting."""
    text = value.strip()
    if not text:
        raise RecordError(f"{rtype} needs a value")
    if rtype == "A":
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise RecordError(f"A value {value!r} is not an IPv4 address") from None
    if rtype == "AAAA":
        try:
            return str(ipaddress.IPv6Address(text))
        except ValueError:
            raise RecordError(f"AAAA value {value!r} is not an IPv6 address") from None
    if rtype in _NAME_FIELD:
        fields = text.split()
        if len(fields) != _FIELD_COUNT[rtype]:
            raise RecordError(f"{rtype} value {value!r} needs {_FIELD_COUNT[rtype]} field(s)")
        for i, f in enumerate(fields[:_NAME_FIELD[rtype]]):
            if not f.isdigit() or int(f) > 65535:
                raise RecordError(f"{rtype} value {value!r}: field {i + 1} must be a number 0-65535")
        try:
            target = absolute_target(fields[_NAME_FIELD[rtype]], domain)
        except NameError_ as exc:
            raise RecordError(f"{rtype} target: {exc}") from None
        fields[_NAME_FIELD[rtype]] = target + "."
        return " ".join(fields)
    if rtype == "TXT":
        return " ".join('"' + escape_character_string(p) + '"' for p in txt_strings(text))
    if rtype == "CAA":
        try:
            parts = shlex.split(text)
        except ValueError as exc:
            raise RecordError(f"CAA value {value!r}: {exc}") from None
        if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) > 255:
            raise RecordError(f"CAA value {value!r} must be 'FLAGS TAG \"VALUE\"'")
        if parts[1].lower() not in ("issue", "issuewild", "iodef") and not parts[1].isalnum():
            raise RecordError(f"CAA tag {parts[1]!r} is not valid")
        return f'{int(parts[0])} {parts[1].lower()} "{parts[2]}"'
    raise RecordError(f"type {rtype!r} is not supported")


def txt_strings(text: str) -> list[bytes]:
    """The character-strings of a TXT value: RFC 1035 5.1 presentation format when it holds a quote
    (quoted strings and bare words, backslash escapes `\\X` and `\\DDD`), else the whole text as one
    string, as a user typing `records add web TXT hello world` means it. Each string at most 255 octets."""
    if '"' not in text:
        parts = [text.encode()]
    else:
        parts = _presentation_strings(text)
    for p in parts:
        if len(p) > 255:
            raise RecordError("TXT strings are at most 255 bytes each; split the value into quoted strings")
    return parts


def _presentation_strings(text: str) -> list[bytes]:
    parts: list[bytes] = []
    i, n = 0, len(text)
    while i < n:
        if text[i].isspace():
            i += 1
            continue
        quoted = text[i] == '"'
        if quoted:
            i += 1
        out = bytearray()
        while True:
            if i >= n:
                if quoted:
                    raise RecordError(f"TXT value {text!r}: a quoted string is not closed")
                break
            ch = text[i]
            if quoted and ch == '"':
                i += 1
                break
            if not quoted and (ch.isspace() or ch == '"'):
                break
            if ch == "\\":
                if text[i + 1:i + 4].isdigit() and len(text[i + 1:i + 4]) == 3:
                    value = int(text[i + 1:i + 4])
                    if value > 255:
                        raise RecordError(f"TXT value {text!r}: \\{text[i + 1:i + 4]} is not a byte")
                    out.append(value)
                    i += 4
                    continue
                if i + 1 >= n:
                    raise RecordError(f"TXT value {text!r} ends in a lone backslash")
                out += text[i + 1].encode()
                i += 2
                continue
            out += ch.encode()
            i += 1
        parts.append(bytes(out))
    return parts


def escape_character_string(data: bytes) -> str:
    """One character-string in presentation format, without the quotes: quote and backslash
    escaped, bytes that are not printable text (newlines, control bytes, invalid UTF-8) as `\\DDD`,
    so the value stays on one line and reads back to exactly these bytes."""
    out = []
    for ch in data.decode("utf-8", "surrogateescape"):
        if ch in '"\\':
            out.append("\\" + ch)
        elif "\udc80" <= ch <= "\udcff":
            out.append(f"\\{ord(ch) - 0xDC00:03d}")
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\{b:03d}" for b in ch.encode())
    return "".join(out)


def parse_record(name: str, rtype: str, value: str, ttl: Any = None, domain: str = "tailnet",
                 override: bool = False) -> Record:
    """Validate one record as a user typed it; raises `RecordError` with a clear reason."""
    rtype_u = rtype.strip().upper()
    if rtype_u not in SUPPORTED_TYPES:
        raise RecordError(f"type {rtype!r} is not supported (use one of {', '.join(SUPPORTED_TYPES)})")
    try:
        owner = absolute_owner(name, domain)
    except NameError_ as exc:
        raise RecordError(f"name: {exc}") from None
    ttl_v = _parse_ttl(ttl)
    canon = _canonical_value(rtype_u, value, domain)
    if rtype_u == "TXT":  # dnslib's zone parser knows no \\DDD: build the rdata from the strings
        return Record(owner, rtype_u, canon, ttl_v, override, TXT(_presentation_strings(canon)))
    try:
        rrs = RR.fromZone(f"{owner}. {ttl_v} IN {rtype_u} {canon}")
    except (DNSError, ValueError, IndexError, TypeError, KeyError, AttributeError) as exc:
        raise RecordError(f"{rtype_u} value {value!r} is not valid: {exc}") from None
    if len(rrs) != 1 or rrs[0].rtype != getattr(QTYPE, rtype_u):
        raise RecordError(f"{rtype_u} value {value!r} is not one record")
    rdata = rrs[0].rdata
    try:
        rdata.pack(DNSBuffer())
    except Exception as exc:  # dnslib raises a zoo of types on unpackable data
        raise RecordError(f"{rtype_u} value {value!r} cannot be encoded: {exc}") from None
    return Record(owner, rtype_u, canon, ttl_v, override, rdata)
