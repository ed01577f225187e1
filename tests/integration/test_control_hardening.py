"""Abuse of a real control server (in-process on 127.0.0.1, port 0): replays across restarts, floods
of minted machine keys, malformed numbers and JSON, metrics exposure, tags without owners, unread
map streams. Each test reproduces one finding of issue 9."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from meshnode.control.client import ControlClient, ControlError, generate_private_key
from meshnode.control.protocol import MACHINE_KEY_HEADER, Channel, ErrorCode, public_key_of
from meshnode.control.server import ControlServer
from meshnode.control.store import ControlStore
from tests.integration.test_control_server import FAST, MESHNODE, Tailnet, run, within_1s
from tests.support import async_wait_until


async def _post(url: str, body: bytes, machine_pub: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=body, headers={MACHINE_KEY_HEADER: machine_pub}) as resp:
            return resp.status, await resp.read()


@run
async def test_logout_captured_and_replayed_after_a_restart_is_refused(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        node = await net.join("laptop", start=False)
        server_pub = node.client.server_public_key
        m_priv, m_pub = node.client.machine_key_private, node.client.machine_key_public
        # What an eavesdropper keeps: the exact bytes of a logout request.
        captured = Channel(m_priv, server_pub).seal({"ts": time.time(), "node_key": node.client.node_key_public})
        status, _ = await _post(net.url + "/machine/logout", captured, m_pub)
        assert status == 200
        await node.client.register(net.key, hostname="laptop")      # logs in again
        assert net.admin_store.find_node("laptop").logged_out is False
    # A new server process on the same database (nothing in memory survives).
    store = ControlStore(tmp_path / "control.db")
    server = ControlServer(store, FAST)
    port = await server.start("127.0.0.1", 0)
    try:
        status, body = await _post(f"http://127.0.0.1:{port}/machine/logout", captured, m_pub)
        assert status == 401 and Channel(m_priv, server_pub).open(body)[1]["error"] == "replay", body
        assert store.find_node("laptop").logged_out is False
        # The node itself carries on after the restart.
        client = ControlClient(f"http://127.0.0.1:{port}", m_priv, node.client.node_key_private,
                               server_public_key=server_pub)
        await client.update_endpoints(["192.0.2.1:41641"])
        await client.close()
    finally:
        await server.stop()
        store.close()


@run
async def test_a_flood_of_minted_machine_keys_is_rate_limited_and_nodes_keep_working(tmp_path: Path) -> None:
    net = Tailnet(tmp_path)
    net.server = ControlServer(net.store, replace(FAST, unregistered_rate=20.0, unregistered_burst=50.0))
    async with net:
        node = await net.join("steady", start=False)
        server_pub = node.client.server_public_key
        statuses: dict[int, int] = {}
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 10
            for _ in range(300):            # bounded in count and time
                assert time.monotonic() < deadline
                mk = generate_private_key()
                body = Channel(mk, server_pub).seal({"ts": time.time(), "node_key": mk})
                async with http.post(net.url + "/machine/map", data=body,
                                     headers={MACHINE_KEY_HEADER: public_key_of(mk)}) as resp:
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
        assert statuses.get(429, 0) >= 200, statuses      # most of the flood is turned away cheaply
        assert statuses.get(403, 0) <= 50 + 20 * 10, statuses
        # The registered node is not part of that budget.
        for i in range(20):
            await node.client.update_endpoints([f"192.0.2.1:{1000 + i}"])
        assert len(net.server.replay) <= 300


@run
async def test_bad_numbers_and_deep_json_get_400_not_500(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        node = await net.join("ok", start=False)
        server_pub = node.client.server_public_key
        mk = generate_private_key()
        chan = Channel(mk, server_pub)
        hdr = public_key_of(mk)
        bodies = [
            b'{"ts": NaN, "node_key": "x"}', b'{"ts": Infinity}', b'{"ts": -Infinity}',
            b'{"ts": 1' + b"0" * 5000 + b"}", b'{"ts": 1e999}',
            b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
            json.dumps({"ts": time.time(), "node_key": node.client.node_key_public, "hostname": "h",
                        "node_key_proof": "AAAA", "proof_ts": float("nan")}).encode(),
        ]
        for raw in bodies:
            status, body = await _post(net.url + "/machine/register", chan.seal_bytes(raw), hdr)
            assert status == 400, (raw[:40], status, body[:200])
            msg = json.loads(body)["message"]
            assert "\n" not in msg and "Traceback" not in msg
        token = net.store.ensure_admin_token()
        async with aiohttp.ClientSession() as http:
            for raw in (b"[" * 100_000, b'{"name": 1' + b"0" * 5000 + b"}", b'{"a":' * 50_000):
                async with http.post(net.url + "/admin/nodes/ok/rename", data=raw,
                                     headers={"Authorization": f"Bearer {token}"}) as resp:
                    assert resp.status == 400, (raw[:20], resp.status)
                    assert "\n" not in (await resp.json())["message"]
            assert (await http.get(net.url + "/healthz")).status == 200


def _filter_text(node) -> str:  # noqa: ANN001
    return json.dumps([dict(r) for r in node.map.packet_filter]) if node.map else ""


@run
async def test_tags_need_an_owner_and_a_policy_change_takes_them_away(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        # A fresh server with no policy: no one owns any tag.
        with pytest.raises(ControlError) as err:
            await net.join("grab", start=False, advertise_tags=["tag:anything", "tag:prod"])
        assert err.value.code is ErrorCode.TAG_NOT_ALLOWED
        assert net.admin_store.list_nodes() == []
        # A tagged auth key can tag, and so can an admin.
        ci_key, _ = net.admin_store.create_authkey("alice@example.com", tags=["tag:ci"])
        ci = await net.join("ci", key=ci_key)
        db = await net.join("db")
        net.admin_store.set_tags("db", ["tag:db"])
        from meshnode.control.access import set_policy
        set_policy(net.admin_store, json.dumps({
            "tagOwners": {"tag:prod": ["alice@example.com"], "tag:db": [], "tag:ci": []},
            "acls": [{"action": "accept", "src": ["tag:prod"], "dst": ["tag:db:5432"]},
                     {"action": "accept", "src": ["tag:ci"], "dst": ["tag:ci:*"]}]}))
        prod = await net.join("prod", advertise_tags=["tag:prod"])       # alice owns tag:prod now
        prod_ip = net.admin_store.find_node("prod").addresses[0]
        await within_1s(lambda: prod_ip in _filter_text(db) and "db" in prod.peer_names(), "prod reaches db")

        # The policy gives tag:prod to the admin only: the node loses it, db's filter and prod's map
        # follow, and `policy set` says who lost what.
        policy = tmp_path / "policy.json"
        policy.write_text(json.dumps({
            "tagOwners": {"tag:prod": ["admin@example.com"], "tag:db": [], "tag:ci": []},
            "acls": [{"action": "accept", "src": ["tag:prod"], "dst": ["tag:db:5432"]},
                     {"action": "accept", "src": ["tag:ci"], "dst": ["tag:ci:*"]}]}))
        proc = await asyncio.create_subprocess_exec(
            MESHNODE, "control", "policy", "set", str(policy), "--db", str(net.path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, errout = await proc.communicate()
        assert proc.returncode == 0, errout
        assert "prod: lost tag:prod" in out.decode()
        assert net.admin_store.find_node("prod").tags == ()
        await within_1s(lambda: prod_ip not in _filter_text(db) and "db" not in prod.peer_names(),
                        "prod no longer reaches db")
        # Tags from an admin or an auth key stand.
        assert net.admin_store.find_node("db").tags == ("tag:db",)
        assert net.admin_store.find_node("ci").tags == ("tag:ci",)
        assert ci.map is not None


def _slow_stream(url: str, machine_priv: str, node_key: str, server_pub: str) -> socket.socket:
    """A map stream whose reader never reads (tiny receive buffer), as a stuck node would hold it."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    body = Channel(machine_priv, server_pub).seal({"ts": time.time(), "node_key": node_key, "stream": True})
    sock.sendall((f"POST /machine/map HTTP/1.1\r\nHost: {host}\r\n{MACHINE_KEY_HEADER}: {public_key_of(machine_priv)}"
                  f"\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    return sock


@run
async def test_unread_map_streams_do_not_hold_up_other_nodes(tmp_path: Path) -> None:
    """Eight streams that never read a multi-megabyte map used to hold every full-map slot, so no
    other node got its map. Now each stream has only its own frame queued, a slow one gives its slot
    up, and one that stays behind is closed (its node reconnects and resumes with a full map)."""
    net = Tailnet(tmp_path)
    net.server = ControlServer(net.store, replace(FAST, stream_deadline=2.0, full_map_slot=0.3))
    async with net:
        # Small kernel buffers on the server's side (accepted sockets inherit the listener's), so a
        # map of ~300 kB stands for the 8 MB one against default buffers: an unread stream blocks.
        for site in net.server._runner.sites:  # type: ignore[union-attr]
            for lsock in site._server.sockets:  # type: ignore[union-attr]
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        from magicdns.records import parse_record
        net.admin_store.records.import_records(
            parse_record(f"r{i}", "TXT", '"' + "x" * 180 + '"', 60, "tailnet") for i in range(1_500))
        watcher = await net.join("watcher")
        await async_wait_until(lambda: watcher.map is not None, timeout=10, what="the watcher's big map")
        slow_nodes = [await net.join(f"slow{i}", start=False) for i in range(8)]
        server_pub = watcher.client.server_public_key
        socks = [_slow_stream(net.url, n.client.machine_key_private, n.client.node_key_public, server_pub)
                 for n in slow_nodes]
        try:
            await async_wait_until(lambda: net.server.stats["streams"] == 9, timeout=5, what="eight stuck streams")
            t0 = time.monotonic()
            late = await net.join("late")
            await async_wait_until(lambda: late.map is not None, timeout=3, what="a new node's map")
            assert time.monotonic() - t0 < 3
            net.admin_store.rename_node("watcher", "watcher2")
            await async_wait_until(lambda: watcher.map.self_node.name == "watcher2", timeout=2,
                                   what="a delta to a healthy stream")
            # Stuck streams are closed once behind past the deadline.
            await async_wait_until(lambda: net.server.stats["slow_streams_closed"] >= 8
                                   and net.server.stats["streams"] == 2, timeout=6, what="stuck streams closed")
            # One machine cannot pile up streams: the oldest beyond two is closed.
            extra = [_slow_stream(net.url, slow_nodes[0].client.machine_key_private,
                                  slow_nodes[0].client.node_key_public, server_pub) for _ in range(4)]
            socks += extra
            await async_wait_until(lambda: len(net.server._node_streams.get(
                net.admin_store.find_node("slow0").id, [])) == 2, timeout=3, what="at most two streams a node")
            await async_wait_until(lambda: net.server.stats["streams"] == 4, timeout=3, what="old streams closed")
        finally:
            for s in socks:
                s.close()


@run
async def test_metrics_need_the_admin_token_or_their_own_listener(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        await net.join("n1", start=False)
        token = net.store.ensure_admin_token() or ""
        async with aiohttp.ClientSession() as http:
            async with http.get(net.url + "/metrics") as resp:
                assert resp.status == 401
            async with http.get(net.url + "/metrics", headers={"Authorization": "Bearer wrong"}) as resp:
                assert resp.status == 401
            net.admin_store.rotate_admin_token()
            token = net.admin_store.rotate_admin_token()
            async with http.get(net.url + "/metrics", headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200 and "meshnode_control_nodes " in await resp.text()
            mport = await net.server.start_metrics("127.0.0.1", 0)
            async with http.get(f"http://127.0.0.1:{mport}/metrics") as resp:
                assert resp.status == 200 and "meshnode_control_slow_streams_closed_total 0" in await resp.text()
            async with http.get(f"http://127.0.0.1:{mport}/admin/nodes") as resp:
                assert resp.status == 404          # the metrics listener serves nothing else


@run
async def test_changes_through_the_server_are_audited_with_their_actor(tmp_path: Path) -> None:
    async with Tailnet(tmp_path) as net:
        node = await net.join("laptop", start=False)
        token = net.store.rotate_admin_token()
        async with aiohttp.ClientSession() as http:
            auth = {"Authorization": f"Bearer {token}"}
            async with http.post(net.url + "/admin/nodes/laptop/rename", json={"name": "lap"}, headers=auth) as r:
                assert r.status == 200
            async with http.post(net.url + "/admin/nodes/lap/rename", json={"name": "Bad Name"}, headers=auth) as r:
                assert r.status == 400
        await node.client.logout()
        got = [(e.actor, e.action, e.target) for e in net.admin_store.audit_entries()]
        assert ("node:laptop", "node.register", "node:laptop") in got
        assert ("admin-token", "node.rename", "node:lap") in got
        assert ("node:lap", "node.logout", "node:lap") in got
        assert not any(a == "node.rename" and t == "node:bad name" for _, a, t in got)
        assert net.admin_store.verify_audit().ok
        async with aiohttp.ClientSession() as http:
            auth = {"Authorization": f"Bearer {token}"}
            async with http.get(net.url + "/admin/audit", params={"actor": "admin-token"}, headers=auth) as r:
                assert [e["action"] for e in (await r.json())["entries"]] == ["node.rename"]
            async with http.get(net.url + "/admin/audit/verify", headers=auth) as r:
                body = await r.json()
                assert body["ok"] and body["entries"] == len(got) and len(body["head"]) == 64
            async with http.get(net.url + "/admin/audit", params={"since": "nan"}, headers=auth) as r:
                assert r.status == 400
            async with http.get(net.url + "/admin/audit") as r:
                assert r.status == 401


@run
async def test_a_slow_but_reading_stream_is_not_closed(tmp_path: Path) -> None:
    """The deadline is on progress, not on the whole frame: a node on a slow line that keeps reading
    gets its full map even when that takes longer than the deadline."""
    net = Tailnet(tmp_path)
    net.server = ControlServer(net.store, replace(FAST, stream_deadline=1.0, full_map_slot=0.3))
    async with net:
        for site in net.server._runner.sites:  # type: ignore[union-attr]
            for lsock in site._server.sockets:  # type: ignore[union-attr]
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        from magicdns.records import parse_record
        net.admin_store.records.import_records(
            parse_record(f"r{i}", "TXT", '"' + "x" * 180 + '"', 60, "tailnet") for i in range(1_500))
        slow = await net.join("slow", start=False)
        sock = _slow_stream(net.url, slow.client.machine_key_private, slow.client.node_key_public,
                            slow.client.server_public_key or "")
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        got = 0
        t0 = time.monotonic()
        try:
            while got < 250_000 and time.monotonic() - t0 < 20:     # ~16 kB every 0.2 s
                await asyncio.sleep(0.2)
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 16384), 1.0)
                except asyncio.TimeoutError:
                    continue
                assert chunk, "the server closed a stream that was reading"
                got += len(chunk)
            assert got >= 250_000 and time.monotonic() - t0 > 1.0, got
            assert net.server.stats["slow_streams_closed"] == 0
        finally:
            sock.close()
