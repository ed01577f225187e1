"""The relay embedded in a real control server (in-process on loopback) and `meshnode control serve
--derp` as a process: nodes registered with the real client library meet through /derp with their node
keys, strangers are refused, a removed node is dropped within a second, and the relay map reaches the
nodes' NetMaps from flags, a --derp-map file and the policy's "derpMap" section."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from meshnode.control.client import ControlClient, generate_private_key
from meshnode.control.server import ControlServer, ServerConfig
from meshnode.control.store import ControlStore
from meshnode.derp.client import DerpClient
from meshnode.derp.derpmap import RelayMapFile, embedded_map
from meshnode.derp.server import RelayServer
from meshnode.netmap import NetMap
from meshnode.stun.client import stun_query
from tests.support import async_wait_until, free_port, stop_process

MESHNODE = str(Path(sys.executable).parent / "meshnode")
FAST = ServerConfig(poll_interval=0.05, coalesce=0.005, keepalive=5.0, ephemeral_grace=0.3, reap_interval=0.05)

TS_MAP = {"Regions": {"900": {"RegionID": 900, "RegionCode": "lab", "RegionName": "Lab",
                              "Nodes": [{"Name": "900a", "RegionID": 900, "HostName": "relay-a.lab", "STUNPort": -1},
                                        {"Name": "900b", "RegionID": 900, "HostName": "relay-b.lab",
                                         "DERPPort": 8443, "IPv4": "192.0.2.7"}]}}}


class Member:
    def __init__(self, url: str) -> None:
        self.node_priv = generate_private_key()
        self.client = ControlClient(url, generate_private_key(), self.node_priv)
        self.map: NetMap | None = None
        self.task: asyncio.Task | None = None

    @property
    def raw_priv(self) -> bytes:
        return base64.b64decode(self.node_priv)

    def follow(self) -> None:
        async def run() -> None:
            async for nm in self.client.stream_map():
                self.map = nm
        self.task = asyncio.create_task(run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        await self.client.close()


def test_embedded_relay_admits_exactly_the_tailnet(tmp_path: Path) -> None:
    async def body() -> None:
        store, admin = ControlStore(tmp_path / "c.db"), ControlStore(tmp_path / "c.db")
        map_path = tmp_path / "derpmap.json"
        map_path.write_text(json.dumps(TS_MAP))
        relay = RelayServer(os.urandom(32))
        server = ControlServer(store, FAST, relay=relay, relay_map=embedded_map(999, "", 1, tls=False),
                               relay_map_file=RelayMapFile(str(map_path)))
        port = await server.start("127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        key, _ = admin.create_authkey("alice@example.com", reusable=True)
        a, b = Member(url), Member(url)
        clients: list[DerpClient] = []
        try:
            for m, name in ((a, "alpha"), (b, "beta")):
                await m.client.register(key, hostname=name)
                m.follow()
            await async_wait_until(lambda: a.map and b.map and a.map.derp_map and b.map.peers, 3.0, what="maps")
            # The relay map: the embedded region and the file's region, in order.
            rmap = a.map.derp_map
            assert [r.region_id for r in rmap.regions] == [900, 999]
            assert rmap.region(999).nodes[0].url(url) == "http://127.0.0.1:1/derp"
            assert rmap.region(900).nodes[1].url() == "https://relay-b.lab:8443/derp"
            assert rmap.region(900).nodes[0].stun_port == -1
            # Nodes meet through /derp on the control server's own listener.
            da = DerpClient(a.raw_priv, [url + "/derp"])
            db = DerpClient(b.raw_priv, [url + "/derp"])
            stranger = DerpClient(os.urandom(32), [url + "/derp"], connect_timeout=1.0)
            clients += [da, db, stranger]
            for c in clients:
                await c.start()
            assert await da.wait_connected(3) and await db.wait_connected(3)
            pub_b = base64.b64decode(b.map.self_node.node_key)
            pub_a = base64.b64decode(a.map.self_node.node_key)
            da.send(pub_b, b"through the control server")
            assert await asyncio.wait_for(db.recv(), 2) == (pub_a, b"through the control server")
            await async_wait_until(lambda: relay.refused >= 1, 3.0, what="stranger refused")
            assert stranger.connected_url is None
            token = admin.rotate_admin_token()  # /metrics is the admin's, never the nodes'
            async with aiohttp.ClientSession() as http:
                async with http.get(url + "/metrics") as resp:
                    assert resp.status == 401
                async with http.get(url + "/metrics", headers={"Authorization": f"Bearer {token}"}) as resp:
                    assert "meshnode_derp_packets_relayed_total 1" in await resp.text()
            # A bad map file keeps the last good map; a good one replaces it.
            map_path.write_text("{ not json")
            os.utime(map_path, ns=(time.time_ns(), time.time_ns() + 1))
            await async_wait_until(lambda: server.relay_map_file.error is not None, 2.0, what="bad file noticed")
            assert [r.region_id for r in a.map.derp_map.regions] == [900, 999]
            # The policy's derpMap, with OmitDefaultRegions, replaces everything else.
            policy = {"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
                      "derpMap": {"OmitDefaultRegions": True, "Regions": {"5": {
                          "RegionID": 5, "RegionCode": "p", "RegionName": "Policy",
                          "Nodes": [{"Name": "5a", "HostName": "p.example", "HTTPOnly": True}]}}}}
            from meshnode.control.access import set_policy
            set_policy(admin, json.dumps(policy))
            await async_wait_until(lambda: [r.region_id for r in b.map.derp_map.regions] == [5], 2.0,
                                   what="policy relay map reaches nodes (as a delta)")
            assert b.map.derp_map.region(5).nodes[0].url() == "http://p.example:80/derp"
            # Removing a node from the tailnet (the admin CLI's path: another store connection)
            # drops it from the relay within a second, and it is refused afterwards.
            refused = relay.refused
            admin.delete_node("beta")
            t0 = time.monotonic()
            await async_wait_until(lambda: db.connected_url is None, 1.0, interval=0.005, what="beta dropped")
            assert time.monotonic() - t0 < 1.0
            await async_wait_until(lambda: relay.refused > refused, 3.0, what="beta refused on reconnect")
            assert da.connected_url is not None
        finally:
            for c in clients:
                await c.close()
            for m in (a, b):
                await m.stop()
            await server.stop()
            admin.close()
            store.close()
    asyncio.run(asyncio.wait_for(body(), 30))


def test_control_serve_derp_process(tmp_path: Path) -> None:
    port, stun_port = free_port(), free_port()
    db = tmp_path / "c.db"
    proc = subprocess.Popen([MESHNODE, "control", "serve", "--listen", f"127.0.0.1:{port}", "--db", str(db),
                             "--derp", "--stun-port", str(stun_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async def body() -> None:
            async with aiohttp.ClientSession() as http:
                async def up() -> bool:
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/derp/probe") as resp:
                            return resp.status == 200
                    except aiohttp.ClientError:
                        return False
                await async_wait_until(up, 15.0, interval=0.05, what="control server up")
            got = await stun_query(("127.0.0.1", stun_port), timeout=2.0)
            assert got.ip == "127.0.0.1"
            # A key not in the (empty) tailnet is refused.
            c = DerpClient(os.urandom(32), [f"http://127.0.0.1:{port}/derp"], connect_timeout=1.0)
            await c.start()
            await async_wait_until(lambda: c.stats["connect_failures"] >= 1, 3.0, what="refused")
            assert c.connected_url is None
            await c.close()
            # The map a node gets names region 999 on this listener.
            store = ControlStore(db)
            key, _ = store.create_authkey("bob@example.com")
            store.close()
            m = Member(f"http://127.0.0.1:{port}")
            await m.client.register(key, hostname="bob")
            m.follow()
            try:
                await async_wait_until(lambda: m.map is not None, 3.0, what="map")
                node = m.map.derp_map.region(999).nodes[0]
                assert (node.host, node.port, node.stun_port, node.tls) == ("", port, stun_port, False)
                assert node.url(f"http://127.0.0.1:{port}") == f"http://127.0.0.1:{port}/derp"
            finally:
                await m.stop()
        asyncio.run(asyncio.wait_for(body(), 30))
    finally:
        stop_process(proc)


def test_standalone_relay_follows_a_control_db(tmp_path: Path) -> None:
    """`meshnode derp serve --control-db`: the nodes of that database get in, others do not, and a node
    removed by another process (the admin CLI's path) is dropped within a second."""
    db = tmp_path / "c.db"
    ready = tmp_path / "ready"

    async def body() -> None:
        store = ControlStore(db)
        server = ControlServer(store, FAST)
        port = await server.start("127.0.0.1", 0)
        key, _ = store.create_authkey("carol@example.com", reusable=True)
        m = Member(f"http://127.0.0.1:{port}")
        await m.client.register(key, hostname="carol")
        proc = subprocess.Popen([MESHNODE, "derp", "serve", "--listen", "127.0.0.1:0", "--stun-port", "-1",
                                 "--control-db", str(db), "--ready-file", str(ready)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        clients: list[DerpClient] = []
        try:
            await async_wait_until(lambda: ready.exists() or proc.poll() is not None, 15.0, interval=0.02,
                                   what="relay ready")
            assert proc.poll() is None
            url = f"http://127.0.0.1:{int(ready.read_text().split()[0])}/derp"
            member = DerpClient(m.raw_priv, [url])
            stranger = DerpClient(os.urandom(32), [url], connect_timeout=1.0)
            clients += [member, stranger]
            for c in clients:
                await c.start()
            assert await member.wait_connected(3.0)
            await async_wait_until(lambda: stranger.stats["connect_failures"] >= 1, 3.0, what="stranger refused")
            admin = ControlStore(db)
            admin.delete_node("carol")
            admin.close()
            t0 = time.monotonic()
            await async_wait_until(lambda: member.connected_url is None, 1.0, interval=0.005, what="carol dropped")
            assert time.monotonic() - t0 < 1.0
        finally:
            for c in clients:
                await c.close()
            await m.stop()
            stop_process(proc)
            await server.stop()
            store.close()
    asyncio.run(asyncio.wait_for(body(), 40))
