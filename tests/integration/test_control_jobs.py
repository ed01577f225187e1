"""Jobs that must run once per tailnet (control/jobs.py), on a real PostgreSQL.

Proves: per-job advisory locks are held by one session at a time, taken again without stacking, and
pass to another replica when the holder's session dies; expired logins are audited once however many
stores sweep; and with two `control serve --replica-id` processes, an ephemeral node that went away
is removed by one replica only (one audit entry), and after the replica holding the job is killed
with SIGKILL the other one takes the job over and removes the next one.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from meshnode.control.client import ControlClient
from meshnode.control.jobs import KEYS, Job, JobLocks
from meshnode.control.protocol import generate_private_key
from meshnode.control.store import ControlStore, Registration
from tests.support import async_wait_until, wait_until

REPO = Path(__file__).resolve().parents[2]


def _advisory_locks(url: str) -> list[tuple]:
    with psycopg.connect(url, autocommit=True) as c:
        return c.execute("SELECT pid, classid::bigint, objid::bigint FROM pg_locks"
                         " WHERE locktype = 'advisory' AND granted").fetchall()


def test_job_locks_pass_to_another_replica_when_the_holder_dies(pg_url: str) -> None:
    a, b = JobLocks(pg_url), JobLocks(pg_url)
    try:
        assert a.holds(Job.EPHEMERAL) and a.holds(Job.EPHEMERAL)   # taken, then kept
        assert not b.holds(Job.EPHEMERAL)
        assert b.holds(Job.RETENTION) and not a.holds(Job.RETENTION)   # each job its own lock
        key = KEYS[Job.EPHEMERAL]
        mine = [r for r in _advisory_locks(pg_url) if (r[1] << 32 | r[2]) == key]
        assert len(mine) == 1            # asked twice, held once (no stacked count to leak)
        # The holder's session dies (a replica killed, a network cut): the other takes the job.
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (mine[0][0],))   # waits for it to end
        assert b.holds(Job.EPHEMERAL)
        assert not a.holds(Job.EPHEMERAL) and Job.EPHEMERAL not in a.held   # a reconnects, finds it taken
        b.close()
        wait_until(lambda: a.holds(Job.EPHEMERAL) and a.holds(Job.RETENTION), timeout=5,   # closed: released
                   what="the jobs of a closed session taken over")
    finally:
        a.close()
        b.close()


def test_job_locks_without_a_database_server_are_not_held(tmp_path: Path) -> None:
    assert JobLocks(None).holds(Job.EPHEMERAL)    # SQLite: one server per database, runs everything
    dead = JobLocks("postgresql://postgres@127.0.0.1:1/none", connect_timeout=2)
    assert not dead.holds(Job.EPHEMERAL)          # fails safe: no connection, no job


def _allow(user, key_tags, reg, existing):  # noqa: ANN001
    from meshnode.control.store import Grant
    return Grant(tuple(key_tags), (), False)


def test_expired_logins_are_audited_once(db_spec: str) -> None:
    s1, s2 = ControlStore(db_spec), ControlStore(db_spec)
    key, _ = s1.create_authkey("alice", reusable=True)
    s1.register(Registration("mk1", "nk1", "laptop", "linux", key), _allow)
    s1.register(Registration("mk2", "nk2", "phone", "linux", key), _allow)
    now = time.time()
    assert s1.sweep_expired(now) == []     # the first sweep only sets the mark
    s1.expire_node("laptop", when=now + 10)
    assert s2.sweep_expired(now + 5) == []  # not yet
    before = s1.version()
    assert [n.name for n in s2.sweep_expired(now + 11)] == ["laptop"]
    assert s1.sweep_expired(now + 12) == [] and s2.sweep_expired(now + 13) == []
    assert s1.version() == before + 1      # one change: every replica's maps drop it
    entries = [e for e in s1.audit_entries() if e.action == "node.expired"]
    assert [(e.target, e.actor) for e in entries] == [("node:laptop", "system")]


class Replica:
    """`meshnode control serve --replica-id` as a process, its log in a file."""

    def __init__(self, url: str, rid: str, tmp: Path) -> None:
        self.id, self.log = rid, tmp / f"{rid}.log"
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshnode.cli", "control", "serve", "--db", url, "--replica-id", rid,
             "--listen", "127.0.0.1:0", "--ephemeral-grace", "2s", "--admin-token-file", str(tmp / f"{rid}.tok")],
            stderr=self._out, stdout=subprocess.DEVNULL, cwd=REPO)
        m = wait_until(lambda: re.search(r"listening on 127\.0\.0\.1:(\d+)", self.text()), timeout=30)
        self.url = f"http://127.0.0.1:{m.group(1)}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._out.close()


def _running(r: Replica, tmp: Path, job: str = "ephemeral-removal") -> int:
    """The replica's /metrics gauge: 1 while it runs `job`."""
    import urllib.request
    token = next(tmp.glob("*.tok")).read_text().strip()   # written by the replica that made it
    req = urllib.request.Request(r.url + "/metrics", headers={"Authorization": f"Bearer {token}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    return int(re.search(rf'meshnode_control_job_running{{job="{job}"}} (\d)', text).group(1))


async def _visit(url: str, key: str, name: str) -> None:
    """An ephemeral node registers, takes its map once, and goes away without logging out."""
    c = ControlClient(url, generate_private_key(), generate_private_key())
    try:
        await c.register(key, hostname=name)
        async for _ in c.stream_map():
            break
    finally:
        await c.close()


@pytest.mark.slow
def test_ephemeral_removal_runs_once_and_moves_when_its_replica_dies(tmp_path: Path, pg_url: str) -> None:
    store = ControlStore(pg_url)
    key, _ = store.create_authkey("alice", reusable=True, ephemeral=True)
    replicas = [Replica(pg_url, "r1", tmp_path), Replica(pg_url, "r2", tmp_path)]
    try:
        holder = wait_until(lambda: next((r for r in replicas if "job ephemeral-removal: this replica runs it"
                                          in r.text()), None), timeout=15)
        other = next(r for r in replicas if r is not holder)
        # The node visits the replica that does not run the job: the holder removes it anyway.
        asyncio.run(asyncio.wait_for(_visit(other.url, key, "eph1"), 20))
        wait_until(lambda: "eph1" not in {n.name for n in store.list_nodes()}, timeout=20)
        removals = [e for e in store.audit_entries() if e.action == "node.delete" and e.target == "node:eph1"]
        assert len(removals) == 1 and removals[0].new == {"reason": "ephemeral node offline"}
        assert "eph1" in holder.text() and "removed" not in other.text()
        assert _running(holder, tmp_path) == 1
        assert _running(other, tmp_path) == 0

        holder.kill()
        wait_until(lambda: "job ephemeral-removal: this replica runs it" in other.text(), timeout=20)
        asyncio.run(asyncio.wait_for(_visit(other.url, key, "eph2"), 20))
        wait_until(lambda: "eph2" not in {n.name for n in store.list_nodes()}, timeout=20)
        assert len([e for e in store.audit_entries() if e.target == "node:eph2" and e.action == "node.delete"]) == 1
        assert re.search(r"removed 1 offline ephemeral node\(s\): eph2", other.text())
    finally:
        for r in replicas:
            r.kill()
        store.close()


def test_an_expiring_login_leaves_the_maps_when_it_expires(tmp_path: Path) -> None:
    """Nothing else changes in the tailnet: the expiry job alone takes the node out of its peers' maps."""
    from meshnode.control.server import ControlServer, ServerConfig

    async def main() -> None:
        store = ControlStore(tmp_path / "control.db")
        server = ControlServer(store, ServerConfig(poll_interval=0.05, coalesce=0.005, expiry_interval=0.1))
        url = f"http://127.0.0.1:{await server.start('127.0.0.1', 0)}"
        key, _ = store.create_authkey("alice", reusable=True)
        maps: dict[str, list[str]] = {}
        clients, tasks = [], []

        async def follow(c: ControlClient, name: str) -> None:
            async for nm in c.stream_map(max_backoff=0.2):
                maps[name] = [p.name for p in nm.peers]
        try:
            for name in ("alpha", "bravo"):
                c = ControlClient(url, generate_private_key(), generate_private_key())
                await c.register(key, hostname=name)
                clients.append(c)
                tasks.append(asyncio.create_task(follow(c, name)))
            await async_wait_until(lambda: maps.get("alpha") == ["bravo"], timeout=5)
            store.expire_node("bravo", when=time.time() + 1.0)
            await asyncio.sleep(0)   # the expiry time is in the future: bravo is still a peer
            assert maps["alpha"] == ["bravo"]
            await async_wait_until(lambda: maps.get("alpha") == [], timeout=5)
            assert [e.target for e in store.audit_entries() if e.action == "node.expired"] == ["node:bravo"]
            metrics = server._metrics_text().text
            assert 'meshnode_control_job_running{job="key-expiry"} 1' in metrics   # SQLite: every job here
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in clients:
                await c.close()
            await server.stop()
    asyncio.run(asyncio.wait_for(main(), 30))
