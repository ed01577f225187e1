"""DoH (RFC 8484) served by granian: HTTP/1.1 and HTTP/2 and TLS in Rust (hyper, tokio, rustls),
the DNS in Python on the resolver's own loop.

SPIKE (issue 12), kept under bench/ with the scripts that measure it: this module measures whether a compiled HTTP stack closes the gap to dnsdist that
the pure-Python h2 listener (dohserver.py) leaves; bench/encdns.sh runs it (ENCDNS_BENCH_GRANIAN=1)
through bench/doh_granian_serve.py. It is not wired into `magicdns serve` or the node: granian
accepts and handshakes every client itself, so the allow-list can only answer 403 per request, and
it has no per-client connection slots and no handshake deadline (README, "DoH on granian").

granian runs its HTTP side on tokio threads of its own and hands every complete request to the
asyncio loop (`call_soon_threadsafe`), where `DohApp` parses it with doh.py and answers it through
the same `Dispatch` as every other listener. The listening socket is ours (bound here, so port 0 and
IPv6 work as elsewhere), passed to granian's RSGI worker by descriptor.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass
from typing import Any

from granian._futures import _future_watcher_wrapper, _new_cbscheduler  # noqa: PLC2701 (no public embed API for a socket of ours)
from granian._granian import RSGIWorker, SocketHolder, WorkerSignal
from granian.http import HTTP1Settings, HTTP2Settings
from granian.rsgi import ProtocolClosed

from magicdns.dispatch import Dispatch
from magicdns.doh import (MAX_QUERY, DohError, DohRequest, HttpStatus, check_head, content_length, min_ttl,
                  plain_get_query, query_of)

log = logging.getLogger("magicdns.doh")

_CT = "content-type"
# The headers of a 200 per max-age (granian copies them; the list is never changed): few distinct TTLs.
_OK_HEADERS: dict[int, list[tuple[str, str]]] = {}
DRAIN_LIMIT = 4 * MAX_QUERY  # most of a refused HTTP/1.1 body read (and dropped) before the error
_DNS_TYPE = "application/dns-message"


class DohApp:
    """The RSGI application: one DoH request in, one HTTP response out."""

    def __init__(self, dispatch: Dispatch) -> None:
        self.dispatch = dispatch
        self.queries = 0
        self.errors = 0

    async def __call__(self, scope: Any, proto: Any) -> None:
        host = scope.client.rsplit(":", 1)[0].strip("[]")
        dispatch = self.dispatch
        if not dispatch.client_allowed(host):
            await self._refuse(scope, proto, DohError(HttpStatus.FORBIDDEN, "client not allowed"), False)
            return
        method = scope.method
        qs = scope.query_string
        if method == "GET":
            query = plain_get_query(scope.path, qs)  # the common request, without the general parse
            if query is not None:
                await self._answer(host, query, proto)
                return
        target = scope.path + "?" + qs if qs else scope.path
        if method == "GET":
            req = DohRequest(method, target, None, None)
        else:
            hdrs = scope.headers
            req = DohRequest(method, target, hdrs.get(_CT), content_length(hdrs.get("content-length")))
        read = method == "GET"  # the whole request is in; a body-carrying one is not yet
        try:
            check_head(req)
            body = b""
            if method == "POST":
                # Chunk by chunk, not `await proto()`: a body without Content-Length that grows past
                # the largest DNS message gets its 413 as soon as it is too long, never buffered on.
                buf = bytearray()
                try:
                    async for chunk in proto:
                        buf += chunk
                        if len(buf) > MAX_QUERY:
                            raise DohError(HttpStatus.PAYLOAD_TOO_LARGE, "body too large")
                except ProtocolClosed:
                    return  # the client went away (or reset the stream) before its body arrived
                read = True
                body = bytes(buf)
            query = query_of(req, body)
        except DohError as exc:
            await self._refuse(scope, proto, exc, read)
            return
        await self._answer(host, query, proto)

    async def _answer(self, host: str, query: bytes, proto: Any) -> None:
        dispatch = self.dispatch
        self.queries += 1
        dispatch.counters.tcp += 1
        result = dispatch.answer(query, True)
        if result.__class__ is bytes:
            if dispatch.qlog is not None:
                dispatch.qlog.write(host, query, result, "local")  # type: ignore[arg-type]
            reply = result
        elif result is None:
            self._error(proto, DohError(HttpStatus.BAD_REQUEST, "not a DNS query"))
            return
        else:
            fut = asyncio.get_running_loop().create_future()

            def done(r: bytes) -> None:
                if not fut.done():
                    fut.set_result(r)
            dispatch.forward(result, query, host, done, True)  # type: ignore[arg-type]
            reply = await fut
        ttl = min_ttl(reply)  # type: ignore[arg-type]
        headers = _OK_HEADERS.get(ttl)
        if headers is None:
            if len(_OK_HEADERS) >= 1024:
                _OK_HEADERS.clear()
            headers = _OK_HEADERS[ttl] = [(_CT, _DNS_TYPE), ("cache-control", "max-age=%d" % ttl)]
        proto.response_bytes(200, headers, reply)

    async def _refuse(self, scope: Any, proto: Any, exc: DohError, read: bool) -> None:
        """An error response. Over HTTP/1.1 the rest of an unread body is read first (up to
        `DRAIN_LIMIT`): hyper closes a connection whose request body is left unread, and a close with
        unread bytes is a TCP reset, which can destroy the error response before the client reads it."""
        if not read and scope.http_version.startswith("1"):
            drained = 0
            try:
                async for chunk in proto:
                    drained += len(chunk)
                    if drained > DRAIN_LIMIT:
                        break
            except ProtocolClosed:
                return
        self._error(proto, exc)

    def _error(self, proto: Any, exc: DohError) -> None:
        self.errors += 1
        proto.response_str(int(exc.status), [(_CT, "text/plain; charset=utf-8"), ("cache-control", "no-store")],
                           exc.message + "\n")


@dataclass
class GranianDoh:
    """One DoH listener: a socket of ours, a granian RSGI worker serving it on this loop."""

    app: DohApp
    sock: socket.socket
    cert_file: str
    key_file: str
    idle_timeout: float = 10.0
    max_streams: int = 100
    backpressure: int = 4096
    # granian's own task shortcut (impl_asyncio=False) runs the handler without an asyncio Task;
    # anything that asks for the current task (asyncio.timeout, wait_for) then fails.
    asyncio_tasks: bool = True

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.sig = WorkerSignal()
        self.stopped = loop.create_future()

        def on_stop() -> None:
            loop.call_soon_threadsafe(lambda: self.stopped.done() or self.stopped.set_result(None))
        self.sig.add_cb(on_stop)
        # granian's listener takes the descriptor over and closes it when it stops.
        holder = SocketHolder(self.sock.detach(), False, 1024)
        ms = int(self.idle_timeout * 1000)
        worker = RSGIWorker(
            1, (None, holder), None, 1, 512, 1, 30, self.backpressure, "auto",
            HTTP1Settings(header_read_timeout=ms, keep_alive=True),
            HTTP2Settings(max_concurrent_streams=self.max_streams, max_headers_size=16 * 1024,
                          keep_alive_interval=None),
            False, None,
            True, self.cert_file, self.key_file, None, "tls1.2", None, [], False,
            (None, None))
        cb = _future_watcher_wrapper(self.app)
        sched = _new_cbscheduler(loop, cb, impl_asyncio=self.asyncio_tasks)
        worker.serve_async(sched, loop, self.sig)
        self.worker = worker

    async def stop(self) -> None:
        self.sig.set()
        await self.stopped


def listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, port))
    s.listen(1024)
    s.setblocking(False)
    return s
