"""Encrypted upstreams: DNS over TLS (RFC 7858) and DNS over HTTPS (RFC 8484, HTTP/2) to forward to.

One connection per upstream, reused, with many queries in flight on it: DoT pipelines
length-prefixed messages (each gets an ID unique on the connection, the caller's restored on the
reply), DoH multiplexes HTTP/2 streams (libnghttp2, through ngh2,
as the DoH listener does). A connection that fails fails the queries on it, and the
next query opens a new one; the forwarder's race (forward.py) moves on to the next upstream within
its deadline.

Certificates are verified against the upstream's NAME (`tls://NAME@IP`) with the system trust store
(OpenSSL's default paths, so SSL_CERT_FILE and SSL_CERT_DIR are honoured) plus extra CAs (the tailnet
CA in a node, `--upstream-ca` standalone). A failed verification is never answered around: it fails
the attempt, the client gets SERVFAIL with an extended error, and the log says why once per cause.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import time
from typing import Iterable

import ngh2

from .publicdns import DOH_HEAD_START
from .ranges import RESOLVER_V4, RESOLVER_V6
from .stub import NameCache, StubError, StubResolver
from .upstream import Upstream

log = logging.getLogger("magicdns.upstream_tls")

CONNECT_TIMEOUT = 3.0
MAX_ADDRESSES = 4  # addresses of one upstream name tried per connection attempt (the race bounds the time)
SELF_ADDRESSES = frozenset((RESOLVER_V4, RESOLVER_V6))
LOG_EVERY = 60.0  # seconds between repeats of the same failure line for one upstream


class EncryptedUpstreamError(OSError):
    """A DoT/DoH exchange failed (connection, TLS, HTTP status); the message says which and why."""


def client_context(extra_ca_files: Iterable[str] = (), extra_ca_pems: Iterable[str] = (),
                   alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
    """A verifying TLS 1.2+ client context: the system store plus the given CAs."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for f in extra_ca_files:
        ctx.load_verify_locations(cafile=f)
    for pem in extra_ca_pems:
        if pem:
            ctx.load_verify_locations(cadata=pem)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out connecting"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or exc.__class__.__name__


class _DotConnection:
    """One pipelined DoT connection."""

    def __init__(self, up: Upstream, ctx: ssl.SSLContext) -> None:
        self.up = up
        self.ctx = ctx
        self.writer: asyncio.StreamWriter | None = None
        self.pending: dict[int, tuple[asyncio.Future[bytes], bytes]] = {}
        self.next_id = 0
        self.answered = 0
        self.dead = False
        self.reader_task: asyncio.Task[None] | None = None

    async def connect(self, host: str) -> None:
        reader, self.writer = await asyncio.wait_for(asyncio.open_connection(
            host, self.up.port, ssl=self.ctx, server_hostname=self.up.tls_name), CONNECT_TIMEOUT)
        self.reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                size = int.from_bytes(await reader.readexactly(2), "big")
                msg = await reader.readexactly(size)
                if size < 12:
                    continue
                entry = self.pending.pop(msg[0] << 8 | msg[1], None)
                if entry is not None and not entry[0].done():
                    entry[0].set_result(entry[1] + msg[2:])  # the caller's own ID back in front
        except (asyncio.IncompleteReadError, OSError, ssl.SSLError) as exc:
            self._fail(EncryptedUpstreamError(f"connection lost: {_why(exc) if not isinstance(exc, asyncio.IncompleteReadError) else 'closed by the server'}"))

    def _fail(self, exc: Exception) -> None:
        self.dead = True
        for fut, _ in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()
        if self.writer is not None:
            self.writer.close()

    async def query(self, wire: bytes) -> bytes:
        if len(self.pending) >= 65000:
            raise EncryptedUpstreamError("too many queries in flight on one connection")
        while self.next_id in self.pending:
            self.next_id = (self.next_id + 1) & 0xFFFF
        qid, self.next_id = self.next_id, (self.next_id + 1) & 0xFFFF
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[qid] = (fut, wire[:2])
        assert self.writer is not None
        self.writer.write(len(wire).to_bytes(2, "big") + qid.to_bytes(2, "big") + wire[2:])
        try:
            return await fut
        finally:
            if self.pending.get(qid, (None,))[0] is fut:
                del self.pending[qid]

    def close(self) -> None:
        self._fail(EncryptedUpstreamError("closed"))
        if self.reader_task is not None:
            self.reader_task.cancel()


class _DohConnection:
    """One HTTP/2 DoH connection: a stream per query. ngh2 (libnghttp2) does the framing, HPACK and
    flow control (receive credit goes back on its own as DATA is consumed)."""

    def __init__(self, up: Upstream, ctx: ssl.SSLContext) -> None:
        self.up = up
        self.ctx = ctx
        self.h2 = ngh2.Connection(ngh2.Role.CLIENT)
        self.writer: asyncio.StreamWriter | None = None
        # stream -> (the caller's future, the body so far, the :status once the head has arrived)
        self.streams: dict[int, tuple[asyncio.Future[bytes], bytearray, list[bytes]]] = {}
        self.answered = 0
        self.dead = False
        self.reader_task: asyncio.Task[None] | None = None

    async def connect(self, host: str) -> None:
        reader, self.writer = await asyncio.wait_for(asyncio.open_connection(
            host, self.up.port, ssl=self.ctx, server_hostname=self.up.tls_name), CONNECT_TIMEOUT)
        sslobj = self.writer.get_extra_info("ssl_object")
        if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
            self.writer.close()
            raise EncryptedUpstreamError("the server does not offer HTTP/2 (ALPN h2)")
        self.h2.initiate_connection({ngh2.Setting.ENABLE_PUSH: 0})
        self._flush()
        self.reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.writer is not None:
            self.writer.write(data)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise EncryptedUpstreamError("connection closed by the server")
                self.h2.receive_data(data)
                for ev in self.h2.events():
                    self._event(ev)
                if self.dead:
                    return
                self._flush()
        except (OSError, ssl.SSLError, ngh2.NGH2Error) as exc:
            self._fail(exc if isinstance(exc, EncryptedUpstreamError)
                       else EncryptedUpstreamError(f"connection lost: {_why(exc)}"))

    def _event(self, ev: object) -> None:
        if isinstance(ev, ngh2.ResponseReceived):
            entry = self.streams.get(ev.stream_id)
            if entry is not None:
                entry[2].append(dict(ev.headers).get(b":status", b""))  # type: ignore[arg-type]
                if ev.end_stream:
                    self._end(ev.stream_id)
        elif isinstance(ev, ngh2.DataReceived):
            entry = self.streams.get(ev.stream_id)
            if entry is not None:
                entry[1].extend(ev.data)
                if ev.end_stream:
                    self._end(ev.stream_id)
        elif isinstance(ev, ngh2.TrailersReceived):
            self._end(ev.stream_id)
        elif isinstance(ev, (ngh2.StreamReset, ngh2.StreamClosed)):
            # StreamClosed without an end seen first: nghttp2 refused what the server sent.
            entry = self.streams.pop(ev.stream_id, None)
            if entry is not None and not entry[0].done():
                entry[0].set_exception(EncryptedUpstreamError("stream reset by the server"))
        elif isinstance(ev, (ngh2.GoAwayReceived, ngh2.ConnectionClosed)):
            self._fail(EncryptedUpstreamError("the server ended the connection (GOAWAY)"))

    def _end(self, sid: int) -> None:
        entry = self.streams.pop(sid, None)
        if entry is not None and not entry[0].done():
            status = entry[2][0] if entry[2] else b"?"
            if status == b"200":
                entry[0].set_result(bytes(entry[1]))
            else:
                entry[0].set_exception(EncryptedUpstreamError(f"HTTP status {status.decode('latin-1')}"))

    def _fail(self, exc: Exception) -> None:
        self.dead = True
        for fut, _, _ in self.streams.values():
            if not fut.done():
                fut.set_exception(exc)
        self.streams.clear()
        if self.writer is not None:
            self.writer.close()

    async def query(self, wire: bytes) -> bytes:
        try:
            sid = self.h2.send_request([
                (b":method", b"POST"), (b":scheme", b"https"), (b":authority", self.up.tls_name.encode()),
                (b":path", (self.up.path or "/dns-query").encode()),
                (b"content-type", b"application/dns-message"), (b"accept", b"application/dns-message"),
                (b"content-length", b"%d" % len(wire))])
            self.h2.send_data(sid, wire, end_stream=True)
        except ngh2.NGH2Error as exc:
            raise EncryptedUpstreamError(f"HTTP/2: {_why(exc)}") from None
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.streams[sid] = (fut, bytearray(), [])
        self._flush()
        try:
            return await fut
        finally:
            if sid in self.streams and self.streams[sid][0] is fut:
                del self.streams[sid]
                try:
                    self.h2.reset_stream(sid)  # the race gave up on it: tell the server
                    self._flush()
                except ngh2.NGH2Error:
                    pass

    def close(self) -> None:
        self._fail(EncryptedUpstreamError("closed"))
        if self.reader_task is not None:
            self.reader_task.cancel()


def _question_end(wire: bytes) -> int:
    """Where the first question of `wire` ends (12 when it cannot be read: only the ID is checked)."""
    i = 12
    while i < len(wire):
        n = wire[i]
        if n == 0:
            return min(i + 5, len(wire))
        if n & 0xC0:
            return 12
        i += n + 1
    return 12


class _PlainReply(asyncio.DatagramProtocol):
    def __init__(self, sent_id: bytes, question: bytes, fut: asyncio.Future[bytes]) -> None:
        self.sent_id = sent_id
        self.question = question
        self.fut = fut

    def datagram_received(self, data: bytes, addr: object) -> None:
        if self.fut.done() or len(data) < 12 or data[:2] != self.sent_id or not data[2] & 0x80:
            return  # not our reply (a spoof needs the ID and the question): keep waiting
        if data[12:12 + len(self.question)] != self.question:
            return
        if data[2] & 0x02:
            self.fut.set_exception(EncryptedUpstreamError("plain DNS reply truncated"))  # DoH has no limit: leave it to DoH
            return
        self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(EncryptedUpstreamError(f"plain DNS: {_why(exc)}"))


async def plain_dns_query(host: str, port: int, wire: bytes) -> bytes:
    """One query over UDP to host:port with a fresh random ID (the caller's restored on the reply);
    replies with another ID or question are ignored. No timeout of its own: the caller's race has one."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()
    sent_id = secrets.token_bytes(2)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _PlainReply(sent_id, wire[12:_question_end(wire)], fut), remote_addr=(host, port))
    try:
        transport.sendto(sent_id + wire[2:])
        reply = await fut
    finally:
        transport.close()
    return wire[:2] + reply[2:]


class EncryptedUpstreams:
    """The connections to every encrypted upstream of one forwarder."""

    def __init__(self, extra_ca_files: Iterable[str] = (), extra_ca_pems: Iterable[str] = (),
                 names: NameCache | None = None) -> None:
        """`names` resolves upstreams given by name (`tls://NAME`); by default through the
        system's original resolvers (stub.StubResolver.from_system), never through ourselves."""
        files, pems = tuple(extra_ca_files), tuple(extra_ca_pems)
        self.names = names or NameCache(StubResolver.from_system)
        self._cas = (files, pems)
        self._contexts: dict[str, ssl.SSLContext] = {}
        if files or pems:
            self._context("tls")  # a CA file that does not load is an error at start, not at first query
            self._context("https")
        self.conns: dict[Upstream, _DotConnection | _DohConnection] = {}
        self._connecting: dict[Upstream, asyncio.Future[_DotConnection | _DohConnection]] = {}
        self._logged: dict[tuple[Upstream, str], float] = {}
        self.connects = 0
        self.head_start = DOH_HEAD_START
        self._demoted: dict[str, set[object]] = {}  # upstream name -> addresses to try last
        self.upgraded_doh_answers = 0  # upgraded public resolvers: which leg answered
        self.upgraded_plain_answers = 0

    async def _conn(self, up: Upstream) -> _DotConnection | _DohConnection:
        conn = self.conns.get(up)
        if conn is not None and not conn.dead:
            return conn
        waiting = self._connecting.get(up)
        if waiting is not None:
            return await asyncio.shield(waiting)
        fut: asyncio.Future[_DotConnection | _DohConnection] = asyncio.get_running_loop().create_future()
        self._connecting[up] = fut
        try:
            ctx = self._context(up.scheme)
            new: _DotConnection | _DohConnection = (_DotConnection(up, ctx) if up.scheme == "tls"
                                                    else _DohConnection(up, ctx))
            await self._connect(new, up)
            self.connects += 1
            self.conns[up] = new
            fut.set_result(new)
            return new
        except BaseException as exc:
            err = exc if isinstance(exc, EncryptedUpstreamError) else EncryptedUpstreamError(_why(exc))
            if not fut.done():
                fut.set_exception(err)
                fut.exception()  # retrieved: waiters get it, nobody else must
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise err from None
        finally:
            self._connecting.pop(up, None)

    def _context(self, scheme: str) -> ssl.SSLContext:
        """The client context of a scheme, made on first use: loading the system store takes ~0.1 s."""
        ctx = self._contexts.get(scheme)
        if ctx is None:
            ctx = self._contexts[scheme] = client_context(*self._cas, alpn=("dot",) if scheme == "tls" else ("h2",))
        return ctx

    async def _connect(self, conn: _DotConnection | _DohConnection, up: Upstream) -> None:
        """Connect to the upstream's address or, given by name, to its addresses in turn; when none
        takes the connection the name is re-resolved on the next attempt."""
        if up.host:
            await conn.connect(up.host)
            return
        try:
            addrs = await self.names.addresses(up.tls_name)
        except StubError as exc:
            raise EncryptedUpstreamError(str(exc)) from None
        tried = 0
        last: BaseException | None = None
        # Addresses that failed, or were still connecting when the race gave up, go last next time:
        # otherwise a dead first address (a broken IPv4 path) would use up every race's time and
        # the others would never be tried.
        demoted = self._demoted.setdefault(up.tls_name, set())
        for addr in sorted(addrs, key=lambda a: a in demoted):
            if addr in SELF_ADDRESSES:
                continue  # ourselves: a name must never make us forward to us
            if tried == MAX_ADDRESSES:
                break
            tried += 1
            try:
                await conn.connect(str(addr))
                demoted.discard(addr)
                return
            except ssl.SSLCertVerificationError:
                raise  # the name's certificate is wrong: another address of it will not fix that
            except (OSError, asyncio.TimeoutError) as exc:
                demoted.add(addr)
                last = exc
            except asyncio.CancelledError:
                demoted.add(addr)
                raise
        self.names.forget(up.tls_name)
        if last is None:
            raise EncryptedUpstreamError(f"{up.tls_name} has no address but ourselves ({', '.join(map(str, addrs))})")
        raise last

    async def query(self, up: Upstream, wire: bytes) -> bytes:
        """The upstream's reply to `wire`; raises `EncryptedUpstreamError` (see `_query`). A public
        resolver upgraded to DoH (`up.plain_behind`, publicdns.py) races plain DNS behind it."""
        if up.plain_behind:
            return await self._doh_then_plain(up, wire)
        return await self._query(up, wire)

    async def _doh_then_plain(self, up: Upstream, wire: bytes) -> bytes:
        """DoH alone for `head_start` seconds (or until it fails), then plain DNS to the original
        address as well; the first good reply wins and the other leg is cancelled."""
        loop = asyncio.get_running_loop()
        doh = loop.create_task(self._query(up, wire))
        plain: asyncio.Task[bytes] | None = None
        try:
            await asyncio.wait((doh,), timeout=self.head_start)
            if doh.done() and doh.exception() is None:
                self.upgraded_doh_answers += 1
                return doh.result()
            plain = loop.create_task(plain_dns_query(up.host, up.plain_behind, wire))
            pending: set[asyncio.Task[bytes]] = {t for t in (doh, plain) if not t.done()}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is None:
                        if task is doh:
                            self.upgraded_doh_answers += 1
                        else:
                            self.upgraded_plain_answers += 1
                        return task.result()
            raise EncryptedUpstreamError(f"DoH: {doh.exception()}; plain DNS behind it: {plain.exception()}")
        finally:
            for task in (doh, plain):
                if task is not None and not task.done():
                    task.cancel()

    def stats(self) -> dict[str, object]:
        return {"connections": len(self.conns), "connects": self.connects,
                "upgraded_doh_answers": self.upgraded_doh_answers,
                "upgraded_plain_answers": self.upgraded_plain_answers, "names": self.names.status()}

    async def _query(self, up: Upstream, wire: bytes) -> bytes:
        """The upstream's reply to `wire`; raises `EncryptedUpstreamError` (logged once a minute per cause).

        A kept connection the server closed while idle (servers time them out) is found out only by
        using it: a query that fails on a connection which had already answered is retried once on a
        fresh one, so an idle timeout never costs a client a SERVFAIL."""
        for attempt in (0, 1):
            conn = None
            try:
                conn = await self._conn(up)
                reply = await conn.query(wire)
                conn.answered += 1
                return reply
            except EncryptedUpstreamError as exc:
                if attempt == 0 and conn is not None and conn.answered and conn.dead:
                    continue
                self._log(up, str(exc))
                raise
        raise AssertionError("unreachable")

    def _log(self, up: Upstream, why: str) -> None:
        now = time.monotonic()
        key = (up, why)
        if now - self._logged.get(key, -LOG_EVERY) >= LOG_EVERY:
            self._logged[key] = now
            if len(self._logged) > 4096:
                self._logged.clear()
            log.debug("upstream %s: %s", up.spec, why)  # the race logs the health change once

    async def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()
        await self.names.close()
