"""The DoH listener's connections: HTTP/2 (ngh2, i.e. libnghttp2) or HTTP/1.1 (h11) over TLS, chosen by ALPN.

Both libraries are sans-I/O state machines (bytes in, events out, bytes to send), so this module
stays the thin glue the house style asks for: feed what the socket read,
act on the events, write what the state machine wants sent. The DNS side is `doh.py` plus the
shared `Dispatch`; the limits are the TCP listener's (tcp.py): connection slots in total and per
client, a complete request within the idle timeout, no reading from a client that does not read its
replies (and an abort once they have not moved for a whole timeout), and a cap on requests in
flight (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS; HTTP/1.1 answers one request at a time).
"""

from __future__ import annotations

import http
import logging
from typing import Callable, Iterable

import h11
import ngh2

from .dispatch import Dispatch
from .doh import (MAX_QUERY, DohError, DohRequest, HttpStatus, check_head, content_length, error_headers,
                  plain_get, query_of, response_headers)
from .tcp import GuardedConnection, TcpSlots

log = logging.getLogger("magicdns.doh")

MAX_HEADER_BYTES = 16 * 1024


class DohStats:
    __slots__ = ("queries", "http2", "http11", "errors", "protocol_errors")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


class DohConnection(GuardedConnection):
    """One DoH client connection (after the TLS handshake), under the TCP listener's limits."""

    def __init__(self, dispatch: Dispatch, slots: TcpSlots, stats: DohStats) -> None:
        super().__init__(dispatch, slots)
        self.stats = stats
        self.http: _Http2 | _Http11 | None = None
        self.busy = False  # HTTP/1.1: a request is being answered, do not read the next one yet

    def held(self) -> bool:
        return self.busy

    def started(self) -> None:
        sslobj = self.transport.get_extra_info("ssl_object")
        alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
        if alpn == "h2":
            self.stats.http2 += 1
            self.http = _Http2(self)
        else:  # "http/1.1", or a client that offered no ALPN at all
            self.stats.http11 += 1
            self.http = _Http11(self)

    def stopped(self) -> None:
        self.http = None

    def data_received(self, data: bytes) -> None:
        if self.http is not None:
            self.http.feed(data)

    def write(self, data: bytes) -> None:
        if data and self.open and not self.transport.is_closing():
            self.transport.write(data)

    # -- DNS ------------------------------------------------------------------------------------

    def resolve(self, query: bytes, respond: Callable[[bytes], None], refuse: Callable[[DohError], None]) -> None:
        """Answer one DNS query through the shared Dispatch; `respond` gets the reply (now or later).
        A query the DNS layer drops (unreadable: no header) gets an HTTP 400 through `refuse`, since an
        HTTP request, unlike a datagram, must be answered. The caller re-arms the idle timer (`arm`):
        a complete request is what keeps a connection alive."""
        self.stats.queries += 1
        dispatch = self.dispatch
        dispatch.counters.tcp += 1
        result = dispatch.answer(query, True)
        if result.__class__ is bytes:
            if dispatch.qlog is not None:
                dispatch.qlog.write(self.host, query, result, "local")  # type: ignore[arg-type]
            respond(result)  # type: ignore[arg-type]
            return
        if result is None:
            refuse(DohError(HttpStatus.BAD_REQUEST, "not a DNS query"))
            return

        def later(reply: bytes) -> None:
            self.pending -= 1
            if self.open:
                respond(reply)

        self.pending += 1
        dispatch.forward(result, query, self.host, later, True)  # type: ignore[arg-type]


# The HTTP/2 framing is libnghttp2's, through ngh2 (pinned: ngh2 is alpha and its API may change).
# nghttp2 checks every header block itself (RFC 9113 section 8.2: lowercase names, pseudo-headers
# present once and first, no connection-specific fields, content-length against the body) and resets
# a stream that breaks a rule, so a malformed request costs its stream, never the connection; the
# four headers we read are still checked by us (`_request`, doh.check_head), as bytes. It also keeps
# the flow-control books: replies wait inside it for the client's window, and received DATA is
# credited back as it is consumed. One configuration serves every connection.
_NGH2_CONFIG = ngh2.Configuration(max_inbound_header_list_size=MAX_HEADER_BYTES, max_inbound_header_count=100)
_ERRORS = ngh2.NGH2Error
_DenialOfService = ngh2.DenialOfServiceError
_PROTOCOL_ERROR = int(ngh2.ErrorCode.PROTOCOL_ERROR)
_ENHANCE_YOUR_CALM = int(ngh2.ErrorCode.ENHANCE_YOUR_CALM)


def _goaway_frame(last_sid: int, code: int) -> bytes:
    """A GOAWAY frame (RFC 9113 section 6.8): length 8, type 7, no flags, stream 0."""
    header = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"
    return header + (last_sid & 0x7FFFFFFF).to_bytes(4, "big") + code.to_bytes(4, "big")


_RequestReceived = ngh2.RequestReceived
_DataReceived = ngh2.DataReceived
_TrailersReceived = ngh2.TrailersReceived
_StreamReset = ngh2.StreamReset
_StreamClosed = ngh2.StreamClosed
_ConnectionClosed = ngh2.ConnectionClosed
_STATUS_200 = (b":status", b"200")
_WANTED = {b":method": 0, b":path": 1, b"content-type": 2, b"content-length": 3}


def _plain_get(headers: tuple[tuple[bytes, bytes], ...]) -> bytes | None:
    """The query of a bodiless `GET /dns-query?dns=<bare base64url>` (what DoH clients send), or None
    for anything else, which takes the general path (`_request`, check_head, query_of) to the same
    answer. nghttp2 has already refused a block with a repeated or missing pseudo-header."""
    method = path = None
    for name, value in headers:
        if name == b":method":
            method = value
        elif name == b":path":
            path = value
    if method != b"GET" or path is None:
        return None
    return plain_get(path)


class _Http2:
    """HTTP/2 framing with ngh2 (libnghttp2); streams are requests, answered in completion order.

    Batched: the events of one `data_received` are taken in one call, and every reply made while
    handling them (local answers, 4xx) leaves in one write, so in one TLS record with the control
    frames (SETTINGS and PING acks, WINDOW_UPDATEs). One record per reply cost more than nghttp2
    itself: 23.5 -> 10.9 us of CPU per request (h2load, 16 x 10 streams; README, "Measured").
    Replies that come later (forwarded queries) leave as they come. dnsperf 2.10's DoH client takes
    one reply per TLS record and loses the others, as it does against dnsdist (h2o packs replies the
    same way); bench/encdns.sh measures DoH with h2load for that reason."""

    def __init__(self, conn: DohConnection) -> None:
        self.conn = conn
        self.h2 = ngh2.Connection(ngh2.Role.SERVER, _NGH2_CONFIG)
        self.h2.initiate_connection({
            # RFC 9113 section 6.5.2 recommends at least 100: clients (nghttp2) queue above it.
            ngh2.Setting.MAX_CONCURRENT_STREAMS: max(100, conn.limits.max_pipeline),
            ngh2.Setting.MAX_HEADER_LIST_SIZE: MAX_HEADER_BYTES,
            ngh2.Setting.ENABLE_PUSH: 0})
        self.requests: dict[int, tuple[DohRequest, bytearray]] = {}
        self.last_sid = 0  # the last stream that reached us, for a GOAWAY of our own
        self.feeding = False  # replies made while True leave together at the end of feed()
        self.fresh = False  # a complete request arrived in this read
        self.flush()

    def flush(self) -> None:
        conn = self.conn
        h2c = self.h2
        data = h2c.data_to_send()
        if data:
            conn.write(data)
        if not h2c.want_read and not h2c.want_write and conn.open:
            # nghttp2 is done with the connection: a GOAWAY was sent (a protocol error; the frame
            # above says why) or received, and no stream is left to finish.
            conn.transport.close()

    def feed(self, data: bytes) -> None:
        conn = self.conn
        h2c = self.h2
        try:
            h2c.receive_data(data)
        except _ERRORS as exc:
            conn.stats.protocol_errors += 1
            log.debug("doh: HTTP/2 protocol error from %s: %s", conn.host, exc)
            self._goaway(_ENHANCE_YOUR_CALM if isinstance(exc, _DenialOfService) else _PROTOCOL_ERROR)
            return
        requests = self.requests
        self.feeding = True
        for ev in h2c.events():
            cls = ev.__class__
            if cls is _RequestReceived:
                sid = self.last_sid = ev.stream_id  # type: ignore[attr-defined]
                headers = ev.headers  # type: ignore[attr-defined]
                if ev.end_stream:  # type: ignore[attr-defined]
                    query = _plain_get(headers)
                    if query is not None:  # what every DoH client sends: no DohRequest needed
                        self._resolve(sid, query)
                        continue
                if self._request(sid, headers) and ev.end_stream:  # type: ignore[attr-defined]
                    self._complete(sid, *requests.pop(sid))
            elif cls is _DataReceived:
                sid = ev.stream_id  # type: ignore[attr-defined]
                entry = requests.get(sid)
                if entry is None:
                    continue  # a stream already answered (4xx, 413): its remaining body is dropped
                body = entry[1]
                body += ev.data  # type: ignore[attr-defined]
                if len(body) > MAX_QUERY:
                    del requests[sid]
                    self._error(sid, DohError(HttpStatus.PAYLOAD_TOO_LARGE, "body too large"))
                elif ev.end_stream:  # type: ignore[attr-defined]
                    del requests[sid]
                    self._complete(sid, *entry)
            elif cls is _TrailersReceived:
                entry = requests.pop(ev.stream_id, None)  # type: ignore[attr-defined]
                if entry is not None:
                    self._complete(ev.stream_id, *entry)  # type: ignore[attr-defined]
            elif cls is _StreamReset or cls is _StreamClosed:
                requests.pop(ev.stream_id, None)  # type: ignore[attr-defined]
            elif cls is _ConnectionClosed:
                conn.stats.protocol_errors += 1
                self.feeding = False
                self._goaway(_PROTOCOL_ERROR)
                return
        self.feeding = False
        if self.fresh:  # complete requests came: re-arm the idle timer once per read, not per request
            self.fresh = False
            conn.arm()
        self.flush()

    def _goaway(self, code: int) -> None:
        """Send what nghttp2 has queued (its GOAWAY says why) and end the connection. ngh2 gives up
        on a connection over a resource limit (a header list past MAX_HEADER_BYTES, a CONTINUATION
        flood: DenialOfServiceError) without queuing anything, so the GOAWAY is then ours."""
        conn = self.conn
        try:
            data = self.h2.data_to_send()
        except _ERRORS:  # ConnectionStateError: "no longer usable"
            data = b""
        if not data:
            data = _goaway_frame(self.last_sid, code)
        conn.write(data)
        self.requests.clear()
        conn.transport.close()

    def _request(self, sid: int, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        # nghttp2 has checked the block's form (pseudo-headers once, lowercase names); what the
        # four values mean is ours to check. A missing method or path fails check_head.
        got: list[bytes | None] = [None, None, None, None]
        wanted = _WANTED
        for name, value in headers:
            i = wanted.get(name)  # type: ignore[call-overload]
            if i is not None:
                got[i] = value
        method, path, ctype, length = (None if v is None else v.decode("latin-1") for v in got)
        req = DohRequest(method or "", path or "", ctype, content_length(length))
        try:
            check_head(req)
        except DohError as exc:
            self._error(sid, exc)
            return False
        self.requests[sid] = (req, bytearray())
        return True

    def _complete(self, sid: int, req: DohRequest, body: bytearray) -> None:
        try:
            query = query_of(req, bytes(body))
        except DohError as exc:
            self._error(sid, exc)
            return
        self._resolve(sid, query)

    def _resolve(self, sid: int, query: bytes) -> None:
        self.fresh = True
        self.conn.resolve(query, lambda reply: self._respond(sid, reply), lambda exc: self._error(sid, exc))

    def _respond(self, sid: int, reply: bytes) -> None:
        headers = response_headers(reply)
        headers.insert(0, _STATUS_200)
        self._send(sid, headers, reply)

    def _error(self, sid: int, exc: DohError) -> None:
        self.conn.stats.errors += 1
        body = (exc.message + "\n").encode()
        headers = error_headers(body)
        headers.insert(0, (b":status", b"%d" % exc.status))
        self._send(sid, headers, body)

    def _send(self, sid: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        h2c = self.h2
        try:
            h2c.send_response(sid, headers)
            # nghttp2 holds what the client's window does not take yet and sends it as credit arrives.
            h2c.send_data(sid, body, end_stream=True)
        except _ERRORS:
            return  # the client reset the stream (or the connection is going away) while we answered
        if not self.feeding and self.conn.open:
            self.flush()


class _Http11:
    """HTTP/1.1 with h11: one request at a time (keep-alive); reading pauses while one is answered."""

    def __init__(self, conn: DohConnection) -> None:
        self.conn = conn
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self.req: DohRequest | None = None
        self.body = bytearray()
        self.failed: DohError | None = None

    def feed(self, data: bytes) -> None:
        try:
            self.h11.receive_data(data)
        except RuntimeError:  # data after the client closed: nothing to do
            return
        self._step()

    def _step(self) -> None:
        while not self.conn.busy and self.conn.open:
            try:
                ev = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                self.conn.stats.protocol_errors += 1
                self._finish(DohError(HttpStatus.BAD_REQUEST, f"bad HTTP request: {exc}"), close=True)
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, h11.Request):
                hdrs = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in ev.headers}
                length = hdrs.get("content-length")
                self.req = DohRequest(ev.method.decode("latin-1"), ev.target.decode("latin-1"),
                                      hdrs.get("content-type"), content_length(length))
                self.body.clear()
                self.failed = None
                try:
                    check_head(self.req)
                except DohError as exc:
                    self.failed = exc
            elif isinstance(ev, h11.Data):
                if self.failed is None:
                    self.body += ev.data
                    if len(self.body) > MAX_QUERY:
                        self.failed = DohError(HttpStatus.PAYLOAD_TOO_LARGE, "body too large")
            elif isinstance(ev, h11.EndOfMessage):
                self._complete()
            elif isinstance(ev, h11.ConnectionClosed):
                self.conn.transport.close()
                return

    def _complete(self) -> None:
        req, self.req = self.req, None
        if self.failed is not None or req is None:
            self._finish(self.failed or DohError(HttpStatus.BAD_REQUEST, "no request"))
            return
        try:
            query = query_of(req, bytes(self.body))
        except DohError as exc:
            self._finish(exc)
            return
        self.conn.busy = True
        self.conn.update_reading()
        self.conn.arm()
        self.conn.resolve(query, self._respond, self._finish)

    def _respond(self, reply: bytes) -> None:
        self._write(200, response_headers(reply), reply, close=False)

    def _finish(self, exc: DohError, close: bool = False) -> None:
        self.conn.stats.errors += 1
        body = (exc.message + "\n").encode()
        self._write(int(exc.status), error_headers(body), body, close)

    def _write(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, close: bool) -> None:
        conn = self.conn
        if close:
            headers = headers + [(b"connection", b"close")]
        try:
            out = self.h11.send(h11.Response(status_code=status, headers=headers,
                                             reason=http.HTTPStatus(status).phrase.encode()))
            out += self.h11.send(h11.Data(data=body)) + self.h11.send(h11.EndOfMessage())  # type: ignore[operator]
        except h11.LocalProtocolError:
            conn.transport.close()  # the request was too broken to answer (e.g. no request line)
            return
        conn.write(out)  # type: ignore[arg-type]
        if close or self.h11.our_state is h11.MUST_CLOSE:
            conn.transport.close()
            return
        try:
            self.h11.start_next_cycle()
        except h11.LocalProtocolError:
            conn.transport.close()
            return
        conn.busy = False
        conn.update_reading()
        self._step()
