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
from typing import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11

from .dispatch import Dispatch
from .doh import (MAX_QUERY, DohError, DohRequest, HttpStatus, check_head, dns_query, error_headers,
                  response_headers)
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


class _Http2:
    """HTTP/2 framing with h2; streams are requests, answered in completion order."""

    def __init__(self, conn: DohConnection) -> None:
        self.conn = conn
        # Outbound headers are ours (validated by construction); inbound ones are still checked.
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8",
                                           validate_outbound_headers=False, normalize_outbound_headers=False)
        self.h2 = h2.connection.H2Connection(config)
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
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY saying why; send it and end the connection.
            self.conn.stats.protocol_errors += 1
            log.debug("doh: HTTP/2 protocol error from %s: %s", self.conn.host, exc)
            self.flush()
            self.conn.transport.close()
            return
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self._request(ev.stream_id, ev.headers or [])
            elif isinstance(ev, h2.events.DataReceived):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                entry = self.requests.get(ev.stream_id)
                if entry is not None:
                    entry[1].extend(ev.data or b"")
                    if len(entry[1]) > MAX_QUERY:
                        self.requests.pop(ev.stream_id, None)
                        self._error(ev.stream_id, DohError(HttpStatus.PAYLOAD_TOO_LARGE, "body too large"))
            elif isinstance(ev, h2.events.StreamEnded):
                entry = self.requests.pop(ev.stream_id, None)
                if entry is not None:
                    self._complete(ev.stream_id, *entry)
            elif isinstance(ev, h2.events.StreamReset):
                self.requests.pop(ev.stream_id, None)
                self.outbox.pop(ev.stream_id, None)
            elif isinstance(ev, h2.events.WindowUpdated):
                for sid in list(self.outbox):
                    self._send_body(sid)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.flush()
                self.conn.transport.close()
                return
        self.flush()

    def _request(self, sid: int, headers: list) -> None:
        h = {}
        for name, value in headers:
            h[name if isinstance(name, str) else name.decode("latin-1")] = (
                value if isinstance(value, str) else value.decode("latin-1"))
        length = h.get("content-length")
        req = DohRequest(h.get(":method", ""), h.get(":path", ""), h.get("content-type"),
                         int(length) if length and length.isdigit() else None)
        try:
            check_head(req)
        except DohError as exc:
            self._error(sid, exc)
            return
        self.requests[sid] = (req, bytearray())

    def _complete(self, sid: int, req: DohRequest, body: bytearray) -> None:
        try:
            query = dns_query(req, bytes(body))
        except DohError as exc:
            self._error(sid, exc)
            return
        self.conn.resolve(query, lambda reply: self._respond(sid, reply), lambda exc: self._error(sid, exc))

    def _respond(self, sid: int, reply: bytes) -> None:
        self._send(sid, 200, response_headers(reply), reply)
        self.flush()

    def _error(self, sid: int, exc: DohError) -> None:
        self.conn.stats.errors += 1
        body = (exc.message + "\n").encode()
        self._send(sid, int(exc.status), error_headers(body), body)

    def _send(self, sid: int, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        try:
            self.h2.send_headers(sid, [(":status", str(status))] + headers)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
            return  # the client reset the stream (or went away) while we were answering
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
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, KeyError):
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
                                      hdrs.get("content-type"), int(length) if length and length.isdigit() else None)
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
            query = dns_query(req, bytes(self.body))
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

    def _write(self, status: int, headers: list[tuple[str, str]], body: bytes, close: bool) -> None:
        conn = self.conn
        if close:
            headers = headers + [("connection", "close")]
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
