"""A UDP listener that moves datagrams in batches with recvmmsg/sendmmsg (Linux).

At 100k queries a second the cost that is left is one recvfrom and one sendto per query, in the
kernel and in the event loop's per-datagram machinery. Reading up to 64 datagrams with one
recvmmsg and answering them with one sendmmsg measured about 15-20% more queries per second on
one core. The message headers live in preallocated ctypes arrays, read and written through
memoryviews, so a datagram costs a slice and a few integer stores on top of the answer itself.

`BatchUdpListener.supported()` says whether this platform has the calls and the 64-bit layout the
offsets below assume; the server falls back to asyncio's datagram transport otherwise.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import socket
import time
from typing import Callable

from .dispatch import Backlog, Dispatch, LateReply

BATCH = 64
BUF_SIZE = 4096  # larger than any query we answer (EDNS clients send small queries)
HALF_BUF = BUF_SIZE // 2  # the buffers seen as 16-bit words: where each datagram starts
NAME_SIZE = 28  # sizeof(struct sockaddr_in6)
MSG_DONTWAIT = 0x40
MAX_ROUNDS = 8  # batches per readiness callback: bounded, so other work on the loop gets its turn
_monotonic = time.monotonic
_SCHEDSTAT = "/proc/thread-self/schedstat"


def _runnable_time() -> float:
    """Seconds the calling thread has run or waited to run (schedstat: run and wait ns). A loop that
    is runnable all the time is saturated even while other work takes part of its CPU, which its
    CPU time alone would hide (dispatch.Backlog.sample)."""
    fd = os.open(_SCHEDSTAT, os.O_RDONLY)
    try:
        run, wait = os.read(fd, 128).split()[:2]
    finally:
        os.close(fd)
    return (int(run) + int(wait)) / 1e9


try:
    _runnable_time()
    _busy_time: Callable[[], float] = _runnable_time
except (OSError, ValueError):  # a kernel without schedstats: CPU time, blind to contention
    _busy_time = time.thread_time


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.c_void_p),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", _Msghdr), ("len", ctypes.c_uint)]


try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _recvmmsg = _libc.recvmmsg
    _sendmmsg = _libc.sendmmsg
except (OSError, AttributeError):  # not glibc/Linux
    _recvmmsg = _sendmmsg = None


class _Late(LateReply):
    """The sender of the datagram being handled, bound to a reply closure only if its query starts a
    race: bound inside the forwarding call, while the names buffer still holds this batch. One per
    listener, pointed at each forwarded datagram in turn."""

    __slots__ = ("listener", "off")

    def __init__(self, listener: "BatchUdpListener") -> None:
        self.listener = listener
        self.off = 0

    def bind(self) -> Callable[[bytes], None]:
        listener, off = self.listener, self.off
        return listener._replier(listener._nview[off:off + listener._namelen].tobytes())


def _uint_view(array: ctypes.Array) -> memoryview:
    return memoryview(array).cast("B").cast("I")


class BatchUdpListener:
    """One bound UDP socket served with recvmmsg/sendmmsg from the event loop's reader callback."""

    @staticmethod
    def supported() -> bool:
        return _recvmmsg is not None and ctypes.sizeof(_Mmsghdr) == 64 and ctypes.sizeof(_Iovec) == 16

    def __init__(self, dispatch: Dispatch, sock: socket.socket) -> None:
        self.dispatch = dispatch
        self.sock = sock
        self.fd = sock.fileno()
        self.family = sock.family
        self.closed = False
        self.backlog = Backlog()  # whether we are behind: then forwards are shed (dispatch.py)
        self._rbuf = ctypes.create_string_buffer(BATCH * BUF_SIZE)
        self._sbuf = ctypes.create_string_buffer(BATCH * BUF_SIZE)
        self._names = ctypes.create_string_buffer(BATCH * NAME_SIZE)
        self._riov = (_Iovec * BATCH)()
        self._siov = (_Iovec * BATCH)()
        self._rmsg = (_Mmsghdr * BATCH)()
        self._smsg = (_Mmsghdr * BATCH)()
        rbase, sbase = ctypes.addressof(self._rbuf), ctypes.addressof(self._sbuf)
        nbase = ctypes.addressof(self._names)
        # The address length of this socket's family: the kernel writes exactly this much for every
        # datagram, so namelen never needs resetting, and replies reuse it as it is.
        namelen = 16 if self.family == socket.AF_INET else NAME_SIZE
        for i in range(BATCH):
            self._riov[i].base, self._riov[i].len = rbase + i * BUF_SIZE, BUF_SIZE
            self._siov[i].base = sbase + i * BUF_SIZE
            self._rmsg[i].hdr.name = nbase + i * NAME_SIZE
            self._rmsg[i].hdr.namelen = namelen
            self._smsg[i].hdr.namelen = namelen
            self._rmsg[i].hdr.iov = ctypes.addressof(self._riov[i])
            self._rmsg[i].hdr.iovlen = 1
            self._smsg[i].hdr.iov = ctypes.addressof(self._siov[i])
            self._smsg[i].hdr.iovlen = 1
        self._sview = memoryview(self._sbuf).cast("B")
        self._rid = memoryview(self._rbuf).cast("B").cast("H")  # datagram i's ID at i * HALF_BUF
        self._sid = memoryview(self._sbuf).cast("B").cast("H")
        self._nview = memoryview(self._names).cast("B")
        self._rmsg_u = _uint_view(self._rmsg)  # 16 uints a message: namelen at 2, msg_len at 14
        self._smsg_u = _uint_view(self._smsg)
        self._smsg_q = memoryview(self._smsg).cast("B").cast("Q")  # 8 a message: name pointer at 0
        self._siov_q = memoryview(self._siov).cast("B").cast("Q")  # 2 an iovec: len at 1
        self._name_ptr = [nbase + i * NAME_SIZE for i in range(BATCH)]
        # Allowed-client cache keyed by the raw address (an int for IPv4, read straight from the
        # sockaddr; bytes for IPv6): no text conversion per datagram.
        self._allowed: dict[object, bool] = {}
        self._addr_off = (4, 8) if self.family == socket.AF_INET else (8, 24)
        self._names_u = _uint_view(self._names)  # IPv4 address of datagram i at index i * 7 + 1
        self._namelen = namelen
        self._late = _Late(self)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.add_reader(self.fd, self._on_readable)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.remove_reader(self.fd)
            self.sock.close()

    def _client(self, i: int) -> tuple:
        """The Python address tuple of datagram `i` (slow: only for the query log and the allow-list)."""
        off = i * NAME_SIZE
        return self._address(bytes(self._nview[off:off + NAME_SIZE]))

    def _address(self, raw: bytes) -> tuple:
        """The Python address tuple of a raw sockaddr."""
        port = raw[2] << 8 | raw[3]
        if self.family == socket.AF_INET:
            return (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
        return (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, 0, int.from_bytes(raw[24:28], "little"))

    def _on_readable(self) -> None:
        backlog = self.backlog
        now = _monotonic()
        if now >= backlog.next_sample:  # every LOAD_WINDOW at most: reading it costs system calls
            backlog.sample(now, _busy_time())
        try:
            self._rounds()
        finally:
            self.dispatch.forward_allowance = -1

    def _rounds(self) -> None:
        dispatch = self.dispatch
        engine = dispatch.engine
        assert engine is not None
        # The hot path calls the engine itself (Dispatch.answer's work for a datagram, without its
        # frame): a bug costs one query (engine_error), None is counted as dropped. A query in the
        # engine's reply memo does not even call it: the memo maps the bytes after the ID, sliced
        # straight out of the receive buffer, to the reply's, which go straight into the send
        # buffer behind the ID (copied as one 16-bit word). With a query log every query takes
        # the full path (`{}.get` misses), which has the bytes the log wants.
        answer = engine.answer
        memo_get = engine.replies.get if dispatch.qlog is None else {}.get
        c = dispatch.counters
        qlog = dispatch.qlog
        rbuf = self._rbuf
        sview, nview, names_u = self._sview, self._nview, self._names_u
        rid, sid = self._rid, self._sid
        rmsg_u, smsg_q, siov_q = self._rmsg_u, self._smsg_q, self._siov_q
        name_ptr = self._name_ptr
        allowed = self._allowed
        v4 = self.family == socket.AF_INET
        a0, a1 = self._addr_off
        namelen = self._namelen
        backlog = self.backlog
        forward_fn = dispatch.forward_fn  # the server's forwarding path, called straight without a query log
        replier = self._replier
        late = self._late
        last_who: object = None
        last_ok = False
        hits = 0
        try:
            for _ in range(MAX_ROUNDS):
                count = _recvmmsg(self.fd, self._rmsg, BATCH, MSG_DONTWAIT, None)
                if count <= 0:
                    backlog.read(0)  # caught up
                    return
                # Behind (datagrams waiting): a few new forwards a batch, the rest shed (dispatch.py).
                allowance = dispatch.forward_allowance = backlog.read(count)
                c.udp += count
                out = 0
                for i in range(count):
                    if v4:
                        who: object = names_u[i * 7 + 1]
                    else:
                        off = i * NAME_SIZE
                        who = bytes(nview[off + a0:off + a1])
                    if who == last_who:  # a batch is often one client's
                        ok = last_ok
                    else:
                        ok = allowed.get(who)  # type: ignore[assignment]
                        if ok is None:
                            ok = self._check(i, who)
                        last_who, last_ok = who, ok
                    if not ok:
                        c.refused_clients += 1
                        continue
                    start = i * BUF_SIZE
                    end = start + rmsg_u[i * 16 + 14]
                    tail = memo_get(rbuf[start + 2:end])  # a c_char array slices to bytes: one copy
                    if tail is not None:
                        base = out * BUF_SIZE
                        sview[base + 2:base + 2 + len(tail)] = tail
                        sid[out * HALF_BUF] = rid[i * HALF_BUF]
                        siov_q[out * 2 + 1] = len(tail) + 2
                        smsg_q[out * 8] = name_ptr[i]
                        out += 1
                        hits += 1
                        continue
                    data = rbuf[start:end]
                    try:
                        result = answer(data)
                    except Exception:
                        dispatch.engine_error(data)
                        continue
                    if result.__class__ is not bytes:
                        if result is None:
                            c.dropped += 1
                            continue
                        # Forwarded. A reply known at once (cache hit, shed under overload) goes
                        # out in this batch's sendmmsg like a local answer; the rest come later.
                        # The sender's address stays raw bytes until a reply comes later, and
                        # a reply closure is made only then (`late`): a shed query pays for neither.
                        off = i * NAME_SIZE
                        if qlog is None:
                            late.off = off
                            result = forward_fn(result, data, late, False)  # type: ignore[arg-type]
                        else:  # the log's wrapper keeps its ReplyTo past this batch: made now
                            reply_to = replier(nview[off:off + namelen].tobytes())
                            result = dispatch.forward_or_reply(result, data, self._client(i)[0], reply_to,  # type: ignore[arg-type]
                                                               False)
                        if result is None:
                            continue
                    elif qlog is not None:
                        qlog.write(self._client(i)[0], data, result, "local")
                    size = len(result)  # type: ignore[arg-type]
                    if size > BUF_SIZE:  # replies are fitted to MAX_UDP_PAYLOAD: never this large
                        continue
                    base = out * BUF_SIZE
                    sview[base:base + size] = result  # type: ignore[assignment]
                    siov_q[out * 2 + 1] = size
                    smsg_q[out * 8] = name_ptr[i]
                    out += 1
                backlog.spent(allowance, dispatch.forward_allowance)
                if out:
                    _sendmmsg(self.fd, self._smsg, out, 0)
                if count < BATCH:
                    return
        finally:
            engine.fast_hits += hits

    def _check(self, i: int, who: object) -> bool:
        ok = self.dispatch.client_allowed(self._client(i)[0])
        if len(self._allowed) > 65536:
            self._allowed.clear()
        self._allowed[who] = ok
        return ok

    def _replier(self, raw: bytes) -> Callable[[bytes], None]:
        """Where the later reply to the sender of sockaddr `raw` goes."""
        def reply_to(reply: bytes) -> None:
            if self.closed:
                return
            try:
                self.sock.sendto(reply, self._address(raw))
            except OSError as exc:  # a full send buffer drops this reply, as UDP may
                if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                    raise

        return reply_to
