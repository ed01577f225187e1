"""The DERP relay on loopback: real servers (in-process aiohttp, and `meshnode derp serve` subprocesses
for kill -9), real clients (our DerpClient, and raw sockets speaking the protocol by hand)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from meshnode.derp.admission import TailnetKeys
from meshnode.derp.client import DerpClient
from meshnode.derp.frames import (MAGIC, FrameReader, FrameType, PeerGone, PeerGoneReason,
                                  SendPacket, encode_frame, parse_frame)
from meshnode.derp.server import RelayServer
from meshnode.derp.session import ClientSession, LoggedIn, public_key
from tests.support import async_wait_until, free_port, stop_process

MESHNODE = str(Path(sys.executable).parent / "meshnode")
DISCO = "TS💬".encode() + b"\1" * 56


class Relay:
    """A RelayServer in an aiohttp app on 127.0.0.1:0."""

    def __init__(self, **kw: object) -> None:
        self.server = RelayServer(os.urandom(32), **kw)  # type: ignore[arg-type]
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> "Relay":
        app = web.Application()
        self.server.attach(app)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"


async def connected(urls: list[str], **kw: object) -> DerpClient:
    c = DerpClient(os.urandom(32), urls, **kw)  # type: ignore[arg-type]
    await c.start()
    assert await c.wait_connected(3.0), f"no relay connection to {urls}"
    return c


def key(c: DerpClient) -> bytes:
    return public_key(c.private_key)


async def raw_login(port: int, priv: bytes | None = None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Upgrade and log in by hand; returns the reader, writer and any bytes after the server info."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await asyncio.wait_for(r.read(4096), 2)
    assert buf.startswith(b"HTTP/1.1 101")
    rest = buf.split(b"\r\n\r\n", 1)[1]
    session = ClientSession(priv or os.urandom(32))
    while True:
        evs = session.receive(rest)
        w.write(session.take_output())
        if any(isinstance(e, LoggedIn) for e in evs):
            return r, w, b""
        rest = await asyncio.wait_for(r.read(4096), 2)
        assert rest, "server closed during login"


async def closed_by_server(r: asyncio.StreamReader, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = await asyncio.wait_for(r.read(65536), deadline - time.monotonic())
        except (asyncio.TimeoutError, ConnectionError):
            return False if not r.at_eof() else True
        if not data:
            return True
    return False


def run(coro: object) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


def test_two_clients_exchange_packets_and_ping() -> None:
    async def body() -> None:
        async with Relay() as relay:
            a, b = await connected([relay.url]), await connected([relay.url])
            try:
                for i in range(50):
                    assert a.send(key(b), b"a->b %d" % i)
                    assert b.send(key(a), b"b->a %d" % i)
                got_b = [await asyncio.wait_for(b.recv(), 2) for _ in range(50)]
                got_a = [await asyncio.wait_for(a.recv(), 2) for _ in range(50)]
                assert got_b == [(key(a), b"a->b %d" % i) for i in range(50)]
                assert got_a == [(key(b), b"b->a %d" % i) for i in range(50)]
                assert 0 < await a.ping() < 1.0
                big = os.urandom(64 << 10)                 # the largest packet DERP carries
                assert a.send(key(b), big)
                assert await asyncio.wait_for(b.recv(), 2) == (key(a), big)
                assert relay.server.stats().packets_relayed == 101
            finally:
                await a.close()
                await b.close()
    run(body())


def test_unknown_key_is_refused_and_removed_key_disconnected_within_a_second() -> None:
    async def body() -> None:
        allowed = TailnetKeys()
        async with Relay(admit=allowed) as relay:
            stranger = DerpClient(os.urandom(32), [relay.url], connect_timeout=1.0)
            await stranger.start()
            member_priv = os.urandom(32)
            allowed.update(frozenset({public_key(member_priv)}))
            member = DerpClient(member_priv, [relay.url])
            await member.start()
            try:
                assert await member.wait_connected(3.0)
                await async_wait_until(lambda: relay.server.refused >= 1, 3.0, what="stranger refused")
                assert not stranger._connected.is_set() and stranger.stats["connect_failures"] >= 1
                # The node leaves the tailnet: the relay drops it at once and refuses it afterwards.
                allowed.update(frozenset())
                t0 = time.monotonic()
                assert relay.server.recheck() == 1
                await async_wait_until(lambda: member.connected_url is None, 1.0, what="member dropped")
                assert time.monotonic() - t0 < 1.0
                await async_wait_until(lambda: relay.server.refused >= 2, 3.0, what="member refused on reconnect")
                assert relay.server.stats().clients == 0
            finally:
                await stranger.close()
                await member.close()
    run(body())


def test_malformed_and_oversize_frames_close_only_that_connection() -> None:
    async def body() -> None:
        async with Relay() as relay:
            a, b = await connected([relay.url]), await connected([relay.url])
            try:
                cases = [
                    b"\x02\x00\x00\x00\x05hello",                       # client info far too short
                    bytes([0x02]) + (10 << 20).to_bytes(4, "big"),      # oversize client info header
                    b"\x04\x00\x00\x00\x01x",                           # a packet before login
                ]
                for raw in cases:
                    r, w = await asyncio.open_connection("127.0.0.1", relay.port)
                    w.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
                    head = b""
                    while MAGIC not in head:                            # as a client: after the server key
                        head += await asyncio.wait_for(r.read(4096), 2)
                    w.write(raw)
                    assert await closed_by_server(r), raw
                    w.close()
                after_login = [
                    bytes([0x04]) + (1 << 20).to_bytes(4, "big"),       # oversize: refused from the header
                    encode_frame(FrameType.SEND_PACKET, b"short"),      # shorter than a key
                    encode_frame(FrameType.FORWARD_PACKET, os.urandom(80)),  # mesh-only frame
                    encode_frame(FrameType.NOTE_PREFERRED, b"\x01\x01"),
                ]
                for raw in after_login:
                    r, w, _ = await raw_login(relay.port)
                    w.write(raw)
                    assert await closed_by_server(r), raw
                    w.close()
                # Garbage that is not even HTTP.
                r, w = await asyncio.open_connection("127.0.0.1", relay.port)
                w.write(os.urandom(3000) + b"\r\n\r\n")
                assert await closed_by_server(r)
                w.close()
                # Unknown frame types are skipped (forward compatibility), and the server lives on.
                priv = os.urandom(32)
                r, w, _ = await raw_login(relay.port, priv)
                w.write(encode_frame(0x7e, b"future") + SendPacket(key(b), b"still here").encode())
                assert await asyncio.wait_for(b.recv(), 2) == (public_key(priv), b"still here")
                assert a.send(key(b), b"ok")
                assert await asyncio.wait_for(b.recv(), 2) == (key(a), b"ok")
                assert relay.server.protocol_errors == len(cases) + len(after_login)
                w.close()
            finally:
                await a.close()
                await b.close()
    run(body())


def test_slow_reader_loses_only_its_own_packets() -> None:
    async def body() -> None:
        async with Relay(queue_depth=16) as relay:
            sender, fast = await connected([relay.url]), await connected([relay.url])
            slow_r, slow_w, _ = await raw_login(relay.port)     # logs in, then never reads again
            slow_key = next(c.key for c in relay.server.clients.values() if c.key not in (key(sender), key(fast)))
            try:
                payload = os.urandom(1200)
                for i in range(300):
                    for _ in range(20):
                        sender.send(slow_key, payload)
                    sender.send(slow_key, DISCO)                  # disco goes to its own queue
                    assert sender.send(key(fast), b"%d" % i)
                    got = await asyncio.wait_for(fast.recv(), 5)
                    assert got == (key(sender), b"%d" % i)        # every one, in order, none dropped
                    if relay.server.drops.get("queue_head", 0) > 100 and i > 50:
                        break
                drops = relay.server.stats().drops
                assert drops.get("queue_head", 0) > 100
                assert relay.server.clients[slow_key].drops == drops["queue_head"]
                assert fast.stats["recv_dropped"] == 0
            finally:
                slow_w.close()
                await sender.close()
                await fast.close()
    run(body())


def test_peer_gone_after_disconnect_and_not_here_for_unknown_keys() -> None:
    async def body() -> None:
        async with Relay() as relay:
            a, b = await connected([relay.url]), await connected([relay.url])
            try:
                a.send(key(b), b"hi")
                assert (await asyncio.wait_for(b.recv(), 2))[1] == b"hi"
                nobody = os.urandom(32)
                b.send(nobody, b"lost")
                assert await asyncio.wait_for(b.next_event(), 2) == PeerGone(nobody, PeerGoneReason.NOT_HERE)
                assert relay.server.drops["unknown_dest"] == 1
                await a.close()
                assert await asyncio.wait_for(b.next_event(), 2) == PeerGone(key(a), PeerGoneReason.DISCONNECTED)
            finally:
                await b.close()
    run(body())


def test_second_connection_with_the_same_key_replaces_the_first() -> None:
    async def body() -> None:
        async with Relay() as relay:
            priv = os.urandom(32)
            first = await connected([relay.url])
            r, w, _ = await raw_login(relay.port, priv)
            r2, w2, _ = await raw_login(relay.port, priv)
            try:
                assert await closed_by_server(r)
                first.send(public_key(priv), b"to the newest")
                reader = FrameReader()
                deadline = time.monotonic() + 2
                frames: list = []
                while time.monotonic() < deadline and not any(getattr(f, "packet", None) for f in frames):
                    frames += [parse_frame(t, p) for t, p in reader.feed(await asyncio.wait_for(r2.read(4096), 2))]
                assert any(getattr(f, "packet", None) == b"to the newest" for f in frames)
            finally:
                w.close()
                w2.close()
                await first.close()
    run(body())


def test_meshed_servers_forward_between_their_clients() -> None:
    async def body() -> None:
        mesh = os.urandom(32)
        p1, p2 = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
        u1, u2 = f"http://127.0.0.1:{p1}/derp", f"http://127.0.0.1:{p2}/derp"
        r1, r2 = Relay(mesh_key=mesh, mesh_with=(u2,)), Relay(mesh_key=mesh, mesh_with=(u1,))
        r1.port, r2.port = p1, p2
        async with r1, r2:
            a, b = await connected([u1]), await connected([u2])
            try:
                await async_wait_until(lambda: key(b) in r1.server.mesh_clients and key(a) in r2.server.mesh_clients,
                                       5.0, what="servers learn each other's clients")
                a.send(key(b), b"across the mesh")
                assert await asyncio.wait_for(b.recv(), 2) == (key(a), b"across the mesh")
                b.send(key(a), b"and back")
                assert await asyncio.wait_for(a.recv(), 2) == (key(b), b"and back")
                assert r1.server.packets_forwarded_out == 1 and r2.server.packets_forwarded_in == 1
                # b leaves server 2: server 1 forgets it (peer gone through the watch).
                await b.close()
                await async_wait_until(lambda: key(b) not in r1.server.mesh_clients, 2.0, what="mesh peer gone")
                # A client with a wrong mesh key may not watch or forward.
                spy = DerpClient(os.urandom(32), [u1], mesh_key=os.urandom(32), watch_conns=True)
                await spy.start()
                await async_wait_until(lambda: r1.server.protocol_errors >= 1, 3.0, what="watch refused")
                await spy.close()
            finally:
                await a.close()
                await b.close()
    run(body())


def test_silent_or_pipelining_clients_are_closed_at_the_login_deadline() -> None:
    async def body() -> None:
        async with Relay(login_timeout=0.5) as relay:
            r1, w1 = await asyncio.open_connection("127.0.0.1", relay.port)
            w1.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
            # Bytes pipelined behind the request are not DERP for aiohttp's parser; the deadline ends it.
            r2, w2 = await asyncio.open_connection("127.0.0.1", relay.port)
            w2.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
                     + b"\x02\x00\x00\x00\x05hello")
            t0 = time.monotonic()
            assert await closed_by_server(r1, 3.0) and await closed_by_server(r2, 3.0)
            assert time.monotonic() - t0 < 2.0
            w1.close()
            w2.close()
            assert not relay.server.clients
    run(body())


def test_probe_and_generate_204() -> None:
    async def body() -> None:
        import aiohttp
        async with Relay() as relay:
            base = f"http://127.0.0.1:{relay.port}"
            async with aiohttp.ClientSession() as http:
                async with http.get(base + "/derp/probe") as resp:
                    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "*"
                async with http.post(base + "/derp/probe") as resp:
                    assert resp.status == 405
                async with http.get(base + "/generate_204", headers={"X-Tailscale-Challenge": "abc.1"}) as resp:
                    assert resp.status == 204 and resp.headers["X-Tailscale-Response"] == "response abc.1"
                async with http.get(base + "/generate_204", headers={"X-Tailscale-Challenge": "bad/char"}) as resp:
                    assert resp.status == 204 and "X-Tailscale-Response" not in resp.headers
                async with http.get(base + "/derp") as resp:          # no upgrade
                    assert resp.status == 426
    run(body())


# --- subprocesses: kill -9 and failover -------------------------------------------------------------

@pytest.fixture
def region(tmp_path: Path):
    """Two meshed `meshnode derp serve` processes of one region."""
    keyfile = tmp_path / "mesh.key"
    subprocess.run([MESHNODE, "derp", "meshkey", str(keyfile)], check=True, capture_output=True)
    ports = [free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)]
    urls = [f"http://127.0.0.1:{p}/derp" for p in ports]

    def start(i: int) -> subprocess.Popen:
        ready = tmp_path / f"ready{i}"
        ready.unlink(missing_ok=True)
        with open(tmp_path / f"relay{i}.log", "ab") as log:
            proc = subprocess.Popen(
                [MESHNODE, "derp", "serve", "--listen", f"127.0.0.1:{ports[i]}", "--stun-port", "0", "--admit-any",
                 "--mesh-with", urls[1 - i], "--mesh-key-file", str(keyfile), "--ready-file", str(ready)],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert proc.poll() is None, (tmp_path / f"relay{i}.log").read_text()
            assert time.monotonic() < deadline, "relay did not start"
            time.sleep(0.02)
        return proc

    procs = [start(0), start(1)]
    yield urls, procs, start
    for p in procs:
        stop_process(p)


@pytest.mark.slow
def test_killed_server_clients_fail_over_within_5s(region) -> None:
    urls, procs, start = region

    async def body() -> None:
        # a prefers server 0, b prefers server 1; both know the whole region.
        a = await connected(urls)
        b = await connected(urls[::-1])
        try:
            async def exchange(tag: bytes, timeout: float) -> None:
                deadline = time.monotonic() + timeout
                while True:                       # until the mesh knows where b is (or b moved)
                    a.send(key(b), tag)
                    try:
                        src, pkt = await asyncio.wait_for(b.recv(), 0.2)
                        if pkt == tag:
                            return
                    except asyncio.TimeoutError:
                        pass
                    assert time.monotonic() < deadline, f"{tag!r} not through within {timeout}s"
            await exchange(b"before", 5.0)
            assert a.connected_url == urls[0] and b.connected_url == urls[1]
            procs[0].kill()                          # SIGKILL: no goodbye to anyone
            t0 = time.monotonic()
            await async_wait_until(lambda: a.connected_url == urls[1], 5.0, what="a fails over to server 1")
            await exchange(b"after", 5.0 - (time.monotonic() - t0))
            assert time.monotonic() - t0 < 5.0
            # The dead server comes back on its port: the mesh links up again, and a node homed
            # there reaches b on the other server.
            procs[0] = start(0)
            c = await connected([urls[0]])
            try:
                deadline = time.monotonic() + 10
                while True:
                    c.send(key(b), b"after restart")
                    try:
                        if (await asyncio.wait_for(b.recv(), 0.2))[1] == b"after restart":
                            break
                    except asyncio.TimeoutError:
                        pass
                    assert time.monotonic() < deadline, "the restarted server never re-joined the mesh"
            finally:
                await c.close()
        finally:
            await a.close()
            await b.close()
    run(body())


def test_disco_jumps_the_queue_of_a_slow_reader() -> None:
    async def body() -> None:
        async with Relay(queue_depth=16) as relay:
            sender = await connected([relay.url])
            r, w, _ = await raw_login(relay.port)
            slow = next(c for c in relay.server.clients.values() if c.key != key(sender))
            try:
                i = 0
                deadline = time.monotonic() + 10
                while len(slow.data) < 16:               # fill its socket, its buffer, then its queue
                    assert i < 50_000 and time.monotonic() < deadline, "queue never filled"
                    if sender.send(slow.key, b"data %d " % i + b"\0" * 1200):
                        i += 1
                    else:
                        await asyncio.sleep(0.001)       # our own send buffer is full: let it drain
                    if i % 64 == 0:
                        await asyncio.sleep(0)
                sender.send(slow.key, DISCO)
                await async_wait_until(lambda: len(slow.disco) == 1, 2.0, what="disco queued")
                reader, frames = FrameReader(), []
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:       # now read everything, until it goes quiet
                    try:
                        data = await asyncio.wait_for(r.read(1 << 16), 0.5)
                    except asyncio.TimeoutError:
                        break
                    frames += reader.feed(data)
                packets = [p[32:] for t, p in frames if t == FrameType.RECV_PACKET]
                at = packets.index(DISCO)
                # The 16 data packets queued before the disco packet arrive after it.
                assert len(packets) - at - 1 == 16
                assert [int(p.split()[1].rstrip(b"\0")) for p in packets[at + 1:]] == sorted(
                    int(p.split()[1].rstrip(b"\0")) for p in packets[at + 1:])
            finally:
                w.close()
                await sender.close()
    run(body())


def test_random_frames_never_take_the_server_down() -> None:
    import random
    rng = random.Random(7)

    async def body() -> None:
        async with Relay() as relay:
            a, b = await connected([relay.url]), await connected([relay.url])
            try:
                for round_ in range(40):                 # bounded: 40 hostile connections
                    r, w, _ = await raw_login(relay.port)
                    junk = b"".join(encode_frame(rng.randrange(256), rng.randbytes(rng.randrange(0, 80)))
                                    for _ in range(rng.randrange(1, 6)))
                    if rng.random() < 0.3:
                        junk = rng.randbytes(rng.randrange(1, 200))
                    w.write(junk)
                    await w.drain()
                    w.close()
                    assert a.send(key(b), b"alive %d" % round_)
                    assert await asyncio.wait_for(b.recv(), 2) == (key(a), b"alive %d" % round_)
                assert a.connected_url and b.connected_url
            finally:
                await a.close()
                await b.close()
    run(body())


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_derp_serve_over_tls(tmp_path: Path) -> None:
    import ssl
    cert, keyfile = _self_signed(tmp_path)
    ready = tmp_path / "ready"
    proc = subprocess.Popen([MESHNODE, "derp", "serve", "--listen", "127.0.0.1:0", "--stun-port", "-1",
                             "--admit-any", "--tls-cert", str(cert), "--tls-key", str(keyfile),
                             "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        port = int(ready.read_text().split()[0])
        url = f"https://127.0.0.1:{port}/derp"

        async def body() -> None:
            trusted = ssl.create_default_context(cafile=str(cert))
            a = await connected([url], ssl=trusted)
            b = await connected([url], ssl=trusted)
            untrusting = DerpClient(os.urandom(32), [url], connect_timeout=1.0)   # system CAs only
            await untrusting.start()
            try:
                a.send(key(b), b"over TLS")
                assert await asyncio.wait_for(b.recv(), 2) == (key(a), b"over TLS")
                # No thread may write into a TLS stream: the node's relay path uses the loop.
                assert a.send_many_threadsafe([(key(b), b"not here")]) is None
                assert a.send_many([(key(b), b"by the loop")]) == 1
                assert await asyncio.wait_for(b.recv(), 2) == (key(a), b"by the loop")
                await async_wait_until(lambda: untrusting.stats["connect_failures"] >= 1, 3.0,
                                       what="certificate refused")
                assert untrusting.connected_url is None
            finally:
                for c in (a, b, untrusting):
                    await c.close()
        run(body())
    finally:
        stop_process(proc)


def test_packets_sent_before_the_connection_wait_for_it_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node sends its first handshake the moment it picks the relay, before the DERP connection
    is up (and during a failover): those packets wait for the login instead of being lost, at most
    PENDING_MAX of them (the newest) and none older than PENDING_TTL."""
    import meshnode.derp.client as client_module

    async def body() -> None:
        async with Relay() as relay:
            b = await connected([relay.url])
            early = DerpClient(os.urandom(32), [relay.url])
            stale = DerpClient(os.urandom(32), [relay.url])
            try:
                # Not started yet: no connection, so the packets wait.
                total = client_module.PENDING_MAX + 5
                for i in range(total):
                    assert early.send(key(b), b"early %d" % i)
                assert early.stats["send_dropped_disconnected"] == 5
                assert stale.send(key(b), b"stale")
                monkeypatch.setattr(client_module, "PENDING_TTL", -1.0)  # every waiting packet is too old
                await stale.start()
                assert await stale.wait_connected(3.0)
                assert stale.stats["send_dropped_disconnected"] == 1
                monkeypatch.setattr(client_module, "PENDING_TTL", 30.0)
                await early.start()
                assert await early.wait_connected(3.0)
                got = [await asyncio.wait_for(b.recv(), 2) for _ in range(client_module.PENDING_MAX)]
                assert got == [(key(early), b"early %d" % i) for i in range(5, total)]
                assert early.send(key(b), b"connected")  # and the connection carries on as usual
                assert await asyncio.wait_for(b.recv(), 2) == (key(early), b"connected")
                assert relay.server.stats().packets_relayed == client_module.PENDING_MAX + 1  # no "stale"
            finally:
                for c in (early, stale, b):
                    await c.close()
            assert early.send(key(b), b"after close") is False
    run(body())


def test_send_many_and_recv_many_keep_order_and_bounds() -> None:
    """The batch forms the node's relay path uses: one write for many frames, all waiting packets in
    one read; order kept, a malformed item refuses the whole batch, nothing half-sent."""
    async def body() -> None:
        async with Relay() as relay:
            a, b = await connected([relay.url]), await connected([relay.url])
            try:
                batch = [(key(b), b"pkt %d" % i + bytes(i)) for i in range(300)]
                assert a.send_many(batch) == 300
                got: list[tuple[bytes, bytes]] = []
                while len(got) < 300:
                    more = await asyncio.wait_for(b.recv_many(limit=256), 2)
                    assert 1 <= len(more) <= 256
                    got += more
                assert got == [(key(a), p) for _, p in batch]
                with pytest.raises(ValueError):
                    a.send_many([(key(b), b"fine"), (b"short", b"bad key")])
                with pytest.raises(ValueError):
                    a.send_many([(key(b), bytes((64 << 10) + 1))])
                assert a.send(key(b), b"after")  # nothing of the refused batches went out
                assert await asyncio.wait_for(b.recv(), 2) == (key(a), b"after")
                assert relay.server.stats().packets_relayed == 301
            finally:
                await a.close()
                await b.close()
    run(body())
