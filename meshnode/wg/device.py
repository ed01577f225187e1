"""The running interface: a thread that moves packets between the TUN, the engine and a UDP socket
(plus a timer thread), and the live API the node daemon drives (peers, keys, packet filter, stats).

Why a thread and not asyncio (uvloop included): per packet, an event loop adds a callback dispatch
and a poll, which is most of the budget. The I/O thread polls once, then drains a batch from each
ready fd (a TUN read per packet, or a TSO super-packet; a UDP GRO read per ~50 datagrams), and
sends with UDP GSO and coalesced TUN writes. The crypto holds the GIL, so a thread per direction
encrypts no faster; measured here it costs ~20% more CPU per GB for the same throughput, and is
kept as an option (`io_threads=2`). The daemon calls the live API from its event loop: each call
takes the engine lock briefly and never waits on the I/O thread.

Packet hooks (the ACL filter): `set_packet_filter(inbound, outbound)` installs a check of every
decrypted packet and a tap on every packet going out; each is one attribute the engine reads once
per batch, so nothing is locked per packet. A stateful filter that must only be touched from the
thread that runs it (new rules on a new map) is changed through `call_soon_dataplane(fn)`, which
runs `fn` on the receive thread between batches."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from .engine import DEFAULT_MTU, Engine, OutboundHook, PacketFilter, Sealed
from .netconf import Netns, configure_interface, sync_routes
from .offload import VNET_HDR_LEN, OffloadError, from_tun, to_tun
from .peer import Endpoint, Network, PeerConfig, PeerStats
from .tun import open_tun

log = logging.getLogger(__name__)

BATCH = 128  # packets per poll, at most: bounds latency for the other direction
READ_SIZE = 65536 + 64  # a TSO super-packet and its vnet header
# The timer thread sleeps until the engine's next deadline, and at most this long. A deadline that
# a packet sets after the thread asked is never nearer than one second (a persistent keepalive is
# whole seconds; every other WireGuard timer is 5 s or more), so no timer ever runs late.
MAX_TIMER_SLEEP = 1.0
MIN_TIMER_SLEEP = 0.005  # a deadline already due is run at once, without spinning on it
SOCKET_BUFFER = 4 << 20
PR_SET_NAME = 15
SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: GSO segment size (sendmsg cmsg)
UDP_GRO = 104  # linux/udp.h: receive coalesced datagrams, segment size in a cmsg
GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS is 64 on older kernels, 128 on newer
GSO_MAX_BYTES = 65000  # whole datagrams, headers included: the UDP payload limit is 65507
GRO_BUFFER = 65536 + 4096
# Peers reached through the relay get an endpoint on this address, with the port naming the peer
# (`relay_endpoint`): the send paths hand such datagrams to `relay_out` instead of the socket.
# Tailscale's DERP magic address; it is never a real destination.
RELAY_HOST = "::ffff:127.3.3.40"
_SEG = struct.Struct("=H")
_GRO_SEG = struct.Struct("=i")


def dual_stack_endpoint(host: str, port: int) -> Endpoint:
    """An endpoint as our AF_INET6 dual-stack socket wants it (IPv4 as ::ffff:a.b.c.d)."""
    addr = ipaddress.ip_address(host.split("%")[0])
    if addr.version == 4:
        return (f"::ffff:{addr}", port, 0, 0)
    return (str(addr), port, 0, 0)


def relay_endpoint(peer_id: int) -> Endpoint:
    """The endpoint that means "peer `peer_id` through the relay" (see RELAY_HOST)."""
    return (RELAY_HOST, peer_id, 0, 0)


def display_endpoint(ep: Endpoint | None) -> tuple[str, int] | None:
    """An endpoint for humans: IPv4-mapped addresses shown as IPv4."""
    if ep is None:
        return None
    host = ep[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, ep[1])


def _named(target: Callable[[], None], name: str) -> Callable[[], None]:
    """`target`, first naming its OS thread so `top -H` and `ps -L` show which loop burns CPU."""
    def run() -> None:
        try:
            ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15])
        except (OSError, AttributeError) as exc:  # cosmetic only: run unnamed
            log.debug("cannot name thread %s: %s", name, exc)
        target()
    return run


def socket_peer(peer: PeerConfig) -> PeerConfig:
    """`peer` with its endpoint in the form our socket uses (IPv4 as ::ffff:a.b.c.d)."""
    if peer.endpoint is None or len(peer.endpoint) == 4:
        return peer
    return dataclasses.replace(peer, endpoint=dual_stack_endpoint(*peer.endpoint))


def open_udp(port: int | None) -> socket.socket:
    """A dual-stack UDP socket on `port` (0 or None: any), with large buffers."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # *BUFFORCE: root
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        sock.bind(("::", port or 0))
    except OSError:
        sock.close()
        raise
    return sock


class DeviceFailure(OSError):
    """The TUN or the UDP socket failed for good; the device has stopped (see Device.failure)."""


class Device:
    """A WireGuard interface in motion: `Engine` + TUN fd + UDP socket + three threads."""

    def __init__(self, engine: Engine, tun_fd: int, sock: socket.socket, vnet_hdr: bool = False,
                 clock: Callable[[], float] = time.monotonic, ifname: str | None = None,
                 netlink: Netns | None = None, io_threads: int = 1) -> None:
        """`vnet_hdr`: the TUN was opened with IFF_VNET_HDR (TSO reads, coalesced GSO writes).
        `netlink` (opened in the TUN's namespace): when given, peer changes also add and remove
        the kernel routes into `ifname` for their allowed IPs."""
        self.engine = engine
        self.ifname = ifname
        self.io_threads = io_threads
        self._netlink = netlink
        self.vnet_hdr = vnet_hdr
        self.offload_errors = 0
        self._tun = tun_fd
        self._sock = sock
        self._clock = clock
        engine.wall_offset = time.time() - clock()
        self._stop = threading.Event()
        self._timers_due = threading.Event()  # wakes the timer thread: stop, or a deadline due now
        engine.timers_changed = self._timers_due.set
        self._wake_r, self._wake_w = os.pipe()
        # Calls for the receive thread (call_soon_dataplane), and a pipe to wake it for them.
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            collections.deque())
        self._calls_lock = threading.Lock()
        self._calls_open = False  # True while a receive thread will run queued calls
        self._call_r, self._call_w = os.pipe()
        os.set_blocking(self._call_r, False)
        os.set_blocking(self._call_w, False)
        self._threads: list[threading.Thread] = []
        self.send_errors = 0
        self.tun_write_errors = 0
        self.failure: DeviceFailure | None = None  # set when the device stopped by itself
        # Datagrams for relay endpoints, [(datagram, endpoint)], called on the I/O threads (must
        # neither block nor raise); None: they are dropped and counted as send errors.
        self.relay_out: Callable[[list[tuple[bytes, Endpoint]]], None] | None = None
        # Held around every engine.receive_batch (the receive thread's batches and relayed ones,
        # which run on the caller's thread) and around call_soon_dataplane calls: batches from the
        # two sources never interleave in a keypair's replay window, and a call still runs
        # "between two batches" of either kind. Uncontended on the direct path.
        self._rx_lock = threading.Lock()
        self.gso = True
        try:
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            log.info("no UDP GRO on this kernel; receiving datagrams one by one")

    # ------------------------------------------------------------------ live API

    def set_private_key(self, private_key: bytes) -> None:
        """Change our static key; sessions restart with fresh handshakes."""
        self.engine.set_private_key(private_key)

    def set_peers(self, peers: Iterable[PeerConfig]) -> None:
        """Make the peer set exactly `peers` (added, updated in place, removed). Endpoints may be
        given as (ip, port); they are converted for the dual-stack socket."""
        with self._routes_following():
            self.engine.set_peers([socket_peer(p) for p in peers])

    def set_peer(self, peer: PeerConfig) -> None:
        """Add or update one peer."""
        with self._routes_following():
            self.engine.set_peer(socket_peer(peer))

    def remove_peer(self, public_key: bytes) -> None:
        """Forget a peer at once."""
        with self._routes_following():
            self.engine.remove_peer(public_key)

    @contextlib.contextmanager
    def _routes_following(self) -> Iterator[None]:
        before = self._routed()
        yield
        after, name = self._routed(), self.ifname
        if self._netlink is not None and name is not None and after != before:
            self._netlink.run(lambda ipr: sync_routes(ipr, name, before, after))

    def _routed(self) -> set[Network]:
        return {net for s in self.engine.peers() for net in s.allowed_ips}

    def set_endpoint(self, public_key: bytes, endpoint: Endpoint | None) -> bool:
        """Send the peer's WireGuard traffic to `endpoint` (the path layer's choice: (ip, port),
        or a `relay_endpoint`) from now on; a peer roaming to another address still moves it.
        False: no such peer."""
        ep = dual_stack_endpoint(*endpoint) if endpoint is not None and len(endpoint) == 2 else endpoint
        found = self.engine.set_endpoint(public_key, ep, self._clock())
        if self.engine.outbox:
            self._flush_outbox()  # a pending handshake re-sent to the new endpoint goes now
        return found

    def receive_relayed(self, datagram: bytes, src: Endpoint) -> None:
        """A WireGuard datagram that came through the relay from `src` (a `relay_endpoint`): it
        is decrypted and written to the TUN on the caller's thread (any thread may call this)."""
        self.receive_relayed_many(((datagram, src),))

    def receive_relayed_many(self, items: Iterable[tuple[bytes, Endpoint]]) -> None:
        """`receive_relayed` for a batch, handled at once on the caller's thread (the relay
        client's event loop). Handing the batch to the receive thread instead cost a pipe write
        and a GIL hand-off per batch: about half of the latency the relay added (bench/relay.sh).
        Batches are serialised with the receive thread's by `_rx_lock`; after `close` they are
        dropped (the TUN fd may already be closed, or its number reused)."""
        with self._rx_lock:
            if self._stop.is_set():
                return  # closed (or failed): there is no TUN to write to
            now = self._clock()
            packets: list[bytes] = []
            batch: list[bytes] = []
            src: Endpoint | None = None
            receive_batch = self.engine.receive_batch
            for datagram, ep in items:  # one engine batch per run of datagrams from one peer
                if ep != src:
                    if batch:
                        receive_batch(batch, src, now, packets)  # type: ignore[arg-type]
                    batch, src = [], ep
                batch.append(datagram)
            if batch:
                receive_batch(batch, src, now, packets)  # type: ignore[arg-type]
            if self.vnet_hdr:
                packets = to_tun(packets)
            write, fd = os.write, self._tun
            for packet in packets:
                try:
                    write(fd, packet)
                except OSError:
                    self.tun_write_errors += 1
        if self.engine.outbox:
            self._flush_outbox()

    def set_datagram_handler(self, handler: Callable[[bytes, tuple[str, int]], None] | None) -> None:
        """Hand every datagram on the socket that is not WireGuard (disco, STUN) to
        `handler(data, (ip, port))`, on the receive thread: it must neither block nor raise."""
        if handler is None:
            self.engine.other_datagram = None
            return

        def other(data: bytes, src: Endpoint) -> None:
            ep = display_endpoint(src)
            if ep is not None:
                handler(data, ep)
        self.engine.other_datagram = other

    def send_datagram(self, data: bytes, endpoint: tuple[str, int]) -> bool:
        """Send one datagram (disco, STUN) from the WireGuard socket, so NATs map it the same way
        as WireGuard's own traffic. False if the socket refused it."""
        try:
            self._sock.sendto(data, dual_stack_endpoint(*endpoint))
            return True
        except OSError:
            self.send_errors += 1
            return False

    def set_packet_filter(self, accept: PacketFilter | None,
                          outbound: OutboundHook | None = None) -> None:
        """Install `accept(packet, peer_public_key) -> bool` for every decrypted inbound packet
        (None: accept all), and `outbound(packet, peer_public_key)` for every packet from the TUN
        that routes to a peer, before it is sealed (None: no tap). `accept` runs on the receive
        thread, `outbound` on the send thread (the same one unless `io_threads=2`); both must be
        fast and must neither block nor raise. Each takes effect from the next batch on."""
        self.engine.outbound_hook = outbound
        self.engine.inbound_filter = accept

    def call_soon_dataplane(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run `fn()` on the receive thread between two batches (where the inbound filter runs),
        and return a future of its result. When no such thread runs (not started, closed,
        failed), `fn` runs at once on the caller's thread: then nothing else touches the hooks."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._calls_lock:
            if self._calls_open:
                self._calls.append((fn, future))
                try:
                    os.write(self._call_w, b"x")
                except BlockingIOError:
                    pass  # the pipe is full of wake-ups already: the thread will come
                return future
        _run_call(fn, future)
        return future

    def _run_calls(self) -> None:
        """Run the queued calls (on the receive thread)."""
        try:
            while os.read(self._call_r, 4096):
                pass
        except BlockingIOError:
            pass
        calls = self._calls
        with self._rx_lock:  # between two batches, relayed ones included
            while calls:
                fn, future = calls.popleft()
                _run_call(fn, future)

    def _close_calls(self) -> None:
        """No receive thread from now on: run what is queued here, and later calls inline."""
        with self._calls_lock:
            self._calls_open = False
            pending = list(self._calls)
            self._calls.clear()
        for fn, future in pending:
            _run_call(fn, future)

    def set_fwmark(self, mark: int) -> None:
        """Mark the tunnel's own UDP packets (SO_MARK, like `wg set fwmark`): policy routing can
        then keep them out of the tunnel when default routes point into it."""
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)

    def stats(self) -> list[PeerStats]:
        """Per-peer endpoint, latest handshake (Unix time), rx/tx bytes."""
        out = []
        for s in self.engine.peers():
            out.append(PeerStats(s.public_key, display_endpoint(s.endpoint), s.last_handshake,
                                 s.rx_bytes, s.tx_bytes, s.allowed_ips, s.persistent_keepalive))
        return out

    def drops(self) -> dict[str, int]:
        """Dropped packets by reason."""
        return {reason.value: n for reason, n in self.engine.drops.items()}

    def errors(self) -> dict[str, int]:
        """I/O errors by kind (UDP sends refused, TUN writes refused, unsplittable TUN reads)."""
        return {"udp_send": self.send_errors, "tun_write": self.tun_write_errors,
                "offload": self.offload_errors}

    @property
    def listen_port(self) -> int:
        return self._sock.getsockname()[1]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start moving packets: `io_threads` 1 polls TUN and socket in one thread (no GIL
        hand-offs between directions), 2 gives each direction its own thread."""
        tx = {self._tun: self._tx_step()}
        rx = {self._sock.fileno(): self._rx_step()}
        loops: list[tuple[Callable[[], None], str]] = []
        self._calls_open = True
        if self.io_threads == 1:
            loops.append((lambda: self._poll_loop({**tx, **rx}, calls=True), "wg-io"))
        else:
            loops.append((lambda: self._poll_loop(tx), "wg-tun"))
            loops.append((lambda: self._poll_loop(rx, calls=True), "wg-udp"))
        loops.append((self._timer_loop, "wg-timers"))
        for target, name in loops:
            t = threading.Thread(target=_named(target, name), name=name, daemon=True)
            t.start()
            self._threads.append(t)

    @property
    def running(self) -> bool:
        """False once closed or failed (then `failure` says why)."""
        return not self._stop.is_set()

    def close(self) -> None:
        """Stop the threads and close the socket and TUN fd."""
        if self._sock.fileno() < 0:
            return  # already closed
        self._stop.set()
        self._timers_due.set()
        os.write(self._wake_w, b"x")
        for t in self._threads:
            t.join(timeout=5)
        self._close_calls()
        with self._rx_lock:  # no relayed batch is writing to the TUN fd as it closes
            self._sock.close()
            os.close(self._tun)
        for fd in (self._wake_r, self._wake_w, self._call_r, self._call_w):
            os.close(fd)
        if self._netlink is not None:
            self._netlink.close()

    # ------------------------------------------------------------------ loops

    def _flush_outbox(self) -> None:
        outbox = self.engine.outbox
        sendto = self._sock.sendto
        relayed: list[tuple[bytes, Endpoint]] = []
        while outbox:
            try:
                msg, ep = outbox.popleft()
            except IndexError:  # another thread took the last one
                break
            if ep[0] == RELAY_HOST:
                relayed.append((msg, ep))
                continue
            try:
                sendto(msg, ep)
            except OSError:
                self.send_errors += 1
        if relayed:
            self._relay(relayed)

    def _relay(self, items: list[tuple[bytes, Endpoint]]) -> None:
        out = self.relay_out
        if out is None:
            self.send_errors += len(items)
            return
        out(items)

    def _run(self, body: Callable[[], None]) -> None:
        while not self._stop.is_set():
            try:
                body()
            except DeviceFailure as exc:
                # The TUN or socket is gone (interface deleted...): retrying would spin.
                log.error("wireguard device stopped: %s", exc)
                self.failure = exc
                self._stop.set()
                self._timers_due.set()
                os.write(self._wake_w, b"x")
            except Exception:  # a bug must not silently kill the tunnel: log it and go on
                log.exception("wireguard %s loop error", threading.current_thread().name)

    def _transmit(self, out: list[Sealed]) -> None:
        """Send datagrams, coalescing runs to one endpoint into UDP GSO sends: one sendmsg for up
        to GSO_MAX_SEGMENTS equal-sized datagrams (the last may be shorter), split by the kernel
        (or not at all, if the path and the receiver's UDP GRO keep them together)."""
        sendmsg = self._sock.sendmsg
        i, n = 0, len(out)
        while i < n:
            header, body, ep = out[i]
            if ep[0] == RELAY_HOST:  # one check per run of datagrams to one endpoint
                j = i + 1
                while j < n and out[j][2] == ep:
                    j += 1
                self._relay([(h + b, e) for h, b, e in out[i:j]])
                i = j
                continue
            size = len(header) + len(body)
            j = i + 1
            total = size
            if self.gso:
                while (j < n and j - i < GSO_MAX_SEGMENTS and total + size <= GSO_MAX_BYTES
                       and out[j][2] == ep):
                    nxt = len(out[j][0]) + len(out[j][1])
                    if nxt > size:
                        break
                    total += nxt
                    j += 1
                    if nxt < size:
                        break  # a shorter datagram can only end a GSO run
            try:
                if j - i == 1:
                    sendmsg((header, body), (), 0, ep)
                else:
                    parts = [part for sealed in out[i:j] for part in sealed[:2]]
                    sendmsg(parts, [(SOL_UDP, UDP_SEGMENT, _SEG.pack(size))], 0, ep)
            except OSError as exc:
                if exc.errno == errno.EIO and j - i > 1:
                    self.gso = False  # no GSO on this path after all: fall back for good
                    log.warning("UDP GSO failed (%s); sending datagrams one by one", exc)
                    continue
                self.send_errors += 1
            i = j

    def _tx_step(self) -> Callable[[], None]:
        """TUN -> engine -> UDP for one batch (whatever the TUN holds, up to BATCH packets)."""
        read, send_batch = os.read, self.engine.send_batch
        fd, clock, outbox = self._tun, self._clock, self.engine.outbox
        transmit = self._transmit
        vnet = self.vnet_hdr

        def step() -> None:
            now = clock()
            packets: list[bytes] = []
            while len(packets) < BATCH:
                try:
                    data = read(fd, READ_SIZE)
                except BlockingIOError:
                    break
                except OSError as exc:
                    raise DeviceFailure(f"reading the TUN: {exc}") from exc
                if not vnet:
                    packets.append(data)
                elif not data[0] and not data[1]:  # no checksum to finish, no segmentation
                    packets.append(data[VNET_HDR_LEN:])
                else:
                    try:
                        packets.extend(from_tun(data))
                    except (OffloadError, IndexError, struct.error):
                        self.offload_errors += 1
            out: list[Sealed] = []
            send_batch(packets, now, out)
            if out:
                transmit(out)
            if outbox:
                self._flush_outbox()

        return step

    def _rx_step(self) -> Callable[[], None]:
        """UDP -> engine -> TUN for one batch (up to BATCH reads, each up to 64 KiB with GRO)."""
        recvmsg_into, receive_batch = self._sock.recvmsg_into, self.engine.receive_batch
        write, fd, clock, outbox = os.write, self._tun, self._clock, self.engine.outbox
        dontwait = socket.MSG_DONTWAIT
        buf = bytearray(GRO_BUFFER)
        view = memoryview(buf)
        cmsg_space = socket.CMSG_SPACE(4)
        seg_unpack = _GRO_SEG.unpack_from
        vnet = self.vnet_hdr

        rx_lock = self._rx_lock

        def step() -> None:
            with rx_lock:  # relayed batches (receive_relayed_many) wait for this one
                body()
            if outbox:
                self._flush_outbox()

        def body() -> None:
            now = clock()
            for _ in range(BATCH):
                try:
                    nbytes, ancdata, _, src = recvmsg_into([buf], cmsg_space, dontwait)
                except BlockingIOError:
                    break
                except OSError as exc:  # ICMP errors surface here (ECONNREFUSED...)
                    if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        continue
                    if exc.errno in (errno.EINTR, errno.ENOMEM, errno.ENOBUFS):
                        break
                    raise DeviceFailure(f"reading the UDP socket: {exc}") from exc
                seg = nbytes
                for level, kind, data in ancdata:
                    if level == SOL_UDP and kind == UDP_GRO:
                        (seg,) = seg_unpack(data)
                if seg >= nbytes:
                    datagrams = (view[:nbytes],)
                else:
                    datagrams = tuple(view[k:min(k + seg, nbytes)] for k in range(0, nbytes, seg))
                packets: list[bytes] = []
                receive_batch(datagrams, src, now, packets)
                if vnet:
                    packets = to_tun(packets)
                for packet in packets:
                    try:
                        write(fd, packet)
                    except OSError:
                        self.tun_write_errors += 1

        return step

    def _poll_loop(self, steps: dict[int, Callable[[], None]], calls: bool = False) -> None:
        """Wait on the fds in `steps` and run the step of each one that is readable; with `calls`,
        this thread also runs `call_soon_dataplane` calls."""
        poller = select.poll()
        for fd in (*steps, self._wake_r):
            poller.register(fd, select.POLLIN)
        wake = self._wake_r
        if calls:
            steps = {**steps, self._call_r: self._run_calls}
            poller.register(self._call_r, select.POLLIN)

        def body() -> None:
            for fd, _ in poller.poll():
                if fd != wake:
                    steps[fd]()

        try:
            self._run(body)
        finally:
            if calls:
                self._close_calls()

    def _timer_loop(self) -> None:
        engine, clock, due, stop = self.engine, self._clock, self._timers_due, self._stop
        wait = MAX_TIMER_SLEEP
        while True:
            due.wait(wait)
            due.clear()
            if stop.is_set():
                return
            try:
                engine.tick(clock())
                self._flush_outbox()
                deadline = engine.next_deadline()
                wait = MAX_TIMER_SLEEP if deadline is None else \
                    min(MAX_TIMER_SLEEP, max(deadline - clock(), MIN_TIMER_SLEEP))
            except Exception:
                log.exception("wireguard timer error")
                wait = MAX_TIMER_SLEEP


def _run_call(fn: Callable[[], Any], future: concurrent.futures.Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to whoever waits on the future
        future.set_exception(exc)


def create_device(private_key: bytes, tun: str, *,
                  addresses: Iterable[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = (),
                  listen_port: int | None = None, mtu: int = DEFAULT_MTU,
                  peers: Iterable[PeerConfig] = (), offload: str = "gro",
                  manage_routes: bool = True, io_threads: int = 1) -> Device:
    """Create TUN `tun`, its addresses and routes, the UDP socket and the engine, and start it.

    `offload`: "gro" (coalesced GSO writes), "tso" (also TSO reads) or "none". With
    `manage_routes`, routes into the TUN follow the peers' allowed IPs, live. `io_threads`: see
    `Device.start`. Raises TunError,
    OSError (the UDP port) or NetconfError; nothing is left behind on failure."""
    if offload not in ("gro", "tso", "none"):
        raise ValueError(f"offload must be gro, tso or none, not {offload!r}")
    tun_fd, ifname = open_tun(tun, vnet_hdr=offload != "none", tso=offload == "tso")
    try:
        sock = open_udp(listen_port)
    except OSError:
        os.close(tun_fd)
        raise
    netlink = Netns()
    device = Device(Engine(private_key, mtu=mtu), tun_fd, sock, vnet_hdr=offload != "none",
                    ifname=ifname, netlink=netlink if manage_routes else None,
                    io_threads=io_threads)
    try:
        peers = [socket_peer(p) for p in peers]
        device.engine.set_peers(peers)
        routes = [net for p in peers for net in p.allowed_ips] if manage_routes else []
        netlink.run(lambda ipr: configure_interface(ipr, ifname, mtu, addresses, routes))
    except BaseException:
        device.close()
        raise
    finally:
        if not manage_routes:
            netlink.close()
    device.start()
    return device
