"""The publisher's direct fan-out (ControlServer._write_now): a change's frames are written to the
streams that keep up from the publisher itself, as HTTP/1.1 chunks straight to the transport; streams
that are behind, stuck or due a full map keep the task path with its deadline watch. A real server
on 127.0.0.1 (port 0), real clients, and streams read by hand from a raw socket the way any HTTP/1.1
client with its own chunk parser reads them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator

from magicdns.records import parse_record
from meshnode.control.protocol import MACHINE_KEY_HEADER, Channel, FrameReader, public_key_of
from meshnode.control.server import ControlServer
from tests.integration.test_control_server import FAST, Tailnet, run, within_1s
from tests.support import async_wait_until


class RawStream:
    """A map stream on a plain socket: the HTTP/1.1 chunked body parsed here, frames opened with the
    machine key. It reads only when told to, so a test can make it stop reading (a stuck node)."""

    def __init__(self, url: str, machine_priv: str, node_key: str, server_pub: str, rcvbuf: int = 0,
                 http: str = "1.1", extra: dict[str, Any] | None = None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect((host, int(port)))
        self.chan = Channel(machine_priv, server_pub)
        body = self.chan.seal({"ts": time.time(), "node_key": node_key, "stream": True, **(extra or {})})
        self.http = http
        self.sock.sendall((f"POST /machine/map HTTP/{http}\r\nHost: {host}\r\n"
                           f"{MACHINE_KEY_HEADER}: {public_key_of(machine_priv)}\r\n"
                           f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        self.sock.setblocking(False)
        self.buf = b""
        self.headers: bytes | None = None
        self.frames = FrameReader()
        self.messages: list[dict[str, Any]] = []
        self.closed = False

    def _parse(self) -> None:
        if self.headers is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.headers, self.buf = self.buf[:end], self.buf[end + 4:]
            assert self.headers.startswith(f"HTTP/{self.http} 200".encode()), self.headers
            assert (b"transfer-encoding: chunked" in self.headers.lower()) == (self.http == "1.1"), self.headers
        if self.http == "1.0":   # no chunks: the body runs to the connection's end
            data, self.buf = self.buf, b""
            for sealed in self.frames.feed(data):
                self.messages.append(json.loads(self.chan.open_bytes(sealed)))
            return
        while True:
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self.buf[:line_end], 16)
            if len(self.buf) < line_end + 2 + size + 2:
                return
            data = self.buf[line_end + 2:line_end + 2 + size]
            assert self.buf[line_end + 2 + size:line_end + 4 + size] == b"\r\n", "bad chunk trailer"
            self.buf = self.buf[line_end + 4 + size:]
            for sealed in self.frames.feed(data):
                self.messages.append(json.loads(self.chan.open_bytes(sealed)))

    async def read_until(self, cond: Any, timeout: float, what: str) -> None:
        """Read (and parse) until cond(self) holds; fails after `timeout`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not cond(self):
            left = end - loop.time()
            assert left > 0, f"timed out waiting for {what}"
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 1 << 16), min(left, 0.2))
            except asyncio.TimeoutError:
                continue
            except ConnectionError:
                data = b""
            if not data:
                self.closed = True
                assert cond(self), f"the server closed the stream before {what}"
                return
            self.buf += data
            self._parse()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    def close(self) -> None:
        self.sock.close()


async def _raw_node(net: Tailnet, name: str, beside: Any, **kw: Any) -> RawStream:
    """A node `name` registered like `beside` whose map stream is a RawStream (it reads only when told
    to), its full map read."""
    node = await net.join(name, start=False)
    raw = RawStream(net.url, node.client.machine_key_private, node.client.node_key_public,
                    beside.client.server_public_key or "", **kw)
    try:
        await raw.read_until(lambda r: r.of_type("full"), 5, "the full map")
    except BaseException:
        raw.close()
        raise
    return raw


@contextlib.asynccontextmanager
async def _tailnet(tmp_path: Path, small_buffers: bool = False, **config: Any) -> AsyncIterator[Tailnet]:
    """A running Tailnet whose server has FAST changed by `config`; `small_buffers`: its accepted
    sockets get small send buffers (`_small_send_buffers`)."""
    net = Tailnet(tmp_path)
    net.server = ControlServer(net.store, replace(FAST, **config))
    async with net:
        if small_buffers:
            _small_send_buffers(net.server)
        yield net


def _small_send_buffers(server: ControlServer) -> None:
    """Accepted sockets inherit the listener's send buffer: a small one makes an unread stream fill
    up after a few tens of kilobytes."""
    for site in server._runner.sites:  # type: ignore[union-attr]
        for lsock in site._server.sockets:  # type: ignore[union-attr]
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)


def _big_records(prefix: str, n: int) -> list:
    return [parse_record(f"{prefix}{i}", "TXT", '"' + "x" * 180 + '"', 60, "tailnet") for i in range(n)]


async def _published(net: Tailnet, after: int) -> None:
    await async_wait_until(lambda: net.server.snapshot is not None and net.server.snapshot.version > after,
                           timeout=3, what="a new snapshot")


@run
async def test_a_change_reaches_every_client_through_the_direct_writes(tmp_path: Path) -> None:
    """The chunks written past aiohttp are read by aiohttp's own client parser (the real node
    client): every node applies the change, and the frames did go out from the publisher."""
    async with Tailnet(tmp_path) as net:
        nodes = [await net.join(f"n{i}") for i in range(12)]
        await within_1s(lambda: all(n.map and len(n.map.peers) == 11 for n in nodes), "first maps")
        await async_wait_until(lambda: all(s.parked for s in net.server._streams.values())
                               and len(net.server._streams) == 12, timeout=3, what="streams parked")
        direct = net.server.stats["frames_direct"]
        for round_ in range(3):   # several changes in a row: each a delta on the same connections
            net.admin_store.rename_node(str(nodes[0].map.self_node.id), f"first{round_}")
            await within_1s(lambda: all(f"first{round_}" in n.peer_names() for n in nodes[1:])
                            and nodes[0].map.self_node.name == f"first{round_}", f"rename {round_}")
        assert net.server.stats["frames_direct"] - direct >= 3 * 12
        assert all(n.error is None for n in nodes)
        assert "meshnode_control_frames_direct_total" in net.server._metrics_text().text


@run
async def test_a_frame_larger_than_the_send_buffer_goes_through_the_task(tmp_path: Path) -> None:
    """A delta bigger than the high-water mark cannot be handed over without waiting: the publisher
    leaves it to the stream's task (which writes exactly that frame) and the node still gets it."""
    async with Tailnet(tmp_path) as net:
        a, b = await net.join("a"), await net.join("b")
        await within_1s(lambda: a.map and b.map and a.peer_names() == {"b"}, "first maps")
        await async_wait_until(lambda: all(s.parked for s in net.server._streams.values()),
                               timeout=3, what="streams parked")
        direct = net.server.stats["frames_direct"]
        net.admin_store.records.import_records(_big_records("big", 1_500))   # ~300 kB of DNS text
        await async_wait_until(lambda: all(len(n.map.dns.records) >= 1_500 for n in (a, b)), timeout=5,
                               what="the big DNS delta")
        assert net.server.stats["frames_direct"] == direct   # neither fitted under the high-water mark
        net.admin_store.rename_node(str(a.map.self_node.id), "a2")   # and the next small one is direct again
        await within_1s(lambda: "a2" in b.peer_names(), "rename after the big delta")
        assert net.server.stats["frames_direct"] > direct


@run
async def test_a_reader_that_stops_is_closed_at_the_deadline(tmp_path: Path) -> None:
    """A stream that kept up (its frames written directly) and then stops reading: once its buffer is
    past the low-water mark the publisher no longer writes to it; its task does, under the deadline
    watch, which closes it. The healthy node keeps getting every change meanwhile."""
    async with _tailnet(tmp_path, small_buffers=True, stream_deadline=1.5, keepalive=30.0) as net:
        healthy = await net.join("healthy")
        raw = await _raw_node(net, "stuck", healthy, rcvbuf=4096)
        try:
            await async_wait_until(lambda: len(net.server._streams) == 2
                                   and all(s.parked for s in net.server._streams.values()), timeout=3, what="parked")
            direct = net.server.stats["frames_direct"]
            net.admin_store.rename_node(str(healthy.map.self_node.id), "h0")
            await raw.read_until(lambda r: any(p.get("name") == "h0" for m in r.of_type("delta")
                                               for p in m.get("peers_changed") or []), 2, "the rename")
            await within_1s(lambda: healthy.map.self_node.name == "h0", "the rename to the healthy node")
            assert net.server.stats["frames_direct"] >= direct + 2   # both streams, from the publisher
            # Now it reads nothing more; ~25 kB deltas fill its buffers within a few changes.
            t_stop = time.monotonic()
            for i in range(12):
                version = net.server.snapshot.version  # type: ignore[union-attr]
                net.admin_store.records.import_records(_big_records(f"r{i}-", 100))
                await _published(net, version)
                await within_1s(lambda: len(healthy.map.dns.records) == 100 * (i + 1), f"records {i} to the healthy node")
                if net.server.stats["slow_streams_closed"]:
                    break
            await async_wait_until(lambda: net.server.stats["slow_streams_closed"] == 1
                                   and net.server.stats["streams"] == 1, timeout=4, what="the stuck stream closed")
            assert time.monotonic() - t_stop < 1.5 + 4 + 12   # the deadline, not never
            assert healthy.error is None and net.server.stats["slow_streams_closed"] == 1
        finally:
            raw.close()


@run
async def test_a_stream_that_is_behind_gets_one_coalesced_delta(tmp_path: Path) -> None:
    """Changes made while a stream's buffers are full are not queued frame by frame: when its reader
    catches up it gets one delta covering all of them (at most one frame queued per stream)."""
    async with _tailnet(tmp_path, small_buffers=True, stream_deadline=20.0, keepalive=30.0) as net:
        other = await net.join("other")
        raw = await _raw_node(net, "slow", other, rcvbuf=4096)
        try:
            await async_wait_until(lambda: len(net.server._streams) == 2, timeout=3, what="two streams")
            # Fill its buffers without reading: a few big DNS deltas.
            for i in range(6):
                version = net.server.snapshot.version  # type: ignore[union-attr]
                net.admin_store.records.import_records(_big_records(f"f{i}-", 100))
                await _published(net, version)
            other_id = other.map.self_node.id
            await async_wait_until(lambda: any(not s.parked and s.state.node_id != other_id
                                               for s in net.server._streams.values()), timeout=3,
                                   what="the slow stream's task blocked in a write")
            before = len(raw.messages)
            # Eight renames while it is stuck: eight snapshots, eight frames to the healthy node.
            for i in range(8):
                version = net.server.snapshot.version  # type: ignore[union-attr]
                net.admin_store.rename_node(str(other_id), f"other{i}")
                await _published(net, version)
            await within_1s(lambda: other.map.self_node.name == "other7", "the renames to the healthy node")

            def caught_up(r: RawStream) -> bool:
                return any(p.get("name") == "other7" for m in r.of_type("delta")
                           for p in (m.get("peers_changed") or []) + (m.get("peers_patch") or [])
                           if isinstance(p, dict))
            await raw.read_until(caught_up, 10, "the last rename")
            renamed = [m for m in raw.messages[before:] if m.get("type") == "delta"
                       and any(p.get("id") == other_id for p in m.get("peers_changed") or [])]
            # One coalesced delta carrying the last name; never one frame per rename.
            assert [p["name"] for m in renamed for p in m["peers_changed"] if p["id"] == other_id] == ["other7"]
            assert net.server.stats["slow_streams_closed"] == 0
        finally:
            raw.close()


@run
async def test_keepalives_go_out_on_idle_streams_and_wait_after_a_frame(tmp_path: Path) -> None:
    """An idle stream gets a keepalive every interval although its task's timer is armed only when
    it parks; a frame the publisher wrote counts as traffic, so the keepalive after it is later."""
    async with _tailnet(tmp_path, keepalive=0.4) as net:
        other = await net.join("other")
        raw = await _raw_node(net, "quiet", other)
        try:
            t0 = time.monotonic()
            await raw.read_until(lambda r: len(r.of_type("keepalive")) >= 3, 3, "three keepalives")
            assert time.monotonic() - t0 >= 0.4 * 2   # not a burst: one per interval
            # Renames every 0.15 s for 1.2 s: every frame direct, so no keepalive is due meanwhile.
            await async_wait_until(lambda: all(s.parked for s in net.server._streams.values()), timeout=2, what="parked")
            keepalives, direct = len(raw.of_type("keepalive")), net.server.stats["frames_direct"]
            for i in range(8):
                net.admin_store.rename_node(str(other.map.self_node.id), f"o{i}")
                await raw.read_until(lambda r, i=i: any(p.get("name") == f"o{i}" for m in r.of_type("delta")
                                                        for p in (m.get("peers_changed") or [])
                                                        + (m.get("peers_patch") or []) if isinstance(p, dict)),
                                     2, f"rename {i}")
                await asyncio.sleep(0.15)   # the pace of the changes, not synchronisation
            assert net.server.stats["frames_direct"] >= direct + 8
            assert len(raw.of_type("keepalive")) - keepalives <= 1
            # Idle again: keepalives resume.
            await raw.read_until(lambda r: len(r.of_type("keepalive")) >= keepalives + 3, 3, "keepalives again")
        finally:
            raw.close()


@run
async def test_an_http10_stream_is_not_written_past_aiohttp(tmp_path: Path) -> None:
    """Without chunked encoding (an HTTP/1.0 request) a chunk written to the transport would corrupt
    the body: such a stream keeps the task path, and its node reads every frame."""
    async with Tailnet(tmp_path) as net:
        other = await net.join("other")
        raw = await _raw_node(net, "old", other, http="1.0")
        try:
            await async_wait_until(lambda: len(net.server._streams) == 2
                                   and all(s.parked for s in net.server._streams.values()), timeout=3, what="parked")
            direct = net.server.stats["frames_direct"]
            for i in range(3):
                net.admin_store.rename_node(str(other.map.self_node.id), f"renamed{i}")
                await raw.read_until(lambda r, i=i: any(p.get("name") == f"renamed{i}" for m in r.of_type("delta")
                                                        for p in m.get("peers_changed") or []), 2, f"rename {i}")
                await within_1s(lambda i=i: other.map.self_node.name == f"renamed{i}", "the rename to the other")
            # Only the chunked (HTTP/1.1) stream of `other` went direct.
            assert net.server.stats["frames_direct"] - direct == 3
        finally:
            raw.close()



@run
async def test_old_and_new_nodes_hold_the_same_filter_whether_sent_inline_or_as_prefix_sets(tmp_path: Path) -> None:
    """Nodes that ask for prefix sets (the real client, and a raw stream that says so) beside one that
    does not (a raw stream, as a node from before them), through policy changes: the old one gets every
    list inline, the new ones get each long list once, and all hold the same sources. A port added
    over the same sources sends no list at all."""
    from meshnode.control.access import set_policy
    self_only = {"acls": [{"action": "accept", "src": ["autogroup:member"], "dst": ["autogroup:self:*"]}]}
    port_added = {"acls": self_only["acls"] + [{"action": "accept", "src": ["autogroup:member"],
                                                "dst": ["autogroup:self:4242"]}]}
    async with Tailnet(tmp_path) as net:
        # alice's devices between bob's, as they register over time: no two make a CIDR together.
        bob, _ = net.admin_store.create_authkey("bob@example.com", reusable=True)
        nodes = []
        for i in range(7):
            nodes += [await net.join(f"a{i}"), await net.join(f"b{i}", key=bob)]
        real = nodes[0]
        old = await _raw_node(net, "old", real)
        await net.join("b7", key=bob)
        new = await _raw_node(net, "new", real, extra={"prefix_sets": True})
        try:
            for round_, policy in enumerate((self_only, port_added)):
                set_policy(net.admin_store, json.dumps(policy))
                want = len(policy["acls"])

                def last_filter(r: RawStream) -> list[dict]:
                    return next((m["packet_filter"] for m in reversed(r.of_type("delta")) if "packet_filter" in m), [])
                for r in (old, new):
                    await r.read_until(lambda r: len(last_filter(r)) == want, 2, f"policy {round_}")
                await within_1s(lambda: len(real.map.packet_filter) == want, f"policy {round_} on the real node")
                old_rules, new_rules = last_filter(old), last_filter(new)
                sources = old_rules[0]["src"]
                assert len(sources) == 18 and all(r["src"] == sources for r in old_rules)   # 9 nodes, v4 + v6
                assert all("src" not in r and "src_set" in r for r in new_rules)
                carried = [m["prefix_sets"] for m in new.of_type("delta") if "prefix_sets" in m]
                assert len(carried) == 1 and list(carried[0].values()) == [sources]   # once, in round 0
                assert [dict(r)["src"] for r in real.map.packet_filter] == [sources] * want
                assert [dict(r)["ports"] for r in real.map.packet_filter] == [r["ports"] for r in old_rules]
        finally:
            old.close()
            new.close()


@run
async def test_metrics_count_full_collections_and_the_seconds_they_took(tmp_path: Path) -> None:
    """bench/scale.sh reads these to tell a change's own cost from a full collection landing in it."""
    import gc
    import re

    async with Tailnet(tmp_path) as net:
        def full() -> tuple[float, float]:
            text = net.server._metrics_text().text
            got = [float(re.search(rf'meshnode_control_gc_{what}_total{{generation="2"}} (\S+)', text).group(1))
                   for what in ("collections", "seconds")]
            return got[0], got[1]
        count0, seconds0 = full()
        gc.collect()
        count1, seconds1 = full()
        assert count1 >= count0 + 1 and seconds1 > seconds0


@run
async def test_a_big_tailnets_publish_runs_with_the_cyclic_gc_paused_from_the_store_read_on(tmp_path: Path) -> None:
    """A full collection at 10,000 nodes takes ~0.5 s; one that lands in a build holds the change
    back by as much. From the store read to the last frame the publisher writes, the GC is paused
    (the collection that is due runs after), once the tailnet is big enough for it to matter."""
    import gc

    from meshnode.control.store import Grant, Registration

    async with Tailnet(tmp_path) as net:
        for i in range(1_000):   # straight into the store: no map streams needed for this
            net.admin_store.register(Registration(f"m{i}", f"nk{i}", f"h{i}", "linux", net.key),
                                     lambda *a: Grant((), (), False))
        await async_wait_until(lambda: net.server.snapshot is not None and len(net.server.snapshot.rows) == 1_000,
                               timeout=10, what="the big snapshot")
        seen: list[bool] = []
        read = net.store.list_nodes

        def spy() -> list:
            seen.append(gc.isenabled())
            return read()
        net.store.list_nodes = spy   # type: ignore[method-assign]
        net.admin_store.rename_node("h7", "renamed")
        await async_wait_until(lambda: "renamed" in {n.name for n in net.server.snapshot.rows.values()},
                               timeout=5, what="the rename published")
        assert seen and not any(seen)   # every read of the rows went with the GC paused
        assert gc.isenabled()           # and it is back on after
