"""The DoH listener's connections: HTTP/2 (h2) or HTTP/1.1 (h11) over TLS, chosen by ALPN.

Both libraries are sans-I/O state machines (bytes in, events out, bytes to send), from the same
authors, so this module stays the thin glue the house style asks for: feed what the socket read,
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

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11

from .dispatch import Dispatch
from .doh import (MAX_QUERY, DohError, DohRequest, HttpStatus, check_head, content_length, error_headers,
                  query_of, response_headers)
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
        HTTP request, unlike a datagram, must be answered."""
        self.arm()  # a complete request: only these keep a connection alive
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


# h2's own header checks and normalisation cost ~13% of a request's CPU (cProfile under dnsperf;
# see README, Encrypted DNS, Measured), and they guard what we do not do: we forward no header
# anywhere and read only four of them, as bytes, checking those ourselves (`_request`, doh.check_head).
# Outbound headers are ours, valid by construction. One configuration serves every connection.
_H2_CONFIG = h2.config.H2Configuration(
    client_side=False, header_encoding=None,
    validate_inbound_headers=False, normalize_inbound_headers=False,
    validate_outbound_headers=False, normalize_outbound_headers=False)

_RequestReceived = h2.events.RequestReceived
_DataReceived = h2.events.DataReceived
_StreamEnded = h2.events.StreamEnded
_StreamReset = h2.events.StreamReset
_WindowUpdated = h2.events.WindowUpdated
_ConnectionTerminated = h2.events.ConnectionTerminated
_SEND_ERRORS = (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError)
_STATUS_200 = (b":status", b"200")
_WANTED = {b":method": 0, b":path": 1, b"content-type": 2, b"content-length": 3}


class _Http2:
    """HTTP/2 framing with h2; streams are requests, answered in completion order.

    Each reply leaves in a TLS record of its own, even when one `data_received` brought many requests:
    coalescing them saves a little CPU, but dnsperf 2.10's DoH client takes one reply per TLS record
    and silently loses the others (and a benchmark that loses replies measures nothing)."""

    def __init__(self, conn: DohConnection) -> None:
        self.conn = conn
        self.h2 = h2.connection.H2Connection(_H2_CONFIG)
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            # RFC 9113 section 6.5.2 recommends at least 100: clients (nghttp2) queue above it.
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max(100, conn.limits.max_pipeline),
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_BYTES,
            h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.h2.initiate_connection()
        self.requests: dict[int, tuple[DohRequest, bytearray]] = {}
        self.outbox: dict[int, memoryview] = {}  # reply bytes waiting for flow-control window
        self.flush()

    def flush(self) -> None:
        self.conn.write(self.h2.data_to_send())

    def feed(self, data: bytes) -> None:
        conn = self.conn
        h2c = self.h2
        try:
            events = h2c.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY saying why; send it and end the connection.
            conn.stats.protocol_errors += 1
            log.debug("doh: HTTP/2 protocol error from %s: %s", conn.host, exc)
            self.flush()
            conn.transport.close()
            return
        for ev in events:
            cls = ev.__class__
            if cls is _RequestReceived:
                self._request(ev.stream_id, ev.headers or ())  # type: ignore[attr-defined]
            elif cls is _DataReceived:
                sid = ev.stream_id  # type: ignore[attr-defined]
                # Credit goes back at once, so the WINDOW_UPDATE leaves ahead of the reply.
                h2c.acknowledge_received_data(ev.flow_controlled_length, sid)  # type: ignore[attr-defined]
                entry = self.requests.get(sid)
                if entry is not None:
                    entry[1].extend(ev.data or b"")  # type: ignore[attr-defined]
                    if len(entry[1]) > MAX_QUERY:
                        del self.requests[sid]
                        self._error(sid, DohError(HttpStatus.PAYLOAD_TOO_LARGE, "body too large"))
            elif cls is _StreamEnded:
                entry = self.requests.pop(ev.stream_id, None)  # type: ignore[attr-defined]
                if entry is not None:
                    self._complete(ev.stream_id, *entry)  # type: ignore[attr-defined]
            elif cls is _StreamReset:
                self.requests.pop(ev.stream_id, None)  # type: ignore[attr-defined]
                self.outbox.pop(ev.stream_id, None)  # type: ignore[attr-defined]
            elif cls is _WindowUpdated:
                for sid in list(self.outbox):
                    self._send_body(sid)
            elif cls is _ConnectionTerminated:
                self.flush()
                conn.transport.close()
                return
        self.flush()

    def _request(self, sid: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        # Without h2's validation a header block may lack pseudo-headers, repeat them, or carry
        # uppercase names; the last value of each wanted name counts, and a missing method or path
        # fails check_head like any other unknown one.
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
            return
        self.requests[sid] = (req, bytearray())

    def _complete(self, sid: int, req: DohRequest, body: bytearray) -> None:
        try:
            query = query_of(req, bytes(body))
        except DohError as exc:
            self._error(sid, exc)
            return
        self.conn.resolve(query, lambda reply: self._respond(sid, reply), lambda exc: self._error(sid, exc))

    def _respond(self, sid: int, reply: bytes) -> None:
        headers = response_headers(reply)
        headers.insert(0, _STATUS_200)
        self._send(sid, headers, reply)
        self.flush()

    def _error(self, sid: int, exc: DohError) -> None:
        self.conn.stats.errors += 1
        body = (exc.message + "\n").encode()
        headers = error_headers(body)
        headers.insert(0, (b":status", b"%d" % exc.status))
        self._send(sid, headers, body)
        self.flush()

    def _send(self, sid: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        try:
            self.h2.send_headers(sid, headers)
        except _SEND_ERRORS:
            return  # the client reset the stream (or went away) while we were answering
        if len(body) <= self.h2.local_flow_control_window(sid) and len(body) <= self.h2.max_outbound_frame_size:
            try:  # the usual case: the whole reply fits in one DATA frame now
                self.h2.send_data(sid, body, end_stream=True)
            except _SEND_ERRORS:
                pass
            return
        self.outbox[sid] = memoryview(body)
        self._send_body(sid)

    def _send_body(self, sid: int) -> None:
        data = self.outbox.get(sid)
        if data is None:
            return
        try:
            while True:
                room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
                if room <= 0 and len(data):
                    self.outbox[sid] = data
                    return  # the rest goes when the client opens its window (WindowUpdated)
                chunk, data = data[:room], data[room:]
                self.h2.send_data(sid, bytes(chunk), end_stream=not len(data))
                if not len(data):
                    break
        except _SEND_ERRORS:
            pass
        self.outbox.pop(sid, None)


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
