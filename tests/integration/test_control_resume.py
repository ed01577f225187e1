"""Nodes that reconnect resume from the version they hold: real servers, real clients, both stores.

"Right" is always checked against a fresh full map of the very snapshot the server resumed from
(every snapshot a server publishes is recorded by version), so a resume that skipped or invented a
change cannot pass: the resumed map must equal it field for field.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from magicdns.records import parse_record
from meshnode.control.client import ControlClient, MapAssembler, generate_private_key
from meshnode.control.mapbuilder import Snapshot, StreamState, next_frame
from meshnode.control.server import ControlServer, ServerConfig
from meshnode.control.store import ControlStore
from meshnode.netmap import NetMap
from tests.support import async_wait_until

FAST = ServerConfig(poll_interval=0.05, coalesce=0.005, keepalive=5.0)


class Follower:
    """A node streaming its map, keeping every map it was given (in order)."""

    def __init__(self, url: str) -> None:
        self.client = ControlClient(url, generate_private_key(), generate_private_key())
        self.maps: list[NetMap] = []
        self.task: asyncio.Task | None = None
        self.id = 0

    async def join(self, key: str, name: str) -> "Follower":
        self.id = (await self.client.register(key, hostname=name)).node_id
        return self

    def start(self) -> None:
        async def run() -> None:
            async for nm in self.client.stream_map(max_backoff=0.3):
                self.maps.append(nm)
        self.task = asyncio.create_task(run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    def peers(self) -> dict[str, NetMap]:
        return {p.name: p for p in self.maps[-1].peers} if self.maps else {}


def recording(server: ControlServer) -> dict[int, Snapshot]:
    """Every snapshot `server` publishes, by map version (observation only: the real method runs)."""
    snaps: dict[int, Snapshot] = {}
    publish = server._publish

    def record() -> None:
        publish()
        if server.snapshot is not None:
            snaps[server.snapshot.version] = server.snapshot
    server._publish = record  # type: ignore[method-assign]
    return snaps


def full_map(snaps: dict[int, Snapshot], version: int, node_id: int) -> NetMap:
    return MapAssembler().apply(json.loads(next_frame(snaps[version], StreamState(node_id))))


async def close_all(nodes, server: ControlServer, *stores: ControlStore) -> None:  # noqa: ANN001
    """Stop each node's stream and client, then the server, then close the stores."""
    for n in nodes:
        await n.stop()
        await n.client.close()
    await server.stop()
    for s in stores:
        s.close()


async def until(cond, what: str, timeout: float = 10.0) -> None:  # noqa: ANN001
    await async_wait_until(cond, timeout=timeout, interval=0.01, what=what)


def test_a_restarted_server_resumes_every_node_with_only_what_changed(db_spec: str) -> None:
    asyncio.run(asyncio.wait_for(_restart_scenario(db_spec), 60))


async def _restart_scenario(db_spec: str) -> None:
    from meshnode.control.access import set_policy
    admin = ControlStore(db_spec)
    key, _ = admin.create_authkey("alice@example.com", reusable=True)
    # A source list long enough to go as a prefix set: the resumed frames must carry the set (the new
    # server's stream cannot know what the node holds) and assemble to the same map as a full one.
    admins = [f"10.0.{i}.1" for i in range(0, 16, 2)]
    set_policy(admin, json.dumps({"acls": [{"action": "accept", "src": admins, "dst": ["*:22"]},
                                           {"action": "accept", "src": ["*"], "dst": ["*:*"]}]}))
    store = ControlStore(db_spec)
    server = ControlServer(store, FAST)
    port = await server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}"
    nodes = [await Follower(url).join(key, n) for n in ("alpha", "bravo", "charlie")]
    dropme = await Follower(url).join(key, "dropme")
    server2 = None
    try:
        for n in nodes:
            n.start()
        await until(lambda: all(len(n.peers()) == 3 for n in nodes), "every node seeing its peers")
        await server.stop()
        store.close()
        alpha, bravo, charlie = nodes
        seen = len(alpha.maps)
        # While no server runs: a rename, new endpoints, a deletion and a record.
        admin.rename_node("bravo", "bravo2")
        admin.set_endpoints(charlie.id, ["192.0.2.3:41641"])
        admin.delete_node("dropme")
        admin.records.add(parse_record("wiki", "CNAME", "alpha", 60, "tailnet"))

        store = ControlStore(db_spec)
        server2 = ControlServer(store, FAST)
        snaps = recording(server2)
        await server2.start("127.0.0.1", port)
        await until(lambda: all(n.client.resumes == 1 for n in nodes), "every node resuming")
        resumed = alpha.maps[seen]
        assert '"src_set"' in server2.snapshot.filters.of(server2.snapshot.compiled, alpha.id, True)
        assert [dict(r)["src"] for r in resumed.packet_filter][0] == [f"{a}/32" for a in admins]
        assert "bravo2" in {p.name for p in resumed.peers} and "dropme" not in {p.name for p in resumed.peers}
        assert any(r.name == "wiki.tailnet" for r in resumed.dns.records)
        assert resumed == full_map(snaps, resumed.version, alpha.id)
        for n in (bravo, charlie):
            await until(lambda n=n: n.maps[-1].version == server2.snapshot.version, f"{n.id} up to date")
            assert n.maps[-1] == full_map(snaps, n.maps[-1].version, n.id)
        assert server2.stats["resumed"] == 3 and server2.stats["full_maps"] == 0
        assert dropme.id not in server2.snapshot.nodes
    finally:
        for n in nodes:
            await n.stop()
            await n.client.close()
        await dropme.client.close()
        if server2 is not None:
            await server2.stop()
        store.close()
        admin.close()


def test_a_node_away_while_the_jobs_tick_still_resumes(db_spec: str) -> None:
    """The periodic jobs (ephemeral reaping, expiry sweep) that find nothing must not write: a write
    that names nothing is a tailnet version no resume can cross, so every node holding an older
    version got a full map. Small tests reconnected within one reaper tick (5 s) and resumed; a
    replica's nodes at scale, whose last frame was older than the last tick, all started over."""
    async def scenario() -> None:
        admin = ControlStore(db_spec)
        key, _ = admin.create_authkey("alice@example.com", reusable=True)
        store = ControlStore(db_spec)
        server = ControlServer(store, ServerConfig(poll_interval=0.05, coalesce=0.005, keepalive=5.0,
                                                   reap_interval=0.02, expiry_interval=0.02))
        snaps = recording(server)
        ticks = [0]
        reap = store.delete_stale_ephemeral

        def counted(*args, **kw):  # noqa: ANN002, ANN003, ANN202 (observation only: the real method runs)
            ticks[0] += 1
            return reap(*args, **kw)
        store.delete_stale_ephemeral = counted  # type: ignore[method-assign]
        url = f"http://127.0.0.1:{await server.start('127.0.0.1', 0)}"
        alpha, bravo = [await Follower(url).join(key, n) for n in ("alpha", "bravo")]
        try:
            alpha.start()
            bravo.start()
            await until(lambda: len(alpha.peers()) == 1 and len(bravo.peers()) == 1, "both streaming")
            await alpha.stop()
            admin.set_endpoints(bravo.id, ["192.0.2.2:41641"])   # missed while away
            away = ticks[0]
            await until(lambda: ticks[0] >= away + 5, "the reaper ticking while alpha is away")
            seen = len(alpha.maps)
            alpha.start()
            await until(lambda: len(alpha.maps) > seen, "alpha back")
            assert server.resume_refusals == {}
            assert alpha.client.resumes == 1
            resumed = alpha.maps[seen]
            assert resumed.peers[0].endpoints == ("192.0.2.2:41641",)
            assert resumed == full_map(snaps, resumed.version, alpha.id)
        finally:
            await close_all((alpha, bravo), server, store, admin)
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_forged_and_foreign_versions_get_a_full_map(tmp_path: Path) -> None:
    asyncio.run(asyncio.wait_for(_forged_scenario(tmp_path), 60))


async def _forged_scenario(tmp_path: Path) -> None:
    other = ControlStore(tmp_path / "other.db")   # another tailnet, for its epoch
    admin = ControlStore(tmp_path / "control.db")
    key, _ = admin.create_authkey("alice@example.com", reusable=True)
    store = ControlStore(tmp_path / "control.db")
    server = ControlServer(store, FAST)
    snaps = recording(server)
    url = f"http://127.0.0.1:{await server.start('127.0.0.1', 0)}"
    alpha, bravo = [await Follower(url).join(key, n) for n in ("alpha", "bravo")]
    try:
        bravo.start()
        alpha.start()
        await until(lambda: len(alpha.peers()) == 1 and len(bravo.peers()) == 1, "both streaming")
        epoch, version = store.tailnet_epoch(), store.version()
        for forged in (f"{other.tailnet_epoch()}.{alpha.id}.{version}",   # another tailnet
                       f"{epoch}.{alpha.id}.{version + 1000}",              # from the future
                       f"{epoch}.{bravo.id}.{version}",                     # another node's map
                       f"{epoch}.{alpha.id}.-1", "garbage", "a.b.c"):
            await alpha.stop()
            fulls, seen = server.stats["full_maps"], len(alpha.maps)
            admin.set_endpoints(bravo.id, [f"192.0.2.9:{len(forged)}"])   # something to catch up on
            alpha.client._assembler.resume = forged
            alpha.start()
            await until(lambda: len(alpha.maps) > seen, f"a map after resuming with {forged!r}")
            assert alpha.client.resumes == 0, forged
            assert server.stats["full_maps"] == fulls + 1, forged
            got = alpha.maps[seen]
            assert got == full_map(snaps, got.version, alpha.id), forged
        # And an honest token resumes.
        await alpha.stop()
        admin.rename_node("bravo", "bravo2")
        seen = len(alpha.maps)
        alpha.start()
        await until(lambda: len(alpha.maps) > seen, "a resumed map")
        assert alpha.client.resumes == 1
        assert alpha.maps[seen] == full_map(snaps, alpha.maps[seen].version, alpha.id)
        await until(lambda: alpha.maps[-1].peers[0].name == "bravo2", "the rename after the resume")
    finally:
        for n in (alpha, bravo):
            await n.stop()
            await n.client.close()
        await server.stop()
        for s in (store, admin, other):
            s.close()


def test_a_policy_change_while_away_gets_a_full_map(tmp_path: Path) -> None:
    async def scenario() -> None:
        from meshnode.control.access import set_policy
        admin = ControlStore(tmp_path / "control.db")
        key, _ = admin.create_authkey("alice@example.com", reusable=True)
        store = ControlStore(tmp_path / "control.db")
        server = ControlServer(store, FAST)
        snaps = recording(server)
        url = f"http://127.0.0.1:{await server.start('127.0.0.1', 0)}"
        alpha, bravo = [await Follower(url).join(key, n) for n in ("alpha", "bravo")]
        try:
            alpha.start()
            await until(lambda: len(alpha.peers()) == 1, "alpha streaming")
            await alpha.stop()
            set_policy(admin, '{"acls": [{"action": "accept", "src": ["tag:none"], "dst": ["*:*"]}],'
                              ' "tagOwners": {"tag:none": ["alice@example.com"]}}')
            await until(lambda: server.snapshot.tailnet_version >= admin.version(), "the server seeing it")
            seen = len(alpha.maps)
            alpha.start()
            await until(lambda: len(alpha.maps) > seen, "a map after the policy change")
            assert alpha.client.resumes == 0 and alpha.maps[seen].peers == ()
            assert alpha.maps[seen] == full_map(snaps, alpha.maps[seen].version, alpha.id)
        finally:
            await close_all((alpha, bravo), server, store, admin)
    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_metrics_say_when_a_change_was_noticed_built_published_and_written(db_spec: str) -> None:
    """The per-snapshot phase stamps (what bench/scale.sh reads to say where a change's seconds go)
    are those of the snapshot that carried the change, in order (the last frame's stamp set, after
    publishing)."""
    async def scenario() -> None:
        from meshnode.control.access import set_policy
        admin = ControlStore(db_spec)
        key, _ = admin.create_authkey("alice@example.com", reusable=True)
        store = ControlStore(db_spec)
        server = ControlServer(store, FAST)
        url = f"http://127.0.0.1:{await server.start('127.0.0.1', 0)}"
        nodes = [await Follower(url).join(key, n) for n in ("alpha", "bravo", "charlie")]
        arrived: dict[int, float] = {}
        try:
            for n in nodes:
                n.start()
            await until(lambda: all(len(n.peers()) == 2 for n in nodes), "every node streaming")
            t0 = time.time()
            set_policy(admin, '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:4242"]}]}')
            v_policy = admin.version()

            def got_it() -> bool:
                for n in nodes:
                    if n.id not in arrived and "4242" in repr(n.maps[-1].packet_filter):
                        arrived[n.id] = time.time()
                return len(arrived) == len(nodes)
            await until(got_it, "the policy reaching every node")
            version = next(nm.version for nm in nodes[0].maps if "4242" in repr(nm.packet_filter))
            stamps = next(p for p in server.phases if p["version"] == version)
            # "noticed" is the first change the snapshot carries: another write (a node's presence)
            # may have marked the server dirty just before the policy did.
            assert stamps["noticed"] <= stamps["build_start"] <= stamps["published"]
            assert t0 <= stamps["published"]
            assert stamps["store_version"] >= v_policy   # the store version it stands for
            # Stamped once the write has returned, after the loop may already have let the node read
            # it: so it can be a little later than the arrival seen here, never before publishing.
            assert stamps["published"] <= stamps["last_frame"]
            text = server._metrics_text().text
            assert (f'meshnode_control_publish_timestamp_seconds{{version="{version}",'
                    f'store_version="{stamps["store_version"]}",phase="last_frame"}}'
                    f' {stamps["last_frame"]:.6f}') in text
        finally:
            await close_all(nodes, server, store, admin)
    asyncio.run(asyncio.wait_for(scenario(), 60))


@pytest.mark.slow
def test_kill_9_of_a_replica_its_node_resumes_on_another_with_the_missed_changes(tmp_path: Path,
                                                                                 pg_url: str) -> None:
    from tests.integration.test_pg_replicas import Replica

    async def scenario() -> None:
        admin = ControlStore(pg_url)
        key, _ = admin.create_authkey("alice@example.com", reusable=True)
        r1 = Replica(pg_url, "r1", tmp_path)
        store = ControlStore(pg_url)
        r2 = ControlServer(store, ServerConfig(poll_interval=0.2, coalesce=0.005, replica_id="r2"))
        snaps = recording(r2)
        r2_url = f"http://127.0.0.1:{await r2.start('127.0.0.1', 0)}"
        alpha = await Follower(f"{r1.url},{r2_url}").join(key, "alpha")
        bravo = await Follower(r2_url).join(key, "bravo")
        try:
            alpha.start()
            bravo.start()
            await until(lambda: len(alpha.peers()) == 1 and len(bravo.peers()) == 1, "both streaming")
            # r1 learns bravo is online from r2's heartbeat: let that frame arrive first, or it may
            # land after the kill and be taken for the resumed map.
            await until(lambda: alpha.peers()["bravo"].online, "r1 showing bravo online")
            assert alpha.client.server_url == r1.url
            r1.kill()
            t0 = time.monotonic()
            seen = len(alpha.maps)
            # Missed while alpha moves: bravo renamed and its endpoints changed, a record added.
            admin.rename_node("bravo", "bravo2")
            admin.set_endpoints(bravo.id, ["192.0.2.2:41641"])
            admin.records.add(parse_record("wiki", "CNAME", "bravo2", 60, "tailnet"))
            await until(lambda: alpha.client.resumes == 1, "alpha resuming on r2")
            took = time.monotonic() - t0
            resumed = alpha.maps[seen]
            assert alpha.client.server_url == r2_url
            assert resumed == full_map(snaps, resumed.version, alpha.id)
            await until(lambda: alpha.maps[-1].peers[0].name == "bravo2"
                        and alpha.maps[-1].peers[0].endpoints == ("192.0.2.2:41641",)
                        and any(r.name == "wiki.tailnet" for r in alpha.maps[-1].dns.records), "the missed changes")
            assert alpha.maps[-1] == full_map(snaps, alpha.maps[-1].version, alpha.id)
            assert r2.stats["full_maps"] == 1   # bravo's first map; alpha's was a delta
            print(f"resumed on r2 {took:.2f}s after r1 was killed")
        finally:
            await close_all((alpha, bravo), r2, store, admin)
            r1.kill()
    asyncio.run(asyncio.wait_for(scenario(), 90))


def test_a_storm_of_arriving_nodes_costs_few_heartbeats_and_one_node_read_each(pg_url: str) -> None:
    """What a dead replica's nodes cost the replica they move to, per arrival: the machine's node read
    once (not once to authenticate and again to serve), and the replica's heartbeat (a blocking write
    of every online id) written for the whole burst, not after each arrival; and streams that end
    together have their last-seen times written together."""
    async def scenario() -> None:
        admin = ControlStore(pg_url)
        key, _ = admin.create_authkey("alice@example.com", reusable=True)
        store = ControlStore(pg_url)
        server = ControlServer(store, ServerConfig(poll_interval=0.05, coalesce=0.005, replica_id="r1"))
        calls = {"heartbeat": 0, "node": 0, "touch": 0}

        def counting(name: str, method):  # noqa: ANN001, ANN202 (observation only: the real method runs)
            def call(*args, **kw):  # noqa: ANN002, ANN003, ANN202
                calls[name] += 1
                return method(*args, **kw)
            return call
        url = f"http://127.0.0.1:{await server.start('127.0.0.1', 0)}"
        nodes = [await Follower(url).join(key, f"n{i}") for i in range(30)]
        try:
            await until(lambda: server.snapshot is not None and len(server.snapshot.nodes) == 30, "all registered")
            store.heartbeat_replica = counting("heartbeat", store.heartbeat_replica)  # type: ignore[method-assign]
            store.node_by_machine_key = counting("node", store.node_by_machine_key)  # type: ignore[method-assign]
            for n in nodes:   # one after another, as a storm arrives over seconds, not all at once
                n.start()
                await until(lambda n=n: bool(n.maps), "its first map")
            await until(lambda: any(r.id == "r1" and len(r.online) == 30 for r in admin.list_replicas()),
                        "the heartbeat naming all 30")
            assert calls["node"] == 30
            assert calls["heartbeat"] <= 10, calls
            # All 30 streams end at once (a blip): their last-seen times in a few writes, not 30.
            store.touch = counting("touch", store.touch)  # type: ignore[method-assign]
            calls["touch"] = 0
            before = {n.id: admin.get_node(n.id).last_seen or 0.0 for n in nodes}
            await asyncio.gather(*(n.stop() for n in nodes))
            await until(lambda: all((admin.get_node(n.id).last_seen or 0.0) > before[n.id] for n in nodes),
                        "every node's last-seen written")
            assert calls["touch"] <= 3, calls
        finally:
            await close_all(nodes, server, store, admin)
    asyncio.run(asyncio.wait_for(scenario(), 60))
