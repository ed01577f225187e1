"""Three control replicas (`meshnode control serve --replica-id`) on one real PostgreSQL: nodes
registered on different replicas see each other; a rename, a policy and a record written elsewhere
reach nodes streaming from every replica within a second; presence crosses replicas; a replica killed
with SIGKILL has its nodes shown offline on the others within 15 s; `control replicas --json`."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magicdns.records import parse_record
from meshnode.control.access import set_policy
from meshnode.control.client import ControlClient
from meshnode.control.protocol import generate_private_key
from meshnode.control.store import ControlStore
from meshnode.netmap import NetMap

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


class Replica:
    def __init__(self, url: str, rid: str, tmp: Path, port: int = 0) -> None:
        self.id = rid
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshnode.cli", "control", "serve", "--db", url, "--replica-id", rid,
             "--listen", f"127.0.0.1:{port}", "--admin-token-file", str(tmp / f"{rid}.token")],
            stderr=subprocess.PIPE, text=True, cwd=REPO)
        deadline = time.monotonic() + 30
        self.port = 0
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            m = re.search(r"control server listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        assert self.port, f"replica {rid} did not start"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc.stderr.close()


async def _follow(client: ControlClient, maps: dict[str, NetMap], name: str) -> None:
    async for m in client.stream_map(max_backoff=0.5):
        maps[name] = m


async def _until(cond, timeout: float, what: str) -> float:  # noqa: ANN001
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, f"{what} not within {timeout} s"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def test_three_replicas_share_one_tailnet(tmp_path: Path, pg_url: str) -> None:
    store = ControlStore(pg_url)
    key, _ = store.create_authkey("alice", reusable=True)
    replicas = [Replica(pg_url, f"r{i}", tmp_path) for i in (1, 2, 3)]
    try:
        asyncio.run(asyncio.wait_for(_scenario(store, key, replicas, pg_url), 90))
    finally:
        for r in replicas:
            r.kill()
        store.close()


async def _scenario(store: ControlStore, key: str, replicas: list[Replica], pg_url: str) -> None:
    clients, maps, tasks = {}, {}, []
    # One node on each replica, and echo on r2 with r3 as its second choice (--login-server URL2,URL3).
    urls = [r.url for r in replicas] + [f"{replicas[1].url},{replicas[2].url}"]
    for name, url in zip(("alpha", "bravo", "charlie", "echo"), urls):
        c = ControlClient(url, generate_private_key(), generate_private_key())
        await c.register(key, hostname=name)
        clients[name] = c
        tasks.append(asyncio.create_task(_follow(c, maps, name)))
    try:
        def peers(name: str) -> dict[str, bool]:
            m = maps.get(name)
            return {p.name: p.online for p in m.peers} if m else {}
        await _until(lambda: all(len(peers(n)) == 3 for n in clients), 5, "every node seeing its three peers")
        # Presence crosses replicas: bravo streams from r2, alpha (on r1) sees it online.
        await _until(lambda: peers("alpha").get("bravo") and peers("charlie").get("bravo"), 8,
                     "bravo online as seen from the other replicas")

        res = subprocess.run([sys.executable, "-m", "meshnode.cli", "control", "replicas", "--db", pg_url, "--json"],
                             capture_output=True, text=True, cwd=REPO, timeout=30)
        rows = {r["id"]: r for r in json.loads(res.stdout)}
        assert set(rows) == {"r1", "r2", "r3"} and all(r["listen"] for r in rows.values())
        assert [rows[r]["nodes"] for r in ("r1", "r2", "r3")] == [1, 2, 1]
        assert set(rows["r1"]) >= {"id", "listen", "nodes", "version", "lag", "heartbeat_at"}

        # Changes written elsewhere reach nodes on every replica within a second.
        store.rename_node("charlie", "delta")
        took = await _until(lambda: "delta" in peers("alpha") and "delta" in peers("bravo"), 1.0, "the rename")
        set_policy(store, '{"acls": [{"action": "accept", "src": ["*"], "dst": ["*:22"]}]}')
        await _until(lambda: all(any("22" in repr(f) for f in maps[n].packet_filter) for n in clients), 1.0,
                     "the policy")
        store.records.add(parse_record("wiki", "CNAME", "delta", 60, "tailnet"))
        await _until(lambda: all(any(r.name == "wiki.tailnet" for r in maps[n].dns.records) for n in clients), 1.0,
                     "the record")
        assert took < 1.0

        # The doorbell's LISTEN connections are cut: changes still arrive, by the 1 s poll.
        import psycopg
        with psycopg.connect(pg_url, autocommit=True) as admin:
            cut = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()").fetchall()
        assert len(cut) == 3
        store.rename_node("delta", "golf")
        await _until(lambda: all("golf" in peers(n) for n in ("alpha", "bravo", "echo")), 1.5,
                     "a rename after the LISTEN connections were terminated")

        # r2 dies without a word: echo moves to r3 and stays online; bravo (r2 only) is shown offline
        # on the other replicas within 15 s.
        replicas[1].kill()
        killed = time.monotonic()
        await _until(lambda: clients["echo"].server_url == replicas[2].url and clients["echo"].stream_error is None,
                     10, "echo streaming from r3")
        await _until(lambda: peers("alpha").get("bravo") is False and peers("charlie").get("bravo") is False,
                     15 - (time.monotonic() - killed), "bravo shown offline after its replica died")
        assert peers("alpha").get("echo") is True
        store.rename_node("alpha", "foxtrot")
        await _until(lambda: "foxtrot" in peers("echo") and "foxtrot" in peers("charlie"), 1.0,
                     "a rename reaching the node that moved")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients.values():
            await c.close()


def _view(m: NetMap) -> tuple:
    """What a node acts on, without the version (each replica numbers its own snapshots)."""
    return (m.self_node.name, m.self_node.addresses,
            tuple((p.name, p.addresses, p.online) for p in m.peers),
            tuple((r.name, r.rtype, r.value) for r in m.dns.records), m.dns.nameservers,
            repr(m.packet_filter))


def test_all_replicas_restarted_serve_the_same_maps(tmp_path: Path, pg_url: str) -> None:
    store = ControlStore(pg_url)
    key, _ = store.create_authkey("alice", reusable=True)
    store.set_nameservers(["1.1.1.1"])
    store.records.add(parse_record("wiki", "CNAME", "alpha", 60, "tailnet"))
    replicas = [Replica(pg_url, f"r{i}", tmp_path) for i in (1, 2)]
    ports = [r.port for r in replicas]
    try:
        async def scenario() -> None:
            clients, maps, tasks = {}, {}, []
            for name, r in zip(("alpha", "bravo"), replicas):
                c = ControlClient(r.url, generate_private_key(), generate_private_key())
                await c.register(key, hostname=name)
                clients[name] = c
                tasks.append(asyncio.create_task(_follow(c, maps, name)))
            try:
                await _until(lambda: all(m.peers and m.peers[0].online for m in maps.values()) and len(maps) == 2,
                             8, "both nodes seeing each other online")
                before = {n: _view(m) for n, m in maps.items()}
                for r in replicas:
                    r.kill()
                maps.clear()
                replicas[:] = [Replica(pg_url, f"r{i}", tmp_path, port=p) for i, p in zip((1, 2), ports)]
                await _until(lambda: len(maps) == 2 and {n: _view(m) for n, m in maps.items()} == before, 20,
                             "the same maps after every replica restarted")
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for c in clients.values():
                    await c.close()
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        for r in replicas:
            r.kill()
        store.close()
