"""DNS over HTTPS (RFC 8484), the sans-I/O part: an HTTP request in, a DNS query or an HTTP error out;
a DNS reply in, the HTTP response headers out. The HTTP/1.1 and HTTP/2 framing around it is h11's and
libnghttp2's (ngh2), in dohserver.py.

- `GET /dns-query?dns=<base64url, no padding>` and `POST /dns-query` with
  `Content-Type: application/dns-message` (section 4.1); anything else is 404, 405 or 415.
- The reply is `200` with `application/dns-message` whatever the DNS rcode (section 4.2.1), and
  `Cache-Control: max-age=` the smallest TTL in the reply (section 5.1); 0 when it has no records.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from .cache import WireError, scan_message

PATH = "/dns-query"
CONTENT_TYPE = "application/dns-message"
MIN_QUERY = 12
MAX_QUERY = 65535
OPT = 41
MAX_TARGET = 2 * 65535  # base64 of the largest message, plus the path
_GET_PREFIX = PATH + "?dns="
# What every DoH client sends for GET: one dns= parameter of bare base64url. Anything else (more
# parameters, %-escapes, '+', a fragment) takes the general parse_qs path, with the same result.
_PLAIN_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")


class HttpStatus(enum.IntEnum):
    OK = 200
    BAD_REQUEST = 400
    FORBIDDEN = 403
    NOT_FOUND = 404
    METHOD_NOT_ALLOWED = 405
    PAYLOAD_TOO_LARGE = 413
    URI_TOO_LONG = 414
    UNSUPPORTED_MEDIA_TYPE = 415
    SERVICE_UNAVAILABLE = 503


class DohError(Exception):
    """A request that gets an HTTP error instead of a DNS answer."""

    def __init__(self, status: HttpStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class DohRequest:
    """The request line and the headers that matter, as HTTP/1.1 or HTTP/2 delivered them."""

    method: str
    target: str
    content_type: str | None
    content_length: int | None


def content_length(text: str | None) -> int | None:
    """A Content-Length header's value, or None when absent or not plain ASCII digits (str.isdigit
    alone accepts '²', which int() refuses)."""
    return int(text) if text and text.isascii() and text.isdigit() else None


def check_head(req: DohRequest) -> None:
    """Refuse early (before reading a body) what can be refused from the head alone."""
    target = req.target
    if len(target) > MAX_TARGET:
        raise DohError(HttpStatus.URI_TOO_LONG, "request target too long")
    # The common targets are recognised without urlsplit (a measurable share of a request's CPU).
    if target != PATH and not target.startswith(PATH + "?") and urlsplit(target).path != PATH:
        raise DohError(HttpStatus.NOT_FOUND, f"only {PATH} is served")
    if req.method not in ("GET", "POST"):
        raise DohError(HttpStatus.METHOD_NOT_ALLOWED, "use GET or POST")
    if req.method == "POST":
        ctype = (req.content_type or "").split(";", 1)[0].strip().lower()
        if ctype != CONTENT_TYPE:
            raise DohError(HttpStatus.UNSUPPORTED_MEDIA_TYPE, f"Content-Type must be {CONTENT_TYPE}")
        if req.content_length is not None and req.content_length > MAX_QUERY:
            raise DohError(HttpStatus.PAYLOAD_TOO_LARGE, "a DNS message is at most 65535 bytes")


def dns_query(req: DohRequest, body: bytes) -> bytes:
    """The DNS query the request carries; raises `DohError` with the status to answer."""
    check_head(req)
    return query_of(req, body)


def query_of(req: DohRequest, body: bytes) -> bytes:
    """`dns_query` for a request whose head `check_head` has already accepted (the server checks
    the head when it arrives, before the body, and need not check it twice)."""
    if req.method == "GET":
        target = req.target
        text = target[len(_GET_PREFIX):]
        if not (target.startswith(_GET_PREFIX) and _PLAIN_B64URL.fullmatch(text)):
            values = parse_qs(urlsplit(target).query, keep_blank_values=True).get("dns")
            if not values or len(values) != 1:
                raise DohError(HttpStatus.BAD_REQUEST, "GET needs exactly one dns= parameter")
            text = values[0]
        try:
            # RFC 8484 section 4.1: base64url without padding; padding is tolerated.
            query = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            raise DohError(HttpStatus.BAD_REQUEST, "dns= is not base64url") from None
    else:
        query = body
    if len(query) < MIN_QUERY:
        raise DohError(HttpStatus.BAD_REQUEST, "the DNS message is shorter than a header")
    if len(query) > MAX_QUERY:
        raise DohError(HttpStatus.PAYLOAD_TOO_LARGE, "a DNS message is at most 65535 bytes")
    return query


def plain_get(target: bytes) -> bytes | None:
    """The DNS query of `GET /dns-query?dns=<bare base64url>` (what every DoH client sends), from the
    request target as HTTP/2's `:path` carries it (bytes); None for anything else, which then takes
    `check_head` and `query_of` (the same answer for what this accepts: tests/unit/test_doh_core.py).
    binascii on bytes: half the CPU of base64.urlsafe_b64decode on a str."""
    if not target.startswith(_GET_PREFIX_B):
        return None
    text = target[len(_GET_PREFIX_B):]
    if not _PLAIN_B64URL_B.fullmatch(text):
        return None
    try:
        query = binascii.a2b_base64(text.translate(_URLSAFE_TO_STD) + b"=" * (-len(text) % 4))
    except binascii.Error:
        return None
    return query if MIN_QUERY <= len(query) <= MAX_QUERY else None


_GET_PREFIX_B = _GET_PREFIX.encode()
_PLAIN_B64URL_B = re.compile(rb"[A-Za-z0-9_-]*={0,2}")
_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


def min_ttl(reply: bytes) -> int:
    """The smallest TTL of the reply's records (OPT excluded); 0 when it has none or cannot be read."""
    key = reply[2:]  # all but the ID: the same answer to another client hits
    ttl = _TTL_MEMO.get(key)
    if ttl is None:
        ttl = _scan_min_ttl(reply)
        if len(_TTL_MEMO) >= _TTL_MEMO_SIZE:
            _TTL_MEMO.clear()  # crude but bounded; local answers refill it at once
        _TTL_MEMO[key] = ttl
    return ttl


# min_ttl is a pure function of the reply's bytes, and most DoH replies are the engine's memoised
# local answers: remembering it saves a message scan (~5% of a DoH request's CPU).
_TTL_MEMO: dict[bytes, int] = {}
_TTL_MEMO_SIZE = 4096


def _scan_min_ttl(reply: bytes) -> int:
    try:
        scan = scan_message(reply)
    except WireError:
        return 0
    ttls = [int.from_bytes(reply[r.ttl_off:r.ttl_off + 4], "big") for r in scan.records if r.rtype != OPT]
    return min(ttls) if ttls else 0


_OK_TYPE = (b"content-type", CONTENT_TYPE.encode())


def response_headers(reply: bytes) -> list[tuple[bytes, bytes]]:
    """Headers of a 200 response carrying `reply`, as bytes (ngh2 and h11 take bytes as they are;
    HTTP/2 needs names lowercase, HTTP/1.1 does not care)."""
    return [_OK_TYPE, (b"content-length", b"%d" % len(reply)), (b"cache-control", b"max-age=%d" % min_ttl(reply))]


def error_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store")]
